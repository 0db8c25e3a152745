"""Convert between :class:`GPT2AccelForCausalLM` and the standard transformers classes that compute the same function.

``to_hf`` picks the class that expresses a config exactly (docs/architecture.md has the table):

- ``GPT2LMHeadModel``: learned positions, LayerNorm, GELU, multi-head softmax attention (GPT-2 itself);
- ``LlamaForCausalLM``: rotary (+YaRN), RMSNorm, SwiGLU, optional GQA and biases;
- ``Qwen3ForCausalLM``: Llama + QK-norm, optional sliding-window layers (``layer_types``);
- ``NanoChatForCausalLM``: rotary, parameter-free RMSNorm (also after the embedding), ReLU², QK-norm, optional
  GQA and logit soft-capping (Karpathy's nanochat).

A config no class expresses (GK/PA attention, sinks, ...) is refused with the options that prevent each class:
an export never computes something different. ``from_hf`` imports the same four classes.

GPT-2: the two networks are the same function; only the parameter layout differs. HF GPT-2 keeps OpenAI's TensorFlow
layout: its ``Conv1D`` layers store weights as (in, out) and compute ``x @ W + b``, while ours are ``nn.Linear``
with (out, in) weights, so every ``c_attn``/``c_proj``/``c_fc`` weight is transposed on the way through.
Everything else (embeddings, LayerNorms, biases, the q|k|v order inside ``c_attn``) maps one to one.

Command line::

    gpt2-accel convert --from-hf gpt2 --output runs/gpt2          # Hub id or local GPT2LMHeadModel directory
    gpt2-accel convert --to-hf runs/my-run --output exported/     # ours -> GPT-2 / Llama / Qwen3 / NanoChat
    gpt2-accel convert --from-hf my-llama-dir --output runs/llama  # a Llama / Qwen3 / NanoChat directory -> ours
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ._compat import moved_main
from .configuration_gpt2_accel import YARN_KEYS, GPT2AccelConfig
from .locate import OPENAI_GPT2_SIZES
from .modeling_gpt2_accel import GPT2AccelForCausalLM

# Weights stored as transformers Conv1D (in, out) in GPT2LMHeadModel, nn.Linear (out, in) in ours.
_CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Overrides that would change a weight's shape cannot be applied to converted weights.
_SHAPE_KEYS = ("vocab_size", "n_embd", "n_layer", "n_head", "n_inner", "bias")
# GPT-2's activation is GELU with the tanh approximation; transformers has three names for it.
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


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
            f"(e.g. {', '.join(OPENAI_GPT2_SIZES)}) needs the Hugging Face Hub or its files in the local cache; without "
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
    if unsupported:
        raise ValueError(
            f"this GPT-2 checkpoint uses features GPT2AccelForCausalLM lacks: {'; '.join(unsupported)}"
        )


# ------------------------------------------------------------------------------------ Llama-family (rotary) classes

# model_type -> the options it fixes. Each entry says what the class computes; _blockers compares a config to it.
_ROTARY_CLASSES = {
    "llama": dict(cls="LlamaForCausalLM", mlp_type="swiglu", qk_norm=False, norm_after_embedding=False),
    "qwen3": dict(cls="Qwen3ForCausalLM", mlp_type="swiglu", qk_norm=True, norm_after_embedding=False),
    "nanochat": dict(cls="NanoChatForCausalLM", mlp_type="relu2", qk_norm=True, norm_after_embedding=True),
}


def _blockers(cfg: GPT2AccelConfig, model_type: str) -> list[str]:
    """The options of ``cfg`` that the standard class ``model_type`` cannot compute (empty = exact export)."""
    b = []
    if cfg.attn_type != "SM":
        b.append(f"attn_type={cfg.attn_type!r} (only softmax attention exists there)")
    if cfg.attention_sinks:
        b.append("attention_sinks=True")
    if getattr(cfg, "magnitude_preserving", False):  # mp_sum residuals, normalised weights: fold them first
        b.append("magnitude_preserving=True (fold it first: gpt2_accel.fold.plain_model, as to_hf does)")
    if model_type == "gpt2":
        if cfg.position_embedding_type != "learned":
            b.append(f"position_embedding_type={cfg.position_embedding_type!r}")
        if cfg.norm_type != "layernorm":
            b.append(f"norm_type={cfg.norm_type!r}")
        if cfg.mlp_type != "gelu":
            b.append(f"mlp_type={cfg.mlp_type!r}")
        if cfg.n_kv_head != cfg.n_head:
            b.append(f"n_kv_head={cfg.n_kv_head}")
        if cfg.qk_norm:
            b.append("qk_norm=True")
        if cfg.norm_after_embedding:
            b.append("norm_after_embedding=True")
        if cfg.sliding_window is not None and "sliding_attention" in cfg.layer_types:
            b.append("sliding_window")
        if cfg.final_logit_softcapping:
            b.append("final_logit_softcapping")
        return b
    spec = _ROTARY_CLASSES[model_type]
    if cfg.position_embedding_type != "rope":
        b.append(f"position_embedding_type={cfg.position_embedding_type!r}")
    if cfg.norm_type != "rmsnorm":
        b.append(f"norm_type={cfg.norm_type!r}")
    for key in ("mlp_type", "qk_norm", "norm_after_embedding"):
        if getattr(cfg, key) != spec[key]:
            b.append(f"{key}={getattr(cfg, key)!r} (needs {spec[key]!r})")
    sliding = "sliding_attention" in cfg.layer_types
    if sliding and model_type != "qwen3":
        b.append("sliding_window (per-layer windows: Qwen3 only)")
    if cfg.final_logit_softcapping and model_type != "nanochat":
        b.append("final_logit_softcapping")
    if cfg.mlp_bias and model_type != "llama":
        b.append("mlp_bias=True")
    if model_type == "nanochat" and cfg.norm_elementwise_affine:
        b.append("norm_elementwise_affine=True (NanoChat's norms have no scale)")
    return b


def export_class(cfg: GPT2AccelConfig) -> str:
    """The model_type of the standard class that computes ``cfg`` exactly; a ValueError naming the blockers else.

    A magnitude-preserving config is judged by the plain config it folds into (gpt2_accel.fold): that is what
    :func:`to_hf` exports."""
    if getattr(cfg, "magnitude_preserving", False):
        from .fold import folded_config

        cfg = folded_config(cfg)
    blockers = {mt: _blockers(cfg, mt) for mt in ("gpt2", *_ROTARY_CLASSES)}
    for mt, b in blockers.items():
        if not b:
            return mt
    names = {"gpt2": "GPT2LMHeadModel", **{k: v["cls"] for k, v in _ROTARY_CLASSES.items()}}
    why = "; ".join(f"{names[mt]}: {', '.join(b)}" for mt, b in blockers.items())
    raise ValueError(
        "no standard transformers class computes this model exactly, so it is not exported (an export must give "
        f"the same logits). What each class lacks -> {why}. Share it with its own code instead: save_pretrained "
        "writes it for AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)"
    )


def _nanochat_flip(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Negate the second half of each head's rows (weight (nh * hs, C) or bias (nh * hs,)).

    NanoChat rotates by -angle (its rotate_half is [x2, -x1]; Llama's [-x2, x1]). With P = diag(1, -1) on each
    (x_i, x_{i + hs/2}) pair, P R(a) P = R(-a) and P preserves dot products and RMS norms, so flipping those rows
    of q and k turns one convention into the other exactly. P is its own inverse: the same map serves both ways.
    """
    hs = w.size(0) // n_heads
    sign = torch.ones(hs, dtype=w.dtype, device=w.device)
    sign[hs // 2 :] = -1
    shape = (n_heads, hs, *w.shape[1:])
    return (w.reshape(shape) * sign.view(1, hs, *([1] * (w.dim() - 1)))).reshape(w.shape)


def _rotary_config(cfg: GPT2AccelConfig, model_type: str):
    """The transformers config of ``model_type`` with ``cfg``'s architecture."""
    from transformers import AutoConfig

    kwargs = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.n_embd,
        intermediate_size=cfg.mlp_hidden_size,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.n_positions,
        rms_norm_eps=cfg.layer_norm_epsilon,
        rope_parameters=dict(cfg.rope_parameters),
        attention_bias=cfg.attention_bias,
        attention_dropout=cfg.dropout,
        initializer_range=cfg.initializer_range,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
    )
    if model_type == "llama":
        kwargs.update(hidden_act="silu", mlp_bias=cfg.mlp_bias)
    elif model_type == "qwen3":
        sliding = "sliding_attention" in cfg.layer_types
        kwargs.update(
            hidden_act="silu",
            use_sliding_window=sliding,
            sliding_window=cfg.sliding_window if sliding else None,
            layer_types=list(cfg.layer_types),
        )
    else:  # nanochat
        kwargs.update(hidden_act="relu2", final_logit_softcapping=cfg.final_logit_softcapping)
        kwargs.pop("head_dim")
    return AutoConfig.for_model(model_type, **kwargs)


