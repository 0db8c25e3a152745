"""Convert between transformers' ``GPT2LMHeadModel`` (model_type ``gpt2``) and :class:`GPT2AccelForCausalLM`.

The two networks are the same function; only the parameter layout differs. HF GPT-2 keeps OpenAI's TensorFlow
layout: its ``Conv1D`` layers store weights as (in, out) and compute ``x @ W + b``, while ours are ``nn.Linear``
with (out, in) weights, so every ``c_attn``/``c_proj``/``c_fc`` weight is transposed on the way through.
Everything else (embeddings, LayerNorms, biases, the q|k|v order inside ``c_attn``) maps one to one.

Command line::

    gpt2-accel convert --from-hf gpt2 --output runs/gpt2          # Hub id or local GPT2LMHeadModel directory
    gpt2-accel convert --to-hf runs/my-run --output exported/     # our directory (or Hub id) -> vanilla GPT-2
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from .configuration_gpt2_accel import GPT2AccelConfig
from .modeling_gpt2_accel import GPT2AccelForCausalLM

# Weights stored as transformers Conv1D (in, out) in GPT2LMHeadModel, nn.Linear (out, in) in ours.
_CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Overrides that would change a weight's shape cannot be applied to converted weights.
_SHAPE_KEYS = ("vocab_size", "n_embd", "n_layer", "n_head", "n_inner", "bias")
# GPT-2's activation is GELU with the tanh approximation; transformers has three names for it.
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
_HUB_MODELS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


def _hub_offline() -> bool:
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    if any(f.upper() in ("1", "ON", "YES", "TRUE") for f in flags):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _load_hf_gpt2(source: str | os.PathLike):
    """A GPT2LMHeadModel from a local directory or a Hub id, with errors that say what to do."""
    from transformers import AutoConfig, GPT2LMHeadModel

    path = Path(source)
    if path.is_dir():
        model_type = AutoConfig.from_pretrained(path).model_type
        if model_type != "gpt2":
            raise ValueError(
                f"{str(source)!r} holds a model_type={model_type!r} model, not a transformers GPT-2 (model_type "
                "'gpt2'); from_hf_gpt2 converts GPT2LMHeadModel checkpoints. A gpt2_accel directory loads directly "
                "with AutoModelForCausalLM.from_pretrained"
            )
        return GPT2LMHeadModel.from_pretrained(path, dtype=torch.float32)
    # Hub ids are "name" or "org/name"; anything else that is not a directory is a mistyped path.
    if path.exists() or str(source).startswith((".", "/", "~")) or str(source).count("/") > 1:
        raise FileNotFoundError(
            f"{str(source)!r} is not a directory; pass a local GPT-2 directory or a Hub id"
        )
    offline = _hub_offline()
    try:
        return GPT2LMHeadModel.from_pretrained(str(source), dtype=torch.float32, local_files_only=offline)
    except OSError as e:
        why = (
            "the Hugging Face Hub is offline (HF_HUB_OFFLINE=1)"
            if offline
            else f"the Hub download failed ({e})"
        )
        raise OSError(
            f"cannot load GPT-2 {str(source)!r}: it is not a local directory and {why}. Converting a Hub model "
            f"(e.g. {', '.join(_HUB_MODELS)}) needs the Hugging Face Hub or its files in the local cache; without "
            "network, download it elsewhere (`hf download gpt2 --local-dir gpt2`) and pass that directory"
        ) from e


def _check_hf_config(cfg) -> None:
    unsupported = []
    if cfg.activation_function not in _TANH_GELU:
        unsupported.append(
            f"activation_function={cfg.activation_function!r} (ours is GELU-tanh: {_TANH_GELU})"
        )
    if not cfg.scale_attn_weights or cfg.scale_attn_by_inverse_layer_idx:
        unsupported.append("attention scaling other than 1/sqrt(head_dim)")
    if getattr(cfg, "add_cross_attention", False):
        unsupported.append("cross-attention")
    if not getattr(cfg, "tie_word_embeddings", True):
        unsupported.append("untied lm_head")
    if unsupported:
        raise ValueError(
            f"this GPT-2 checkpoint uses features GPT2AccelForCausalLM lacks: {'; '.join(unsupported)}"
        )


def from_hf_gpt2(
    model_or_path: torch.nn.Module | str | os.PathLike, **config_overrides
) -> GPT2AccelForCausalLM:
    """Convert a transformers ``GPT2LMHeadModel`` (an instance, a local directory or a Hub id) into ours.

    ``config_overrides`` set fields of :class:`GPT2AccelConfig` that do not change weight shapes, e.g.
    ``dropout=0.1``, ``attn_type="GK"``, ``pad_vocab_size_multiple=64`` (extra rows are zeros and never predicted)
    or a smaller ``n_positions`` (the position table is cropped, as nanoGPT's ``crop_block_size``).
    With no override the model computes exactly the source's logits. Weights keep the source's dtype.
    """
    hf = model_or_path if isinstance(model_or_path, torch.nn.Module) else _load_hf_gpt2(model_or_path)
    if getattr(hf.config, "model_type", None) != "gpt2" or not hasattr(hf, "transformer"):
        raise TypeError(f"expected a transformers GPT2LMHeadModel, got {type(hf).__name__}")
    src = hf.config
    _check_hf_config(src)
    fixed = sorted(k for k in config_overrides if k in _SHAPE_KEYS)
    if fixed:
        raise ValueError(
            f"cannot override {fixed} when converting: they fix the shape of the pretrained weights"
        )
    n_positions = config_overrides.pop("n_positions", src.n_positions)
    if n_positions > src.n_positions:
        raise ValueError(
            f"n_positions={n_positions} exceeds the checkpoint's {src.n_positions} learned positions"
        )
    drops = {src.resid_pdrop, src.embd_pdrop, src.attn_pdrop}
    kwargs = dict(
        vocab_size=src.vocab_size,
        n_positions=n_positions,
        n_embd=src.n_embd,
        n_layer=src.n_layer,
        n_head=src.n_head,
        n_inner=src.n_inner,
        dropout=max(drops),  # GPT-2 uses one rate (0.1) for all three; we have a single knob
        bias=True,
        layer_norm_epsilon=src.layer_norm_epsilon,
        initializer_range=src.initializer_range,
        bos_token_id=src.bos_token_id,
        eos_token_id=src.eos_token_id,
    )
    kwargs.update(config_overrides)
    config = GPT2AccelConfig(**kwargs)

    state = {}
    for name, tensor in hf.state_dict().items():
        if name == "lm_head.weight" or name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # tied to wte / causal-mask buffers of older transformers versions
        tensor = tensor.detach()
        if name.endswith(_CONV1D_SUFFIXES):
            tensor = tensor.t()  # Conv1D (in, out) -> Linear (out, in)
        elif name == "transformer.wpe.weight":
            tensor = tensor[:n_positions]
        elif name == "transformer.wte.weight" and config.padded_vocab_size > src.vocab_size:
            pad = tensor.new_zeros(config.padded_vocab_size - src.vocab_size, tensor.size(1))
            tensor = torch.cat([tensor, pad])  # padded ids never occur in inputs and are cut from the logits
        state[name] = tensor.contiguous().clone()
    model = _build(GPT2AccelForCausalLM, config, state, dtype=hf.dtype)
    return model.train(hf.training)


def to_hf_gpt2(model: GPT2AccelForCausalLM):
    """Convert ours into a vanilla transformers ``GPT2LMHeadModel`` (model_type ``gpt2``, no remote code).

    Only softmax attention (``attn_type="SM"``) exists in GPT-2. Padded vocabulary rows are dropped; a model
    without biases gets zero biases (the same function). Dropout rates all become ``config.dropout``.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = model.config
    if cfg.attn_type != "SM":
        raise ValueError(
            f"to_hf_gpt2: attn_type={cfg.attn_type!r} has no GPT2LMHeadModel equivalent (GPT-2 only has softmax "
            "attention, 'SM'). Share this model with its own code instead: save_pretrained writes it for "
            "AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)"
        )
    hf_config = GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.n_positions,
        n_ctx=cfg.n_positions,  # GPT-2's older name for the context; llama.cpp's converter requires it
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_inner=cfg.n_inner,
        activation_function="gelu_new",
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        layer_norm_epsilon=cfg.layer_norm_epsilon,
        initializer_range=cfg.initializer_range,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        tie_word_embeddings=True,
    )
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        tensor = tensor.detach()
        if name.endswith(_CONV1D_SUFFIXES):
            tensor = tensor.t()  # Linear (out, in) -> Conv1D (in, out)
        elif name == "transformer.wte.weight":
            tensor = tensor[: cfg.vocab_size]
        state[name] = tensor.contiguous().clone()
    if not cfg.bias:  # GPT-2 always has biases: zeros reproduce a bias-free layer exactly
        for name, tensor in list(state.items()):
            if name.endswith(".weight") and "wte" not in name and "wpe" not in name:
                state[name[: -len("weight")] + "bias"] = tensor.new_zeros(tensor.size(-1))  # (out,) / (C,)
    hf = _build(GPT2LMHeadModel, hf_config, state, dtype=model.dtype)
    return hf.train(model.training)


