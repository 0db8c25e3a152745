"""LoRA adapters through PEFT: default target modules, wrapping, the adapter files a run writes, merging.

The recipe's ``use_peft`` / ``lora_*`` keys are TRL's (``trl.ModelConfig``). A LoRA run freezes the base model and
trains low-rank updates of its Linear layers (Hu et al. 2021, https://arxiv.org/abs/2106.09685). Its run directory
(and each checkpoint's ``model/``) holds the adapter in PEFT's own format, ``adapter_config.json`` +
``adapter_model.safetensors``, which ``PeftModel.from_pretrained(base, run_dir)`` loads; ``base_model_name_or_path``
in it names the base:

- the recipe's ``init_from`` (an OpenAI name, a Hub repo, or the absolute path of a local model directory) when
  the base is that model unchanged;
- ``<output_dir>/base_model``, written once at the start, when the run changed the base's architecture (a new
  ``attn_type``: the attention-conversion recipes) or started from scratch, since no other file holds those
  frozen weights.

Importing :mod:`gpt2_accel` registers :data:`DEFAULT_TARGET_MODULES` in PEFT's table of default LoRA targets for
model_type ``gpt2_accel`` (lazily: PEFT is only imported by who uses it), so ``LoraConfig()`` without
``target_modules`` works on our model as it does on transformers' GPT-2.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

from torch import nn

from .atomic import atomic_output
from .recipe import ModelArguments, PeftArguments, RecipeError

MODEL_TYPE = "gpt2_accel"
# Every Linear layer of a GPT-2 block: the fused q/k/v projection, both output projections, the MLP input.
DEFAULT_TARGET_MODULES = ["c_attn", "c_proj", "c_fc"]
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_MODEL_DIR = "base_model"
_PEFT_CONSTANTS = "peft.utils.constants"


# ---------------------------------------------------------------------------------------------------------------
# PEFT's default target modules for model_type gpt2_accel
# ---------------------------------------------------------------------------------------------------------------
def _register(constants_module: Any) -> None:
    constants_module.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.setdefault(
        MODEL_TYPE, list(DEFAULT_TARGET_MODULES)
    )


class _RegisterWhenPeftLoads(importlib.abc.MetaPathFinder):
    """Adds our defaults to PEFT's table right after ``peft.utils.constants`` runs, before any module copies
    the table: importing PEFT (about 3 s) only to register a list would slow every ``import gpt2_accel``."""

    def find_spec(self, name, path, target=None):
        if name != _PEFT_CONSTANTS:
            return None
        sys.meta_path.remove(self)  # one shot; let the regular finders locate the real module
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _register(module)

        spec.loader.exec_module = exec_module
        return spec


def register_peft_defaults() -> None:
    """Make PEFT know :data:`DEFAULT_TARGET_MODULES` for model_type ``gpt2_accel`` (now or when it is imported)."""
    if _PEFT_CONSTANTS in sys.modules:
        _register(sys.modules[_PEFT_CONSTANTS])
    elif importlib.util.find_spec("peft") is not None and not any(
        isinstance(f, _RegisterWhenPeftLoads) for f in sys.meta_path
    ):
        sys.meta_path.insert(0, _RegisterWhenPeftLoads())


# ---------------------------------------------------------------------------------------------------------------
# Target modules
# ---------------------------------------------------------------------------------------------------------------
def linear_modules(model: nn.Module) -> list[str]:
    """Full names of the Linear layers LoRA may adapt: all but the (tied) output layer."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] != "lm_head"]


def default_target_modules(model: nn.Module) -> list[str]:
    """The distinct short names of the model's Linear layers (c_attn, c_fc, c_proj for GPT-2 blocks), so blocks
    with other projections (e.g. gated MLPs) are still covered in full."""
    return sorted({n.split(".")[-1] for n in linear_modules(model)})


def _matches(name: str, target: str) -> bool:
    # PEFT's rule for a list of targets: the full name, or its last components (peft.tuners.tuners_utils)
    return name == target or name.endswith("." + target)


def check_targets(model: nn.Module, targets: list[str], modules_to_save: list[str] | None) -> None:
    """Refuse targets that match no Linear layer (listing those that exist), before any training."""
    linear = linear_modules(model)
    short = sorted({n.split(".")[-1] for n in linear})
    missing = [t for t in targets if not any(_matches(n, t) for n in linear)]
    if missing:
        raise RecipeError(
            f"lora_target_modules {missing} match no Linear layer of the model. Its Linear layers are {short} "
            f"(full names like {linear[0]!r}); set lora_target_modules to some of them, or leave it unset to "
            "adapt all of them"
        )
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in modules_to_save or [] if not any(_matches(n, t) for n in names)]
    if missing:
        raise RecipeError(
            f"lora_modules_to_save {missing} match no module of the model (e.g. 'ln_f', 'wpe'); fix or unset it"
        )


# ---------------------------------------------------------------------------------------------------------------
# The base model an adapter applies to
# ---------------------------------------------------------------------------------------------------------------
def _source_attn_type(source: str) -> str | None:
    """attn_type of a local model directory (vanilla GPT-2 directories are softmax), else None (unknown)."""
    cfg = Path(source) / "config.json"
    if not cfg.is_file():
        return None
    data = json.loads(cfg.read_text(encoding="utf-8"))
    return data.get("attn_type", "SM") if data.get("model_type") != "gpt2" else "SM"


def base_name(m: ModelArguments) -> str | None:
    """What ``base_model_name_or_path`` names when the base is ``init_from`` unchanged; None when the run must
    write the base itself (from scratch, or with an attn_type the source does not have)."""
    from .locate import OPENAI_GPT2

    if m.init_from in ("scratch", "resume"):
        return None
    local = Path(m.init_from).is_dir()
    if m.attn_type is not None:
        source_attn = (
            "SM" if m.init_from in OPENAI_GPT2 else _source_attn_type(m.init_from) if local else None
        )
        if source_attn != m.attn_type:
            return None
    return str(Path(m.init_from).resolve()) if local else m.init_from


