"""The typed recipe schema: YAML file + ``--key=value`` overrides -> a validated :class:`Recipe`.

A recipe is flat YAML (like alignment-handbook's): every key belongs to exactly one section dataclass below, and
keys use ``transformers.TrainingArguments`` names where one exists. Sections may also be written nested
(``model: {n_layer: 2}``) or dotted on the command line (``--model.n_layer=2``). Unknown keys are errors that name
the key and suggest close matches. Every field's ``help`` is its documentation (``gpt2-accel train --help``).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .locate import OPENAI_GPT2_SIZES


class RecipeError(ValueError):
    """A recipe key has a bad value or name. The message names the key and the fix."""


def _f(default: Any, help: str, **kw) -> Any:
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelArguments:
    """The architecture and where its weights come from. Only this section reaches the model config."""

    init_from: str = _f(
        "scratch",
        "Where the weights start: 'scratch' (random GPT-2 init), 'resume' (newest complete checkpoint in output_dir; "
        f"error if none), an OpenAI GPT-2 ({', '.join(map(repr, OPENAI_GPT2_SIZES))}; Hub or local HF dir), or "
        "any of our run/model directories or Hub repos (finetuning).",
    )
    n_layer: int = _f(12, "Number of transformer blocks (scratch only; taken from the checkpoint otherwise).")
    n_head: int = _f(12, "Attention heads per block (scratch only).")
    n_embd: int = _f(768, "Residual stream width (scratch only); must be divisible by n_head.")
    n_positions: int = _f(1024, "Context length of the model (scratch only).")
    vocab_size: int | None = _f(
        None, "Vocabulary size (scratch only); None = the tokenizer's (50257 for GPT-2's BPE)."
    )
    pad_vocab_size_multiple: int = _f(
        64,
        "Pad the embedding rows to a multiple of this for faster matmuls (nanoGPT's 50304); never predicted.",
    )
    dropout: float | None = _f(
        None,
        "Dropout on embeddings, attention and residuals; None = 0.0 from scratch, the checkpoint's otherwise.",
    )
    bias: bool = _f(True, "Biases in Linear and LayerNorm layers, as GPT-2 (scratch only).")
    attn_type: str | None = _f(
        None,
        "Attention variant: SM, GK, GKpoly-<n>, PA_<activation>. None = SM from scratch, the checkpoint's "
        "otherwise; set it with an OpenAI/our checkpoint to convert the attention (the seed fork's recipe).",
    )
    attn_implementation: str = _f(
        "sdpa", "'sdpa' (fast kernels) or 'eager' (reference formulas, T x T matrices)."
    )
    # Modern architecture options (scratch only; docs/architecture.md). Names and meanings are GPT2AccelConfig's.
    position_embedding_type: str = _f(
        "learned", "'learned' (GPT-2's wpe table) or 'rope' (rotary positions)."
    )
    rope_theta: float | None = _f(None, "Rotary base wavelength; None = 10000 (gpt-oss: 150000). rope only.")
    rope_scaling: dict | None = _f(
        None,
        "YaRN as gpt-oss: {rope_type: yarn, factor: 32, original_max_position_embeddings: 4096, beta_fast: 32, "
        "beta_slow: 1, truncate: false}. rope only.",
    )
    norm_type: str = _f("layernorm", "'layernorm' (GPT-2) or 'rmsnorm'.")
    norm_elementwise_affine: bool = _f(
        True, "Learned scale in every norm; false = parameter-free (nanochat)."
    )
    norm_after_embedding: bool = _f(False, "Normalise the token embedding before the first block (nanochat).")
    mlp_type: str = _f(
        "gelu", "'gelu' (GPT-2), 'swiglu' (Llama, gpt-oss) or 'relu2' (modded-nanogpt, nanochat)."
    )
    n_inner: int | None = _f(
        None, "MLP hidden width; None = 4 * n_embd (swiglu: 8/3 * n_embd, rounded up to 64)."
    )
    n_kv_head: int | None = _f(
        None, "Key/value heads (GQA; 1 = MQA); None = n_head. n_head must be divisible by it."
    )
    qk_norm: bool = _f(False, "Normalise queries and keys per head before attention (Qwen3, nanochat).")
    attention_bias: bool | None = _f(None, "Biases in c_attn/c_proj; None = bias.")
    mlp_bias: bool | None = _f(None, "Biases in the MLP; None = bias.")
    tie_word_embeddings: bool = _f(
        True, "Share the token embedding with the LM head (GPT-2); false = untied."
    )
    sliding_window: int | None = _f(
        None, "Keys per query in sliding_attention layers; None = no local attention."
    )
    layer_types: list[str] | None = _f(
        None,
        "full_attention / sliding_attention per layer, or a shorter pattern repeated over the layers (gpt-oss: "
        "[sliding_attention, full_attention]); None = all sliding when sliding_window is set.",
    )
    attention_sinks: bool = _f(
        False, "A learned sink logit per head in every softmax (gpt-oss); attn_type SM only."
    )
    final_logit_softcapping: float | None = _f(None, "cap * tanh(logits / cap) on the output (nanochat: 15).")
    zero_init_output_proj: bool = _f(False, "Initialise the attention and MLP output projections to zero.")
    magnitude_preserving: bool = _f(
        False,
        "EDM2 magnitude preservation (Karras et al. 2023): normalised weights re-normalised after each step, "
        "mp_sum residuals, scaled activations, a learned logit gain. Needs bias=false, norm_elementwise_affine=false.",
    )
    mp_residual_balance: float = _f(
        0.3, "magnitude_preserving: the blend t of mp_sum(x, branch, t) (EDM2: 0.3)."
    )


@dataclass
class DataArguments:
    """Where the text comes from and how it becomes packed windows."""

    dataset_name: str | list[str] = _f(
        "bundled:shakespeare",
        "Training data: a Hub dataset id, local files (txt/json/jsonl/parquet/arrow, globs), a directory written by "
        "'gpt2-accel prepare', nanoGPT-style train.bin, 'bundled:shakespeare', or a list of these (a mixture).",
    )
    dataset_config_name: str | None = _f(
        None, "Hub dataset configuration, e.g. 'sample-10BT' for FineWeb-Edu."
    )
    dataset_weights: list[float] | None = _f(
        None, "Sampling weights of a mixture (one per dataset_name entry); None = equal weights."
    )
    text_column: str = _f("text", "Column holding the text in json/parquet/arrow/Hub datasets.")
    train_split: str = _f("train", "Split to train on.")
    validation_split: str | None = _f(
        None,
        "Split to validate on (e.g. 'validation'); None = hold out validation_split_percentage of train.",
    )
    validation_dataset_name: str | None = _f(
        None, "A separate validation source; overrides validation_split."
    )
    validation_split_percentage: float = _f(
        5.0, "Percent of documents held out from the training source for validation when it has no split."
    )
    streaming: bool = _f(True, "Stream the dataset (nothing downloaded in full, flat memory).")
    tokenizer_name: str = _f(
        "gpt2",
        "'gpt2' (bundled BPE, offline), 'char' (UTF-8 bytes), or a Hub id / local tokenizer directory.",
    )
    block_size: int | None = _f(None, "Training window in tokens; None = the model's n_positions.")
    shuffle_buffer_size: int = _f(
        0,
        "Shuffle streamed documents through a buffer of this size; 0 keeps resume exact (the buffer is not saved).",
    )
    dataloader_num_workers: int = _f(
        1,
        "0 = read/tokenize/pack in the training process; >= 1 = in one background worker process per rank "
        "(order and resume state do not depend on it; the tokenizer's threads use the cores).",
    )
    max_eval_samples: int = _f(64, "Validation windows evaluated at each eval (the same ones every time).")


@dataclass
class TrainingArguments:
    """The loop, the optimizer, the schedule, checkpoints and logging (transformers.TrainingArguments names)."""

    output_dir: str = _f(
        "runs/demo", "Run directory: checkpoints, the final HF model, metrics.jsonl, recipe.yaml."
    )
    overwrite_output_dir: bool = _f(
        False, "Start from scratch even if output_dir holds checkpoints (they are kept)."
    )
    resume_from_checkpoint: str | None = _f(
        "auto",
        "'auto' resumes from the newest complete checkpoint in output_dir if there is one; a path resumes from it; "
        "None/'never' never resumes (error if output_dir has checkpoints, unless overwrite_output_dir).",
    )
    allow_recipe_change: bool = _f(
        False,
        "Resume even if the model or data keys differ from the checkpoint's recipe (listed in the error).",
    )
    max_steps: int = _f(1000, "Optimizer steps to train for.")
    max_train_tokens: int | None = _f(
        None, "Token budget; if set, max_steps = ceil(tokens / (global batch * block_size))."
    )
    per_device_train_batch_size: int = _f(12, "Windows per device per micro-step.")
    per_device_eval_batch_size: int = _f(12, "Windows per device per eval step.")
    gradient_accumulation_steps: int = _f(1, "Micro-steps per optimizer step.")
    learning_rate: float = _f(6e-4, "Peak learning rate (after warmup).")
    min_lr: float = _f(
        6e-5, "Final learning rate of the cosine/linear/WSD decay (nanoGPT: learning_rate / 10)."
    )
    lr_scheduler_type: str = _f(
        "cosine",
        "'cosine', 'linear', 'constant', 'warmup_stable_decay' or 'inverse_sqrt' (EDM2: lr / sqrt(max(t / "
        "inverse_sqrt_timescale, 1))) after warmup.",
    )
    warmup_steps: int = _f(100, "Linear warmup steps from 0 to learning_rate.")
    decay_ratio: float = _f(0.2, "warmup_stable_decay only: fraction of max_steps spent in the final decay.")
    weight_decay: float = _f(
        0.1,
        "AdamW weight decay on >= 2-D tensors (matmul weights, embeddings); never on biases or LayerNorm gains.",
    )
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.95, "AdamW beta2 (0.95 as GPT-3/nanoGPT).")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.")
    max_grad_norm: float = _f(
        1.0,
        "Clip the gradient norm to this; 0 disables clipping. optim=muon under DeepSpeed needs 0 (DeepSpeed would "
        "clip Muon's orthogonalised update instead).",
    )
    bf16: bool = _f(
        False, "bf16 mixed precision (GPUs with bf16). Neither bf16 nor fp16 = the launch config's."
    )
    fp16: bool = _f(False, "fp16 mixed precision with loss scaling.")
    torch_compile: bool = _f(False, "torch.compile the model (slow first step, faster after).")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory.")
    seed: int = _f(1337, "Seed of the init, dropout and data order (same seed, same run).")
    logging_steps: int = _f(10, "Log loss/lr/grad norm/tokens per s/MFU every this many steps.")
    eval_steps: int = _f(250, "Evaluate every this many steps (and at the end); 0 = only at the end.")
    save_steps: int = _f(1000, "Write a resumable checkpoint every this many steps (and at the end).")
    save_total_limit: int | None = _f(
        2, "Keep this many newest checkpoints (plus the best by val loss); None = all."
    )
    report_to: list[str] = _f(
        ["none"], "Trackers: 'tensorboard', 'wandb' (set WANDB_MODE=offline offline), 'none'."
    )
    run_name: str | None = _f(None, "Run name for trackers; None = the output_dir's name.")
    on_nonfinite: str = _f(
        "error", "Non-finite loss/grad: 'error' stops naming the step; 'skip' skips the update."
    )
    hellaswag_data: str | None = _f(
        None, "HellaSwag validation jsonl (path or Hub id) to score at each eval."
    )
    hellaswag_max_examples: int | None = _f(None, "Score only this many HellaSwag examples (None = all).")
    push_to_hub: bool = _f(False, "Push the final model (and per hub_strategy, checkpoints) to the Hub.")
    hub_model_id: str | None = _f(None, "Hub repo id 'user/name'; None = the output_dir's name.")
    hub_strategy: str = _f(
        "end", "'end', 'every_save' (each checkpoint's model) or 'checkpoint' (also resumable state)."
    )
    hub_private_repo: bool = _f(False, "Create the Hub repo private.")
    hub_token: str | None = _f(None, "Hub token; None = HF_TOKEN or `hf auth login`. Never logged or saved.")
    log_level: str = _f(
        "passive",
        "Console log level: passive (= info), debug (adds third-party routine lines), info, warning, error.",
    )
    ddp_timeout: int = _f(
        1800,
        "Seconds a collective waits for the other processes before the run fails (a dead or hung rank); as "
        "TrainingArguments. Keep it above the longest checkpoint save or evaluation.",
    )
    force_unlock: bool = _f(
        False,
        "Take output_dir even if its lock is held or the filesystem has no locks (docs/reliability.md). Only for a "
        "holder that is gone for sure: a second live writer corrupts the run.",
    )
    optim: str = _f(
        "adamw_torch",
        "Optimizer: 'adamw_torch' (AdamW on every parameter; 'adamw_torch_fused' is the same, fused where torch "
        "can) or 'muon' (torch.optim.Muon on the 2-D hidden matrices of the blocks, AdamW with learning_rate, "
        "adam_* and weight_decay on embeddings, LM head, gains and biases). Muon runs in one process, under DDP, "
        "under DeepSpeed ZeRO-1/2 with max_grad_norm=0 (DeepSpeed's own Muon) and under FSDP2 (each matrix "
        "orthogonalised whole); ZeRO-3, stage 0, optimizer offload, FSDP1 and FSDP2 parameter offload are refused "
        "(docs/distributed.md).",
    )
    muon_learning_rate: float = _f(
        0.02,
        "optim=muon: Muon's peak learning rate (the schedule's shape is lr_scheduler_type's, scaled to it); "
        "torch's 'original' adjustment multiplies it by sqrt(max(1, rows/cols)) per matrix, as Jordan's Muon.",
    )
    muon_momentum: float = _f(0.95, "optim=muon: Muon's (Nesterov) momentum.")
    muon_weight_decay: float = _f(
        0.0, "optim=muon: decoupled weight decay of the Muon matrices (weight_decay stays AdamW's)."
    )
    ema_sigma_rels: list[float] | None = _f(
        None,
        "Post-hoc EMA (EDM2): keep power-function EMAs of the weights with these relative lengths, e.g. "
        "[0.05, 0.10], and write snapshots to output_dir/ema/; `gpt2-accel ema RUN --sigma_rel S --output DIR` "
        "then builds the model of any EMA length in between. None = off. Not under ZeRO-3/FSDP.",
    )
    ema_snapshot_steps: int = _f(
        100,
        "Write the EMA snapshots every this many steps (and at the end); each is len(ema_sigma_rels) models.",
    )
    license: str = _f(
        "mit",
        "Licence of the trained model (a Hub licence id: mit, apache-2.0, other...); recorded in run_info.json "
        "and shown in the model card's metadata. Mind the licence of the data and of init_from.",
    )
    inverse_sqrt_timescale: int | None = _f(
        None,
        "lr_scheduler_type=inverse_sqrt: t_ref, the step where the decay lr / sqrt(t / t_ref) starts; None = "
        "warmup_steps (transformers' timescale default).",
    )


@dataclass
class PeftArguments:
    """LoRA adapters through PEFT (TRL's ModelConfig names); the base model stays frozen."""

    use_peft: bool = _f(
        False,
        "Train LoRA adapters instead of every weight (peft); the run directory holds the adapter in PEFT's format.",
    )
    lora_r: int = _f(16, "LoRA rank (the seed fork's rank 16; TRL's default is 16 too).")
    lora_alpha: int = _f(32, "LoRA scaling numerator: the update is scaled by lora_alpha / lora_r.")
    lora_dropout: float = _f(0.05, "Dropout on the LoRA input (TRL's default 0.05).")
    lora_target_modules: list[str] | None = _f(
        None,
        "Module names (suffixes) that get adapters; None = every Linear layer of the blocks (c_attn, c_proj, c_fc).",
    )
    lora_modules_to_save: list[str] | None = _f(
        None, "Modules trained in full and saved with the adapter (e.g. ln_f); None = none."
    )


@dataclass
class DistillationArguments:
    """Knowledge distillation from a frozen teacher (Hinton et al. 2015); off unless a teacher is named."""

    teacher_model_name_or_path: str | None = _f(
        None,
        "Teacher (TRL GKDConfig's name): an OpenAI GPT-2 name, one of our run/model directories, an exported "
        "GPT-2 directory or a Hub repo. Must share the student's vocabulary. None = no distillation.",
    )
    temperature: float = _f(
        2.0, "Softmax temperature of teacher and student in the KL term (TRL GKDConfig's name); > 0."
    )
    distillation_alpha: float = _f(
        0.5,
        "Weight of the KL term: loss = (1 - alpha) * CE + alpha * temperature^2 * KL(teacher || student); in [0, 1].",
    )


SECTIONS: dict[str, type] = {
    "model": ModelArguments,
    "data": DataArguments,
    "training": TrainingArguments,
    "peft": PeftArguments,
    "distillation": DistillationArguments,
}
# Aliases users bring from nanoGPT; mapped to our names with a note rather than rejected.
SECRET_KEYS = {"hub_token"}


@dataclass
class Recipe:
    model: ModelArguments = field(default_factory=ModelArguments)
    data: DataArguments = field(default_factory=DataArguments)
    training: TrainingArguments = field(default_factory=TrainingArguments)
    peft: PeftArguments = field(default_factory=PeftArguments)
    distillation: DistillationArguments = field(default_factory=DistillationArguments)

    # -- derived quantities ----------------------------------------------------------------------------------------
    def flat(self, *, redact: bool = True) -> dict[str, Any]:
        """All keys in one dict, as in a recipe file (secrets replaced by None unless redact=False)."""
        out: dict[str, Any] = {}
        for sec in SECTIONS:
            for k, v in dataclasses.asdict(getattr(self, sec)).items():
                out[k] = None if (redact and k in SECRET_KEYS and v is not None) else v
        return out

    def to_yaml(self) -> str:
        """The resolved recipe, nested by section and commented, with secrets removed."""
        nested = {sec: {k: v for k, v in dataclasses.asdict(getattr(self, sec)).items()} for sec in SECTIONS}
        for k in SECRET_KEYS:
            for sec in nested.values():
                if k in sec and sec[k] is not None:
                    sec[k] = None
        return yaml.safe_dump(nested, sort_keys=False)


def _key_owner() -> dict[str, tuple[str, dataclasses.Field]]:
    owner = {}
    for sec, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            owner[f.name] = (sec, f)
    return owner


def field_docs() -> dict[str, str]:
    """key -> one-line documentation, for --help and the docs."""
    return {k: f.metadata["help"] for k, (_, f) in _key_owner().items()}


def _unknown(key: str, where: str) -> RecipeError:
    close = difflib.get_close_matches(key.split(".")[-1], list(_key_owner()), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return RecipeError(
        f"unknown recipe key {key!r} ({where}).{hint} See `gpt2-accel train --help` for all keys."
    )


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert a YAML/command-line value to the field's declared type, or raise a RecipeError naming the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        none_like = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if none_like and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, value, a)
            except RecipeError as e:
                errors.append(str(e))
        raise RecipeError(errors[-1] if errors else f"{key}: bad value {value!r}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            value = [value]
        return [_coerce(key, v, item) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise RecipeError(f"recipe key {key!r} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise RecipeError(f"recipe key {key!r} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise RecipeError(f"recipe key {key!r} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise RecipeError(f"recipe key {key!r} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        raise RecipeError(f"recipe key {key!r} must be a string, got {value!r}")
    return value


def _parse_scalar(text: str) -> Any:
    # Command-line values use YAML syntax (1e-4, true, null, [a, b]); safe_load never runs code.
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """``--key=value`` / ``--key value`` pairs -> {key: parsed value}."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise RecipeError(
                f"unexpected argument {arg!r}: overrides are written --key=value or --key value"
            )
        body = arg[2:]
        if "=" in body:
            key, raw = body.split("=", 1)
        else:
            key = body
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                raw = argv[i + 1]
                i += 1
            else:
                raw = "true"  # a bare flag: --torch_compile
        out[key.replace("-", "_") if key.replace("-", "_") in _key_owner() else key] = _parse_scalar(raw)
        i += 1
    return out


def _flatten(raw: dict[str, Any], where: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in raw.items():
        if not isinstance(k, str):
            raise RecipeError(f"recipe key {k!r} ({where}) must be a string")
        if k in SECTIONS and isinstance(v, dict):
            for kk, vv in v.items():
                if kk not in {f.name for f in dataclasses.fields(SECTIONS[k])}:
                    raise _unknown(f"{k}.{kk}", where)
                flat[kk] = vv
        elif "." in k and k.split(".", 1)[0] in SECTIONS:
            sec, kk = k.split(".", 1)
            if kk not in {f.name for f in dataclasses.fields(SECTIONS[sec])}:
                raise _unknown(k, where)
            flat[kk] = v
        else:
            flat[k] = v
    return flat


def load_recipe(
    path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None
) -> Recipe:
    """Read a YAML recipe, apply overrides, coerce types and validate. Nothing heavy happens here."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise RecipeError(
                f"recipe file {str(path)!r} not found; recipes live in recipes/, e.g. recipes/demo.yaml"
            )
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise RecipeError(f"recipe file {str(path)!r} is not valid YAML: {e}") from e
        if not isinstance(raw, dict):
            raise RecipeError(
                f"recipe file {str(path)!r} must be a mapping of key: value, got {type(raw).__name__}"
            )
        values.update(_flatten(raw, f"in {path}"))
    if overrides:
        ov = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides)
        values.update(_flatten(ov, "on the command line"))
    return build_recipe(values)


def build_recipe(values: dict[str, Any]) -> Recipe:
    owner = _key_owner()
    hints = {sec: typing.get_type_hints(cls) for sec, cls in SECTIONS.items()}
    per_section: dict[str, dict[str, Any]] = {sec: {} for sec in SECTIONS}
    for key, value in values.items():
        if key not in owner:
            raise _unknown(key, "recipe")
        sec, _ = owner[key]
        per_section[sec][key] = _coerce(key, value, hints[sec][key])
    recipe = Recipe(**{sec: cls(**per_section[sec]) for sec, cls in SECTIONS.items()})
    validate(recipe)
    return recipe


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise RecipeError(msg)


def model_config(m: ModelArguments, vocab_size: int, eot_token_id: int | None = None):
    """The :class:`GPT2AccelConfig` of a from-scratch model: the one place the model section's keys become the
    architecture (the trainer and ``gpt2-accel bench`` both build it here). ``eot_token_id`` = bos = eos."""
    from .configuration_gpt2_accel import GPT2AccelConfig

    layer_types = m.layer_types
    if layer_types and len(layer_types) != m.n_layer:
        _check(
            m.n_layer % len(layer_types) == 0,
            f"layer_types has {len(layer_types)} entries: give one per layer (n_layer={m.n_layer}) or a pattern "
            "whose length divides n_layer",
        )
        layer_types = list(layer_types) * (m.n_layer // len(layer_types))
    modern = {
        k: getattr(m, k)
        for k in (
            "position_embedding_type", "rope_theta", "rope_scaling", "norm_type", "norm_elementwise_affine",
            "norm_after_embedding", "mlp_type", "n_inner", "n_kv_head", "qk_norm", "attention_bias", "mlp_bias",
            "tie_word_embeddings", "sliding_window", "attention_sinks", "final_logit_softcapping",
            "zero_init_output_proj", "magnitude_preserving", "mp_residual_balance",
        )
    }  # fmt: skip
    try:
        config = GPT2AccelConfig(
            vocab_size=vocab_size,
            n_positions=m.n_positions,
            n_embd=m.n_embd,
            n_layer=m.n_layer,
            n_head=m.n_head,
            dropout=m.dropout if m.dropout is not None else 0.0,
            bias=m.bias,
            attn_type=m.attn_type or "SM",
            pad_vocab_size_multiple=m.pad_vocab_size_multiple,
            bos_token_id=eot_token_id,
            eos_token_id=eot_token_id,
            layer_types=layer_types,
            **modern,
        )
    except ValueError as e:
        raise RecipeError(str(e)) from None
    config._attn_implementation = m.attn_implementation
    return config


def validate(r: Recipe) -> None:
    """Check ranges and relations between keys; each message names the key(s) and the fix."""
    m, d, t = r.model, r.data, r.training
    for key in ("n_layer", "n_head", "n_embd", "n_positions", "pad_vocab_size_multiple"):
        _check(getattr(m, key) >= 1, f"{key} must be >= 1, got {getattr(m, key)}")
    _check(
        m.n_embd % m.n_head == 0,
        f"n_embd={m.n_embd} must be divisible by n_head={m.n_head}; change one of them",
    )
    _check(m.dropout is None or 0.0 <= m.dropout < 1.0, f"dropout must be in [0, 1), got {m.dropout}")
    _check(m.vocab_size is None or m.vocab_size >= 1, f"vocab_size must be >= 1, got {m.vocab_size}")
    _check(
        m.attn_implementation in ("sdpa", "eager"),
        f"attn_implementation must be 'sdpa' or 'eager', got {m.attn_implementation!r}",
    )
    if m.attn_type is not None:
        from .configuration_gpt2_accel import check_attn_type

        try:
            check_attn_type(m.attn_type)
        except ValueError as e:
            raise RecipeError(str(e)) from None
    if m.init_from == "scratch":  # the architecture keys, checked now rather than after the data is loaded
        model_config(m, m.vocab_size or 50257)
    names = d.dataset_name if isinstance(d.dataset_name, list) else [d.dataset_name]
    _check(len(names) >= 1 and all(names), "dataset_name must name at least one dataset")
    if d.dataset_weights is not None:
        _check(
            len(d.dataset_weights) == len(names),
            f"dataset_weights has {len(d.dataset_weights)} entries but dataset_name has {len(names)}; give one per dataset",
        )
        _check(
            all(w > 0 for w in d.dataset_weights),
            f"dataset_weights must be positive, got {d.dataset_weights}",
        )
    _check(0.0 <= d.validation_split_percentage < 100, "validation_split_percentage must be in [0, 100)")
    _check(d.block_size is None or d.block_size >= 1, f"block_size must be >= 1, got {d.block_size}")
    if d.block_size is not None and m.init_from == "scratch":
        _check(
            d.block_size <= m.n_positions,
            f"block_size={d.block_size} is longer than the model's context n_positions={m.n_positions}; "
            "lower block_size or raise n_positions",
        )
    _check(d.shuffle_buffer_size >= 0, "shuffle_buffer_size must be >= 0")
    _check(d.dataloader_num_workers >= 0, "dataloader_num_workers must be >= 0")
    _check(d.max_eval_samples >= 1, "max_eval_samples must be >= 1")
    for key in (
        "max_steps",
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
        "gradient_accumulation_steps",
        "logging_steps",
    ):
        _check(getattr(t, key) >= 1, f"{key} must be >= 1, got {getattr(t, key)}")
    for key in ("eval_steps", "save_steps", "warmup_steps"):
        _check(getattr(t, key) >= 0, f"{key} must be >= 0, got {getattr(t, key)}")
    _check(t.max_train_tokens is None or t.max_train_tokens >= 1, "max_train_tokens must be >= 1")
    _check(t.learning_rate > 0, f"learning_rate must be > 0, got {t.learning_rate}")
    _check(
        0 <= t.min_lr <= t.learning_rate, f"min_lr={t.min_lr} must be in [0, learning_rate={t.learning_rate}]"
    )
    _check(
        t.lr_scheduler_type in ("cosine", "linear", "constant", "warmup_stable_decay", "inverse_sqrt"),
        "lr_scheduler_type must be one of cosine, linear, constant, warmup_stable_decay, inverse_sqrt; "
        f"got {t.lr_scheduler_type!r}",
    )
    _check(0 < t.decay_ratio <= 1, f"decay_ratio must be in (0, 1], got {t.decay_ratio}")
    _check(t.weight_decay >= 0, "weight_decay must be >= 0")
    _check(0 <= t.adam_beta1 < 1 and 0 <= t.adam_beta2 < 1, "adam_beta1 and adam_beta2 must be in [0, 1)")
    _check(
        t.optim in ("adamw_torch", "adamw_torch_fused", "muon"),
        f"optim must be 'adamw_torch', 'adamw_torch_fused' or 'muon', got {t.optim!r}",
    )
    _check(t.muon_learning_rate > 0, f"muon_learning_rate must be > 0, got {t.muon_learning_rate}")
    _check(0 <= t.muon_momentum < 1, f"muon_momentum must be in [0, 1), got {t.muon_momentum}")
    _check(t.muon_weight_decay >= 0, f"muon_weight_decay must be >= 0, got {t.muon_weight_decay}")
    if t.ema_sigma_rels is not None:
        from .ema import SIGMA_REL_MAX

        _check(
            len(t.ema_sigma_rels) >= 1, "ema_sigma_rels must list at least one sigma_rel, or be null (off)"
        )
        bad = [s for s in t.ema_sigma_rels if not 0 < s < SIGMA_REL_MAX]
        _check(not bad, f"ema_sigma_rels {bad} must be in (0, {SIGMA_REL_MAX:.4f}); EDM2 tracks [0.05, 0.10]")
    _check(
        t.inverse_sqrt_timescale is None or t.inverse_sqrt_timescale >= 1,
        f"inverse_sqrt_timescale must be a number of steps >= 1 or null, got {t.inverse_sqrt_timescale}",
    )
    _check(t.ema_snapshot_steps >= 1, f"ema_snapshot_steps must be >= 1, got {t.ema_snapshot_steps}")
    _check(t.max_grad_norm >= 0, "max_grad_norm must be >= 0 (0 disables clipping)")
    _check(not (t.bf16 and t.fp16), "bf16 and fp16 are both true; choose one")
    _check(t.save_total_limit is None or t.save_total_limit >= 1, "save_total_limit must be >= 1 or null")
    _check(
        t.on_nonfinite in ("error", "skip"), f"on_nonfinite must be 'error' or 'skip', got {t.on_nonfinite!r}"
    )
    _check(
        t.hub_strategy in ("end", "every_save", "checkpoint"),
        f"hub_strategy must be 'end', 'every_save' or 'checkpoint', got {t.hub_strategy!r}",
    )
    from .logs import LEVELS

    _check(t.log_level in LEVELS, f"log_level must be one of {', '.join(LEVELS)}; got {t.log_level!r}")
    valid_trackers = {"none", "tensorboard", "wandb", "all"}
    bad = [x for x in t.report_to if x not in valid_trackers]
    _check(not bad, f"report_to has unknown tracker(s) {bad}; use any of {sorted(valid_trackers)}")
    _check(bool(t.output_dir), "output_dir must be set")
    _check(t.ddp_timeout > 0, "ddp_timeout must be > 0 (seconds)")
    p, kd = r.peft, r.distillation
    _check(p.lora_r >= 1, f"lora_r must be >= 1 (the adapter rank), got {p.lora_r}")
    _check(p.lora_alpha > 0, f"lora_alpha must be > 0, got {p.lora_alpha}")
    _check(0.0 <= p.lora_dropout < 1.0, f"lora_dropout must be in [0, 1), got {p.lora_dropout}")
    _check(kd.temperature > 0, f"temperature must be > 0, got {kd.temperature}")
    _check(
        0.0 <= kd.distillation_alpha <= 1.0,
        f"distillation_alpha must be in [0, 1], got {kd.distillation_alpha}",
    )
    if t.resume_from_checkpoint not in (None, "auto", "never"):
        _check(
            Path(t.resume_from_checkpoint).exists(),
            f"resume_from_checkpoint={t.resume_from_checkpoint!r} does not exist; use 'auto', 'never' or a checkpoint path",
        )


def help_text() -> str:
    """Every recipe key with its default and documentation, grouped by section."""
    lines = []
    for sec, cls in SECTIONS.items():
        lines.append(f"\n{sec} keys ({cls.__doc__.strip().splitlines()[0]})")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  --{f.name} (default: {default!r})\n      {f.metadata['help']}")
    return "\n".join(lines)