def _build(cls, config, state: dict[str, torch.Tensor], dtype: torch.dtype):
    """Instantiate ``cls(config)`` without random init (it is overwritten) and load ``state`` strictly."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - transformers < 5
        from transformers.modeling_utils import no_init_weights

    with no_init_weights():
        model = cls(config)
    model.to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"conversion bug: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model


# ------------------------------------------------------------------------------------------------ command line


def _save_tokenizer(source: str, output: Path, vocab_size: int) -> str:
    """Copy the source's tokenizer to ``output``; fall back to the bundled GPT-2 BPE when the vocabulary is GPT-2's."""
    from transformers import AutoTokenizer

    files = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    is_dir = Path(source).is_dir()
    tokenizer = None
    if not is_dir or any((Path(source) / f).exists() for f in files):
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=_hub_offline() or is_dir)
        except (OSError, ValueError, TypeError):
            tokenizer = None
    # transformers 5 builds an EMPTY tokenizer from a bare config.json (model_type gpt2): treat that as none.
    if tokenizer is not None and len(tokenizer) > 1:
        tokenizer.save_pretrained(output)
        return f"tokenizer from {source}"
    if vocab_size == 50257:
        from .tokenization import get_tokenizer

        get_tokenizer("gpt2").save_pretrained(output)
        return "bundled GPT-2 tokenizer"
    return f"no tokenizer (none in {source} and vocab_size={vocab_size} is not GPT-2's)"


def _load_ours(source: str) -> GPT2AccelForCausalLM:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, local_files_only=_hub_offline() or Path(source).is_dir()
        )
    except OSError as e:
        raise OSError(
            f"cannot load {source!r}: expected a gpt2_accel model directory (or a Hub id reachable online): {e}"
        ) from e
    if not isinstance(model, GPT2AccelForCausalLM):
        raise ValueError(
            f"{source!r} holds a {type(model).__name__}, not a GPT2AccelForCausalLM; --to-hf exports gpt2_accel "
            "models (use --from-hf to import a GPT-2)"
        )
    return model


def main(argv: list[str] | None = None) -> int:
    """``gpt2-accel convert``: import a GPT-2 (``--from-hf``) or export to vanilla GPT-2 (``--to-hf``)."""
    parser = argparse.ArgumentParser(
        prog="gpt2-accel convert",
        description="Convert between transformers GPT-2 (GPT2LMHeadModel) and gpt2_accel checkpoints.",
    )
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument(
        "--from-hf", metavar="SRC", help="GPT2LMHeadModel directory or Hub id (gpt2, gpt2-xl...)"
    )
    direction.add_argument("--to-hf", metavar="SRC", help="gpt2_accel model directory or Hub id")
    parser.add_argument("--output", "-o", required=True, metavar="DIR", help="directory to write")
    parser.add_argument("--attn-type", help="--from-hf only: attention variant of the new model (default SM)")
    parser.add_argument("--dropout", type=float, help="--from-hf only: dropout of the new model")
    parser.add_argument(
        "--pad-vocab-size-multiple",
        type=int,
        help="--from-hf only: pad the embedding rows (64 -> 50304 for GPT-2)",
    )
    from .cli import accept_both_spellings

    accept_both_spellings(parser)
    args = parser.parse_args(argv)

    output = Path(args.output)
    try:
        if args.from_hf:
            overrides = {
                k: v
                for k, v in dict(
                    attn_type=args.attn_type,
                    dropout=args.dropout,
                    pad_vocab_size_multiple=args.pad_vocab_size_multiple,
                ).items()
                if v is not None
            }
            source = args.from_hf
            model = from_hf_gpt2(source, **overrides)
        else:
            if args.attn_type or args.dropout is not None or args.pad_vocab_size_multiple:
                parser.error("--attn-type/--dropout/--pad-vocab-size-multiple apply to --from-hf only")
            source = args.to_hf
            model = to_hf_gpt2(_load_ours(source))
        model.save_pretrained(output)
        tok = _save_tokenizer(source, output, model.config.vocab_size)
    except (OSError, ValueError, TypeError) as e:
        parser.exit(2, f"gpt2-accel convert: error: {e}\n")
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {type(model).__name__} ({n / 1e6:.1f}M parameters) and {tok} to {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
