"""Fold a magnitude-preserving (EDM2) model into a plain one that computes the same logits, so it exports.

A ``magnitude_preserving`` model (Karras et al. 2023, arXiv:2312.02696; modeling_gpt2_accel.py) differs from a plain
pre-norm GPT in constants only, and every constant folds into a weight:

- each matrix is used as ``gain * w_hat / sqrt(fan_in)`` (``MPLinear.mp_weight``): the folded model stores that
  matrix, computed by the model's own method in float64 (the saved rows are normalised already; the forward
  normalises them again, and the fold keeps exactly what the forward multiplies by);
- the MLP's activation is divided by its RMS over a unit normal input (EDM2's mp_silu, Sec. 2.5): a constant after
  a nonlinearity, folded into the next matrix, ``c_proj``;
- the residual sums are blends, ``x' = a x + b f(x)`` with ``a = (1-t)/n``, ``b = t/n``, ``n = sqrt((1-t)^2 + t^2)``
  (``mp_sum``, Sec. 2.5). Every sublayer reads the stream through a norm without gain (``norm_elementwise_affine``
  is False), which ignores the stream's scale, so with ``r = x / s`` the plain sum ``r' = r + (b / (a s)) f(r)``
  carries ``r' = x' / s'``, ``s' = a s``: the constant ``b / (a s)`` folds into the sublayer's ``c_proj``;
- the learned logit gain (EDM2's ``out_gain``) folds into the head. A tied head stays tied: the embedding is scaled
  by ``gain / sqrt(C)`` (the stream's scale is free, as above); with a gain <= 0 the head is untied.
- the token and position embeddings (unit-RMS rows, blended by mp_sum(tok, pos, 1/2)) are stored normalised.

What is not exact: a norm's epsilon. RMSNorm(x) = x / sqrt(mean(x^2) + eps) ignores x's scale only up to eps, and
the folded stream is the MP stream divided by s_l, a different s_l before every norm, while the exported classes
have one eps for all norms. Each norm would need eps * s_l^-2; the fold picks the one eps that minimises the largest
mismatch (:func:`_minimax_eps`): each residual norm's output then differs from the MP model's by a relative
``<= eps_deviation / 2`` (1e-5 * 0.6 / 2 = 3e-6 for the 4-layer speedrun model), below float32's accumulated
rounding in the logits (docs/export.md gives the measured logit differences). The QK-norms see the same scale in
both models; their q and k rows are scaled so the chosen eps is exact for them.

NanoChat (the standard class of rotary + ReLU^2 + QK-norm models such as recipes/speedrun.yaml) normalises the
embedding before the first block. The MP embedding's rows all have the same RMS (they are normalised in the forward
and re-normalised after every step), so that norm is a constant factor and the fold adds it when it makes the model
exportable; a table whose rows' RMS differ by more than :data:`ROW_RMS_TOLERANCE` is refused.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from .configuration_gpt2_accel import GPT2AccelConfig
from .modeling_gpt2_accel import MP_ACTIVATION_RMS, GPT2AccelForCausalLM, mp_normalize

# Largest relative spread of the normalised embedding rows' RMS for which an added embedding norm is exact to
# float32 (6e-8 per rounding): trained rows differ by ~1e-9 (they are re-normalised after every step).
ROW_RMS_TOLERANCE = 1e-6


@dataclass(frozen=True)
class FoldReport:
    """What the fold chose, and the one inexact part."""

    layer_norm_epsilon: float  # the plain model's norm epsilon
    eps_deviation: (
        float  # max over residual norms of |eps - eps' s_l^2| / eps: relative error <= eps * this / 2
    )
    tied: bool  # the plain model's head is tied to its embedding
    added_embedding_norm: bool  # norm_after_embedding added (NanoChat's layout)
    row_rms_spread: float  # relative spread of the embedding rows' RMS (matters with an added embedding norm)


def fold_magnitude_preserving(model: GPT2AccelForCausalLM) -> tuple[GPT2AccelForCausalLM, FoldReport]:
    """A plain (``magnitude_preserving=False``) model computing ``model``'s logits, and what the fold chose.

    ``model`` is not changed. The folded weights are computed in float64 and stored in ``model``'s dtype.
    """
    cfg = model.config
    if not cfg.magnitude_preserving:
        raise ValueError("fold_magnitude_preserving: the model is not magnitude_preserving; nothing to fold")
    if cfg.norm_elementwise_affine or cfg.attention_bias or cfg.mlp_bias:  # refused by the config already
        raise ValueError("magnitude_preserving models have no biases and no norm gains; this config has some")
    m = copy.deepcopy(model).double().eval()  # the model's own mp_weight() in float64
    C, L, eps = cfg.n_embd, cfg.n_layer, cfg.layer_norm_epsilon
    t = cfg.mp_residual_balance
    a, b = (1 - t) / math.hypot(1 - t, t), t / math.hypot(1 - t, t)  # mp_sum(x, f, t) = a x + b f
    learned = cfg.position_embedding_type == "learned"

    head = m.lm_head.mp_weight().detach()  # (V_padded, C): gain * w_hat / sqrt(C)
    gain = float(m.lm_head.gain.detach())
    tok = mp_normalize(m.transformer.wte.weight.detach())  # (V_padded, C): the rows the forward looks up
    pos = mp_normalize(m.transformer.wpe.weight.detach()) if learned else None  # (T, C)
    tied = bool(cfg.tie_word_embeddings) and gain > 0
    scale = gain / math.sqrt(C) if tied else 1.0  # embedding scale c: a tied head reuses c * tok

    add_norm = not cfg.norm_after_embedding and _needs_embedding_norm(cfg)
    has_norm = cfg.norm_after_embedding or add_norm
    rms2 = tok[: cfg.vocab_size].pow(2).mean(dim=1)  # (V,) squared RMS of each real row
    spread = float((rms2.sqrt() / rms2.mean().sqrt() - 1).abs().max())
    if add_norm and spread > ROW_RMS_TOLERANCE:
        raise ValueError(
            f"cannot fold this magnitude_preserving model exactly: its class ({cfg.mlp_type}, qk_norm, rope) exports "
            "as NanoChat, which normalises the embedding, and that equals this model only if its embedding rows have "
            f"one RMS; they differ by {spread:.1e} (tolerance {ROW_RMS_TOLERANCE:.0e}). Saved MP weights are "
            "re-normalised after every step by the trainer; were these trained or edited another way?"
        )
    # The stream entering the blocks: MP x0 = emb (rope) or (tok + pos) / sqrt(2) (mp_sum at 1/2), then ln_emb if
    # the model has one. Folded r0 = c * (tok [+ pos]), then ln_emb if the plain model has one. s0 = x0 / r0.
    s_pre = 1 / (scale * math.sqrt(2)) if learned else 1 / scale  # x_pre / r_pre
    m2 = float(
        rms2.mean()
    )  # mean(x_pre^2): rows of one RMS (rope); learned: the two tables' mean, cross term aside
    if learned:
        m2 = (m2 + float(pos.pow(2).mean())) / 2

    def s0_for(eps_new: float) -> float:
        if not has_norm:
            return s_pre
        # ln_emb'(r_pre) = x_pre / sqrt(m2 + eps' s_pre^2); the MP ln_emb (if any): x_pre / sqrt(m2 + eps)
        return math.sqrt(m2 + eps_new * s_pre**2) / (math.sqrt(m2 + eps) if cfg.norm_after_embedding else 1.0)

    new_eps, s0 = eps, s0_for(eps)
    for _ in range(
        8
    ):  # s0 depends on eps' only through eps' * s_pre^2 << m2 (an added ln_emb): a fixed point
        new_eps = _minimax_eps(eps, [s0 * a**j for j in range(2 * L + 1)])
        s0 = s0_for(new_eps)
    scales2 = [(s0 * a**j) ** 2 for j in range(2 * L + 1)]
    deviation = max(abs(1 - new_eps / eps * s2) for s2 in scales2) if eps > 0 else 0.0
    qk = (
        math.sqrt(new_eps / eps) if eps > 0 else 1.0
    )  # q, k rows scaled: q_norm(qk * q) with eps' = q_norm(q)

    state: dict[str, torch.Tensor] = {"transformer.wte.weight": scale * tok}
    if learned:
        state["transformer.wpe.weight"] = scale * pos
    if not tied:
        state["lm_head.weight"] = head
    act_scale = 1 / MP_ACTIVATION_RMS[cfg.mlp_type]
    for i, block in enumerate(m.transformer.h):
        p = f"transformer.h.{i}"
        s_attn, s_mlp = s0 * a ** (2 * i), s0 * a ** (2 * i + 1)  # x / r before each residual blend
        c_attn = block.attn.c_attn.mp_weight().detach().clone()  # (C + 2 kv, C)
        if cfg.qk_norm:
            c_attn[: C + cfg.n_kv_head * cfg.head_dim] *= qk
        state[f"{p}.attn.c_attn.weight"] = c_attn
        state[f"{p}.attn.c_proj.weight"] = b / (a * s_attn) * block.attn.c_proj.mp_weight().detach()
        state[f"{p}.mlp.c_fc.weight"] = block.mlp.c_fc.mp_weight().detach()
        state[f"{p}.mlp.c_proj.weight"] = b / (a * s_mlp) * act_scale * block.mlp.c_proj.mp_weight().detach()
        if cfg.attention_sinks:
            state[f"{p}.attn.sinks"] = block.attn.sinks.detach()

    plain = folded_config(cfg, layer_norm_epsilon=new_eps, tied=tied, norm_after_embedding=has_norm)
    from .convert import _build  # convert imports this module: a local import

    dtype = model.dtype
    folded = _build(GPT2AccelForCausalLM, plain, {k: v.to(dtype) for k, v in state.items()}, dtype)
    report = FoldReport(new_eps, deviation, tied, add_norm, spread)
    return folded.train(model.training), report


def plain_model(model: GPT2AccelForCausalLM) -> GPT2AccelForCausalLM:
    """``model`` itself, or its fold when it is magnitude-preserving: what every export starts from."""
    if not getattr(model.config, "magnitude_preserving", False):
        return model
    return fold_magnitude_preserving(model)[0]


def folded_config(
    cfg: GPT2AccelConfig,
    *,
    layer_norm_epsilon: float | None = None,
    tied: bool | None = None,
    norm_after_embedding: bool | None = None,
) -> GPT2AccelConfig:
    """The plain config a magnitude-preserving ``cfg`` folds into (the architecture: which class it exports as)."""
    d = cfg.to_dict()
    for key in (
        "magnitude_preserving",
        "mp_residual_balance",
        "architectures",
        "auto_map",
        "transformers_version",
    ):
        d.pop(key, None)
    d["layer_norm_epsilon"] = cfg.layer_norm_epsilon if layer_norm_epsilon is None else layer_norm_epsilon
    d["tie_word_embeddings"] = cfg.tie_word_embeddings if tied is None else tied
    if norm_after_embedding is None:
        norm_after_embedding = cfg.norm_after_embedding or _needs_embedding_norm(cfg)
    d["norm_after_embedding"] = norm_after_embedding
    return GPT2AccelConfig.from_dict(d)


def _needs_embedding_norm(cfg: GPT2AccelConfig) -> bool:
    """True when the plain model has a standard class only with a norm after the embedding (NanoChat), rotary only
    (with learned positions the stream's first RMS varies with the token and position)."""
    from .convert import export_class

    if cfg.norm_after_embedding or cfg.position_embedding_type != "rope":
        return False
    try:
        export_class(folded_config(cfg, norm_after_embedding=False))
        return False
    except ValueError:
        pass
    try:
        export_class(folded_config(cfg, norm_after_embedding=True))
        return True
    except ValueError:
        return False


def _minimax_eps(eps: float, scales: list[float]) -> float:
    """The one epsilon for norms whose inputs are the MP inputs divided by ``scales``: norm j would be exact with
    eps / s_j^2, and the relative error of its output is ~ eps |1 - (eps' / eps) s_j^2| / 2 for an input of unit
    RMS; eps' = 2 eps / (min s^2 + max s^2) makes the largest of those as small as one eps can."""
    s2 = [s * s for s in scales]
    return 2 * eps / (min(s2) + max(s2))