def _rotary_renames(model_type: str) -> dict[str, str]:
    """Our per-layer tensors that map one to one onto the Llama / Qwen3 / NanoChat ones (names without the layer
    prefix and the .weight/.bias suffix), for both directions. ``c_attn`` ([q; k; v]) and SwiGLU's ``c_fc``
    ([gate; up]) are split or joined by the converters themselves."""
    names = {"attn.c_proj": "self_attn.o_proj"}
    if model_type == "nanochat":  # parameter-free norms; fc1 -> relu^2 -> fc2
        names |= {"mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    else:
        names |= {
            "ln_1": "input_layernorm",
            "ln_2": "post_attention_layernorm",
            "mlp.c_proj": "mlp.down_proj",
        }
    if model_type == "qwen3":
        names |= {"attn.q_norm": "self_attn.q_norm", "attn.k_norm": "self_attn.k_norm"}
    return names


def _ones_if_missing(state: dict, name: str, size: int, like: torch.Tensor) -> torch.Tensor:
    return state[name] if name in state else like.new_ones(size)  # a parameter-free norm = a unit gain


def _to_rotary_state(model: GPT2AccelForCausalLM, model_type: str) -> dict[str, torch.Tensor]:
    cfg = model.config
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    C, kv = cfg.n_embd, cfg.n_kv_head * cfg.head_dim
    inner = cfg.mlp_hidden_size
    emb = sd["transformer.wte.weight"][: cfg.vocab_size]
    out = {"model.embed_tokens.weight": emb}
    nano = model_type == "nanochat"
    renames = _rotary_renames(model_type)
    for i in range(cfg.n_layer):
        p, o = f"transformer.h.{i}", f"model.layers.{i}"
        for kind in ("weight", "bias"):
            t = sd.get(f"{p}.attn.c_attn.{kind}")  # [q; k; v] -> q_proj, k_proj, v_proj
            if t is not None:
                q, k, v = t.split([C, kv, kv])
                if nano:
                    q, k = _nanochat_flip(q, cfg.n_head), _nanochat_flip(k, cfg.n_kv_head)
                out[f"{o}.self_attn.q_proj.{kind}"], out[f"{o}.self_attn.k_proj.{kind}"] = q, k
                out[f"{o}.self_attn.v_proj.{kind}"] = v
            fc = sd.get(f"{p}.mlp.c_fc.{kind}")  # SwiGLU's [gate; up] -> gate_proj, up_proj
            if fc is not None and not nano:
                out[f"{o}.mlp.gate_proj.{kind}"], out[f"{o}.mlp.up_proj.{kind}"] = fc[:inner], fc[inner:]
        for ours, theirs in renames.items():
            for kind in ("weight", "bias"):
                if f"{p}.{ours}.{kind}" in sd:
                    out[f"{o}.{theirs}.{kind}"] = sd[f"{p}.{ours}.{kind}"]
        for ours, size in (
            ("ln_1", C),
            ("ln_2", C),
            ("attn.q_norm", cfg.head_dim),
            ("attn.k_norm", cfg.head_dim),
        ):
            if ours in renames:  # a parameter-free norm (norm_elementwise_affine: false) = a unit gain
                out.setdefault(f"{o}.{renames[ours]}.weight", emb.new_ones(size))
    if not nano:
        out["model.norm.weight"] = _ones_if_missing(sd, "transformer.ln_f.weight", C, emb)
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"][: cfg.vocab_size]
    return {k: v.contiguous().clone() for k, v in out.items()}


def to_hf(model: GPT2AccelForCausalLM):
    """Our model as the standard transformers class that computes it exactly (see :func:`export_class`).

    A magnitude-preserving model is first folded into the plain model with the same logits (gpt2_accel.fold)."""
    from transformers import AutoModelForCausalLM

    from .fold import plain_model

    model = plain_model(model)
    model_type = export_class(model.config)
    if model_type == "gpt2":
        return to_hf_gpt2(model)
    hf_config = _rotary_config(model.config, model_type)
    hf = _build(AutoModelForCausalLM.from_config, hf_config, _to_rotary_state(model, model_type), model.dtype)
    return hf.train(model.training)


def _from_rotary(hf, **config_overrides) -> GPT2AccelForCausalLM:
    """A Llama / Qwen3 / NanoChat transformers model as ours (the inverse of :func:`to_hf`)."""
    src, model_type = hf.config, hf.config.model_type
    C, nh = src.hidden_size, src.num_attention_heads
    nkv = getattr(src, "num_key_value_heads", None) or nh
    head_dim = getattr(src, "head_dim", None) or C // nh
    problems = []
    if head_dim * nh != C:
        problems.append(f"head_dim={head_dim} with {nh} heads != hidden_size={C}")
    act = {"llama": "silu", "qwen3": "silu", "nanochat": "relu2"}[model_type]
    if src.hidden_act != act:
        problems.append(f"hidden_act={src.hidden_act!r} (needs {act!r})")
    rope = dict(src.rope_parameters or {})
    if rope.get("rope_type", "default") not in ("default", "yarn"):
        problems.append(f"rope_type={rope.get('rope_type')!r} (implemented: default, yarn)")
    if (
        getattr(src, "partial_rotary_factor", None) not in (None, 1.0)
        or rope.get("partial_rotary_factor", 1.0) != 1.0
    ):
        problems.append("partial rotary embeddings")
    if problems:
        raise ValueError(
            f"this {type(hf).__name__} uses features GPT2AccelForCausalLM lacks: {'; '.join(problems)}"
        )
    rope = {k: v for k, v in rope.items() if k in ("rope_theta", *YARN_KEYS) and v is not None}
    layer_types = getattr(src, "layer_types", None)
    sliding = (
        getattr(src, "sliding_window", None) if layer_types and "sliding_attention" in layer_types else None
    )
    spec = _ROTARY_CLASSES[model_type]
    kwargs = dict(
        vocab_size=src.vocab_size,
        n_positions=src.max_position_embeddings,
        n_embd=C,
        n_layer=src.num_hidden_layers,
        n_head=nh,
        n_kv_head=nkv,
        n_inner=src.intermediate_size,
        dropout=float(getattr(src, "attention_dropout", 0.0) or 0.0),
        bias=False,
        attention_bias=bool(getattr(src, "attention_bias", False)),
        mlp_bias=bool(getattr(src, "mlp_bias", False)),
        layer_norm_epsilon=src.rms_norm_eps,
        initializer_range=src.initializer_range,
        position_embedding_type="rope",
        rope_parameters=rope,
        norm_type="rmsnorm",
        norm_elementwise_affine=model_type != "nanochat",
        norm_after_embedding=spec["norm_after_embedding"],
        mlp_type=spec["mlp_type"],
        qk_norm=spec["qk_norm"],
        sliding_window=sliding,
        layer_types=list(layer_types) if sliding else None,
        final_logit_softcapping=getattr(src, "final_logit_softcapping", None),
        tie_word_embeddings=bool(src.tie_word_embeddings),
        bos_token_id=src.bos_token_id if isinstance(src.bos_token_id, int) else None,
        eos_token_id=src.eos_token_id if isinstance(src.eos_token_id, int) else None,
    )
    # attn_type, dropout, n_positions, pad_vocab_size_multiple may change; the architecture keys may not.
    fixed = sorted(k for k in config_overrides if k in kwargs and k not in ("dropout", "n_positions"))
    if fixed:
        raise ValueError(
            f"cannot override {fixed} when converting: they fix the pretrained weights' function"
        )
    kwargs.update(config_overrides)
    if kwargs["n_positions"] > src.max_position_embeddings:
        raise ValueError(
            f"n_positions={kwargs['n_positions']} exceeds the checkpoint's {src.max_position_embeddings}"
        )
    config = GPT2AccelConfig(**kwargs)

    sd = {k: v.detach() for k, v in hf.state_dict().items()}
    nano = model_type == "nanochat"
    emb = sd["model.embed_tokens.weight"]
    pad = config.padded_vocab_size - emb.size(0)
    state = {"transformer.wte.weight": torch.cat([emb, emb.new_zeros(pad, C)]) if pad else emb}
    renames = _rotary_renames(model_type)
    for i in range(config.n_layer):
        p, o = f"transformer.h.{i}", f"model.layers.{i}"
        for kind in ("weight", "bias"):
            q = sd.get(f"{o}.self_attn.q_proj.{kind}")  # q_proj, k_proj, v_proj -> [q; k; v]
            if q is not None:
                k, v = sd[f"{o}.self_attn.k_proj.{kind}"], sd[f"{o}.self_attn.v_proj.{kind}"]
                if nano:
                    q, k = _nanochat_flip(q, nh), _nanochat_flip(k, nkv)
                state[f"{p}.attn.c_attn.{kind}"] = torch.cat([q, k, v])
            if not nano and f"{o}.mlp.gate_proj.{kind}" in sd:  # gate_proj, up_proj -> [gate; up]
                state[f"{p}.mlp.c_fc.{kind}"] = torch.cat(
                    [sd[f"{o}.mlp.gate_proj.{kind}"], sd[f"{o}.mlp.up_proj.{kind}"]]
                )
        for ours, theirs in renames.items():
            for kind in ("weight", "bias"):
                if f"{o}.{theirs}.{kind}" in sd:
                    state[f"{p}.{ours}.{kind}"] = sd[f"{o}.{theirs}.{kind}"]
    if not nano:
        state["transformer.ln_f.weight"] = sd["model.norm.weight"]
    if not config.tie_word_embeddings:
        head = sd["lm_head.weight"]
        state["lm_head.weight"] = torch.cat([head, head.new_zeros(pad, C)]) if pad else head
    state = {k: v.contiguous().clone() for k, v in state.items()}
    model = _build(GPT2AccelForCausalLM, config, state, dtype=hf.dtype)
    return model.train(hf.training)


def from_hf(model_or_path: torch.nn.Module | str | os.PathLike, **config_overrides) -> GPT2AccelForCausalLM:
    """A transformers GPT-2, Llama, Qwen3 or NanoChat model (instance, local directory or Hub id) as ours, computing
    the same logits. ``config_overrides`` as :func:`from_hf_gpt2` (GPT-2) or dropout / n_positions (the others)."""
    if isinstance(model_or_path, torch.nn.Module):
        hf = model_or_path
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        path = Path(model_or_path)
        model_type = AutoConfig.from_pretrained(path).model_type if path.is_dir() else "gpt2"
        if model_type == "gpt2":
            return from_hf_gpt2(model_or_path, **config_overrides)
        if model_type not in _ROTARY_CLASSES:
            raise ValueError(
                f"{str(model_or_path)!r} holds a model_type={model_type!r} model; --from-hf converts gpt2, "
                f"{', '.join(_ROTARY_CLASSES)}. A gpt2_accel directory loads directly with "
                "AutoModelForCausalLM.from_pretrained"
            )
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model_type = getattr(hf.config, "model_type", None)
    if model_type == "gpt2":
        return from_hf_gpt2(hf, **config_overrides)
    if model_type not in _ROTARY_CLASSES:
        raise TypeError(
            f"expected a GPT-2, Llama, Qwen3 or NanoChat transformers model, got {type(hf).__name__}"
        )
    return _from_rotary(hf, **config_overrides)


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
        tie_word_embeddings=bool(getattr(src, "tie_word_embeddings", True)),
    )
    kwargs.update(config_overrides)
    config = GPT2AccelConfig(**kwargs)

    state = {}
    for name, tensor in hf.state_dict().items():
        if (name == "lm_head.weight" and config.tie_word_embeddings) or name.endswith(
            (".attn.bias", ".attn.masked_bias")
        ):
            continue  # tied to wte / causal-mask buffers of older transformers versions
        tensor = tensor.detach()
        if name.endswith(_CONV1D_SUFFIXES):
            tensor = tensor.t()  # Conv1D (in, out) -> Linear (out, in)
        elif name == "transformer.wpe.weight":
            tensor = tensor[:n_positions]
        elif (
            name in ("transformer.wte.weight", "lm_head.weight") and config.padded_vocab_size > src.vocab_size
        ):
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
    blockers = _blockers(cfg, "gpt2")
    if blockers:
        raise ValueError(f"to_hf_gpt2: GPT2LMHeadModel cannot compute {', '.join(blockers)}; use to_hf")
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
        tie_word_embeddings=cfg.tie_word_embeddings,
    )
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        tensor = tensor.detach()
        if name.endswith(_CONV1D_SUFFIXES):
            tensor = tensor.t()  # Linear (out, in) -> Conv1D (in, out)
        elif name in ("transformer.wte.weight", "lm_head.weight"):
            tensor = tensor[: cfg.vocab_size]
        state[name] = tensor.contiguous().clone()
    # GPT-2 always has biases and norm gains: zeros / ones reproduce bias-free layers and parameter-free norms.
    ref = state["transformer.wte.weight"]
    for i in range(cfg.n_layer):
        for norm in (f"transformer.h.{i}.ln_1", f"transformer.h.{i}.ln_2"):
            state.setdefault(f"{norm}.weight", ref.new_ones(cfg.n_embd))
    state.setdefault("transformer.ln_f.weight", ref.new_ones(cfg.n_embd))
    for name, tensor in list(state.items()):
        if name.endswith(".weight") and not name.startswith(
            ("transformer.wte", "transformer.wpe", "lm_head")
        ):
            w = tensor.t() if name.endswith(_CONV1D_SUFFIXES) else tensor  # back to (out, in) / (C,)
            state.setdefault(name[: -len("weight")] + "bias", tensor.new_zeros(w.size(0)))
    hf = _build(GPT2LMHeadModel, hf_config, state, dtype=model.dtype)
    return hf.train(model.training)


def _build(cls, config, state: dict[str, torch.Tensor], dtype: torch.dtype):
    """Instantiate ``cls(config)`` without random init (it is overwritten) and load ``state`` strictly."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - transformers < 5
        from transformers.modeling_utils import no_init_weights

    with no_init_weights():
        model = cls(config)  # a class, or a factory such as AutoModelForCausalLM.from_config
    model.to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
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


__getattr__ = moved_main(__name__, "convert")  # `gpt2_accel.convert.main` keeps working


if __name__ == "__main__":  # `python -m gpt2_accel.convert` runs the command, which lives in gpt2_accel/cli/
    from .cli.convert import main

    raise SystemExit(main())