def write_base_model(model: nn.Module, tokenizer, output_dir: Path) -> Path:
    """Save the frozen base (new attn_type / scratch) as ``output_dir/base_model``, atomically (temp + rename)."""
    final = Path(output_dir) / BASE_MODEL_DIR
    # An existing one is from a previous run in this output_dir (overwrite_output_dir): its base is stale.
    with atomic_output(final, is_dir=True) as tmp:
        model.config.use_cache = True
        model.save_pretrained(tmp, safe_serialization=True)
        model.config.use_cache = False
        tokenizer.save_pretrained(tmp)
    return final.resolve()


# ---------------------------------------------------------------------------------------------------------------
# Wrapping, saving, resuming
# ---------------------------------------------------------------------------------------------------------------
def wrap_model(model: nn.Module, args: PeftArguments, base_model_name_or_path: str) -> nn.Module:
    """``model`` with LoRA adapters (a ``PeftModelForCausalLM``; only the adapters require grad)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise RecipeError("use_peft=true needs the peft package: pip install 'gpt2_accel[peft]'") from None

    targets = list(args.lora_target_modules or default_target_modules(model))
    check_targets(model, targets, args.lora_modules_to_save)
    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
        modules_to_save=args.lora_modules_to_save,
        task_type="CAUSAL_LM",
    )
    model.name_or_path = base_model_name_or_path  # get_peft_model copies it into adapter_config.json
    return get_peft_model(model, config)


def is_adapter_dir(directory: Path) -> bool:
    return (Path(directory) / ADAPTER_CONFIG).is_file()


def adapter_base(directory: Path) -> str:
    """``base_model_name_or_path`` of the adapter in ``directory``."""
    return json.loads((Path(directory) / ADAPTER_CONFIG).read_text(encoding="utf-8"))[
        "base_model_name_or_path"
    ]


def check_resume(checkpoint: Path, use_peft: bool) -> None:
    """A LoRA checkpoint resumes only a LoRA run, a full one only a full run (the optimizer states differ)."""
    adapter = is_adapter_dir(Path(checkpoint) / "model")
    if adapter and not use_peft:
        raise RecipeError(
            f"cannot resume from {checkpoint}: it is a LoRA run (its model/ holds an adapter) but the recipe has "
            "use_peft=false; set use_peft=true (with the run's lora_* keys), or use another output_dir"
        )
    if use_peft and not adapter:
        raise RecipeError(
            f"cannot resume from {checkpoint}: it is a full-finetuning run but the recipe has use_peft=true; "
            "set use_peft=false, or start the LoRA run in another output_dir (init_from the run to adapt it)"
        )


def check_launch(distributed_type: Any, zero_stage: int | None) -> None:
    """LoRA runs with one process, DDP and DeepSpeed ZeRO-1/2. Sharded parameters are refused: our adapter export
    and the base-model export read full tensors, which ZeRO-3 and FSDP would have partitioned."""
    from accelerate.utils import DistributedType

    if distributed_type == DistributedType.FSDP:
        raise RecipeError(
            "use_peft=true is not supported with FSDP in gpt2_accel: launch with DDP (accelerate_configs/ddp.yaml) "
            "or DeepSpeed ZeRO-1/2 (accelerate_configs/deepspeed_zero2.yaml); the frozen base needs no sharding "
            "of optimizer states"
        )
    if distributed_type == DistributedType.DEEPSPEED and zero_stage == 3:
        raise RecipeError(
            "use_peft=true is not supported with DeepSpeed ZeRO-3 in gpt2_accel: use ZeRO-1/2 "
            "(accelerate_configs/deepspeed_zero2.yaml) or DDP; with LoRA the optimizer state is already tiny"
        )


def save_adapter(model: nn.Module, directory: Path, state_dict: dict | None = None) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's format) into ``directory``.

    ``state_dict`` is the full state dict gathered by Accelerate; PEFT keeps only the adapter's tensors."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    card = directory / "README.md"
    had_card = card.exists()
    # save_embedding_layers=False: "auto" asks the Hub whether the base's vocabulary changed (a network call)
    model.save_pretrained(
        directory, state_dict=state_dict, safe_serialization=True, save_embedding_layers=False
    )
    if not had_card:
        card.unlink(missing_ok=True)  # PEFT's placeholder card; hub.py writes the real one at push time


def trainable_summary(model: nn.Module) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return (
        f"{trainable / 1e6:.3f}M trainable of {total / 1e6:.2f}M parameters ({100 * trainable / total:.2f}%)"
    )


# ---------------------------------------------------------------------------------------------------------------
# Merging
# ---------------------------------------------------------------------------------------------------------------
def merge_adapter(adapter_dir: str | Path, base: str | None = None) -> nn.Module:
    """The base model with the adapter in ``adapter_dir`` folded into its weights: a plain GPT2AccelForCausalLM.

    ``base`` None uses the adapter's ``base_model_name_or_path`` (OpenAI names are converted to our model)."""
    from peft import PeftModel

    from .trainer import load_pretrained_for_training

    adapter_dir = Path(adapter_dir)
    if not is_adapter_dir(adapter_dir):
        raise FileNotFoundError(
            f"{str(adapter_dir)!r} holds no {ADAPTER_CONFIG}: pass a LoRA run directory (use_peft=true) or a "
            "checkpoint's model/ directory of one"
        )
    base = base or adapter_base(adapter_dir)
    model = load_pretrained_for_training(base)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged.config.use_cache = True
    return merged.eval()
