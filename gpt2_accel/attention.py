"""Causal attention variants as pure functions of (q, k, v).

``attn_type`` selects the variant (d = head size, j <= i causal):

- ``SM``: softmax attention, y_i = sum_j softmax_j(q_i . k_j / sqrt(d)) v_j.
- ``GK``: unnormalised Gaussian kernel, y_i = sum_j exp(-||q_i - k_j||^2 / (2 sqrt(d))) v_j.
- ``GKpoly-<n>``: GK with exp(x) replaced by (1 + x / 2^n)^(2^n) (n squarings).
- ``PA_<act>``: y_i = (1 / n_positions) * sum_j act(q_i . k_j / sqrt(d)) v_j, any elementwise activation.

Two implementations: ``"eager"`` is the formula with a materialised Tq x Tk matrix (the reference), ``"sdpa"``
is the fast path: torch's fused softmax kernels for SM, a softmax kernel plus a "sentinel" key for GK (see
:func:`_gk_sdpa`; without gradients on CPU, the flash kernel's log-sum-exp instead, :func:`_gk_lse`), and query
blocks of ``BLOCK_SIZE`` rows, recomputed in backward, for GKpoly and PA, so no variant holds a T x T matrix. docs/attention.md has the derivations, costs and numerical caveats.

Options that compose with every variant (docs/architecture.md): grouped-query attention (keys/values with fewer
heads than the queries; softmax hands them to SDPA with ``enable_gqa``, the others repeat them), sliding windows
(query i sees keys j with i - window < j <= i, transformers' convention; softmax without a padding mask runs in
query blocks that see only their band, never a T x T mask) and, for softmax only, learned attention sinks
(gpt-oss: one logit per head joins every softmax normaliser; the sink's own value is zero).

This file imports only torch: it is copied next to the weights for ``trust_remote_code`` users.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# Query rows per block in the blocked path (GKpoly, PA, GK with dropout): peak memory is
# O(B * nh * BLOCK_SIZE * Tk) instead of O(B * nh * Tq * Tk). 256 rows keep each block's matmul large enough to
# run near full speed while a T=1024 block stays at 1/4 of the full matrix; smaller blocks only cost speed.
BLOCK_SIZE = 256

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "sigmoid": torch.sigmoid,
    "square": torch.square,
    "relu_square": lambda x: F.relu(x).square(),
    "tanh": torch.tanh,
    "silu": F.silu,
}

VALID_FORMS = "SM, GK, GKpoly-<n> (n = 1..16), PA_<activation> (e.g. PA_relu, PA_gelu, PA_sigmoid, PA_square, PA_relu_square)"


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The elementwise activation of ``PA_<name>``: the table above, else any torch.nn.functional / torch name."""
    if name in _ACTIVATIONS:
        return _ACTIVATIONS[name]
    fn = getattr(F, name, None) or getattr(torch, name, None)
    if fn is None or not callable(fn) or name.startswith("_"):
        raise ValueError(
            f"attn_type='PA_{name}': unknown activation {name!r}; use one of {sorted(_ACTIVATIONS)} or the name of an "
            f"elementwise torch.nn.functional / torch function (e.g. PA_softplus); valid forms: {VALID_FORMS}"
        )
    return fn


def parse_attn_type(attn_type: str) -> tuple[str, int | Callable[[torch.Tensor], torch.Tensor] | None]:
    """Split ``attn_type`` into (kind, parameter): ("SM", None), ("GK", None), ("GKpoly", n), ("PA", act).

    Raises a ValueError listing the valid forms for anything else.
    """
    if attn_type in ("SM", "GK"):
        return attn_type, None
    if isinstance(attn_type, str) and attn_type.startswith("GKpoly-") and attn_type[7:].isdigit():
        n = int(attn_type[7:])
        if 1 <= n <= 16:
            return "GKpoly", n
    if isinstance(attn_type, str) and attn_type.startswith("PA_") and len(attn_type) > 3:
        return "PA", _activation(attn_type[3:])
    raise ValueError(f"attn_type={attn_type!r} is not a valid attention type; valid forms: {VALID_FORMS}")


def _causal_mask(
    t_q: int, t_k: int, device: torch.device, q_start: int | None = None, window: int | None = None
) -> torch.Tensor:
    # Query i sits at absolute position t_k - t_q + i (the last t_q keys are the queries' own positions, as
    # with a KV cache); it may attend to keys j <= that position, and with a window only to j > position - window.
    # ``q_start`` overrides the first query's position.
    start = t_k - t_q if q_start is None else q_start
    q_pos = torch.arange(start, start + t_q, device=device)[:, None]
    k_pos = torch.arange(t_k, device=device)[None, :]
    mask = k_pos <= q_pos  # (Tq, Tk) bool
    if window is not None:
        mask = mask & (k_pos > q_pos - window)
    return mask


def _gk_exponent(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """x_ij = -||q_i - k_j||^2 / (2 sqrt d), expanded as (2 q.k - ||q||^2 - ||k||^2) / (2 sqrt d). (.., Tq, Tk)"""
    d = q.size(-1)
    q2 = q.square().sum(-1, keepdim=True)  # (B, nh, Tq, 1)
    k2 = k.square().sum(-1).unsqueeze(-2)  # (B, nh, 1, Tk)
    # Clamp at 0: rounding in the expansion can make a distance slightly negative when q_i ~ k_j.
    return -(q2 + k2 - 2 * (q @ k.transpose(-2, -1))).clamp_min(0) / (2 * math.sqrt(d))


def _weights(q: torch.Tensor, k: torch.Tensor, kind: str, param, mask: torch.Tensor) -> torch.Tensor:
    """Unnormalised attention weights w_ij of the non-softmax variants, exactly 0 where ``mask`` is False."""
    if kind in ("GK", "GKpoly"):
        arg = _gk_exponent(q, k)  # (.., Tq, Tk)
    else:
        arg = (q / math.sqrt(q.size(-1))) @ k.transpose(-2, -1)  # (.., Tq, Tk)
    # Masked / future positions get argument 0 before the weight function and weight 0 after it. Zeroing the
    # argument keeps an overflowing weight there (GKpoly of a far key, square of a huge score) from turning the
    # gradient into 0 * inf = NaN; torch.where then makes their contribution exactly 0. (The seed fork filled
    # them with -inf after the activation, which turned every row but the last into NaN/inf.)
    arg = arg.masked_fill(~mask, 0.0)
    if kind == "GK":
        w = torch.exp(arg)
    elif kind == "GKpoly":
        # (1 + x/2^n)^(2^n) by n squarings; diverges from exp(x) for x < -2^(n+1) (docs/attention.md).
        w = 1 + arg / 2**param
        for _ in range(param):
            w = w * w
    else:
        # PA: the constant c = 1 / n_positions is applied to the output in _eager (a (Tq, hs) op, not (Tq, Tk)).
        w = param(arg)
    return torch.where(mask, w, 0.0)


def _eager(q, k, v, kind, param, n_positions, mask, dropout_p, sinks=None) -> torch.Tensor:
    """The reference: materialise the (.., Tq, Tk) weights. ``mask`` is boolean, True = may attend."""
    if kind == "SM":
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
        scores = scores.masked_fill(~mask, float("-inf"))  # (B, nh, Tq, Tk)
        if sinks is not None:
            # gpt-oss: the sink logit joins the normaliser, then its column is dropped (its value is zero).
            sink = sinks.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)  # (B, nh, Tq, 1)
            att = torch.cat([scores, sink], dim=-1).softmax(dim=-1)[..., :-1]
        else:
            att = scores.softmax(dim=-1)
        att = torch.nan_to_num(att)  # rows with no visible key (padding only) give 0, not NaN
    else:
        att = _weights(q, k, kind, param, mask)
    if dropout_p > 0.0:
        att = F.dropout(att, p=dropout_p)
    y = att @ v  # (B, nh, Tq, hs)
    if kind == "PA":
        # The fork's 1/T scaling with T fixed to n_positions: training (T = block size = n_positions) is the
        # fork's, and a query's output does not depend on how many tokens follow it (causal, cache-consistent).
        y = y / n_positions
    return y


def _blocked(
    q, k, v, kind, param, n_positions, attention_mask, dropout_p, block_size, window=None
) -> torch.Tensor:
    """The eager formula in query blocks: each block only sees the keys up to its last position, and when
    gradients are needed it is recomputed in backward (torch.utils.checkpoint), so neither pass keeps more than
    one (.., block, Tk) matrix alive."""
    t_q, t_k = q.size(-2), k.size(-2)
    offset = t_k - t_q  # absolute position of query 0
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    outs = []
    for s in range(0, t_q, block_size):
        e = min(s + block_size, t_q)
        if attention_mask is None:
            kv_end = offset + e  # keys past the block's last query are all in the future
            # keys before the first query's window are invisible to the whole block
            kv_start = 0 if window is None else max(0, offset + s - window + 1)
            mask = _causal_mask(
                e - s, kv_end - kv_start, q.device, q_start=offset + s - kv_start, window=window
            )  # (bq, kv_end - kv_start)
        else:
            kv_start, kv_end = 0, t_k
            mask = attention_mask[..., s:e, :] if attention_mask.size(-2) > 1 else attention_mask
        args = (
            q[..., s:e, :],
            k[..., kv_start:kv_end, :],
            v[..., kv_start:kv_end, :],
            kind,
            param,
            n_positions,
            mask,
            dropout_p,
        )
        if need_grad:
            # preserve_rng_state (default) replays the same dropout mask in the recomputation.
            outs.append(checkpoint(_eager, *args, use_reentrant=False))
        else:
            outs.append(_eager(*args))
    return torch.cat(outs, dim=-2)  # (B, nh, Tq, hs)


def _sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    dropout_p: float,
    sinks: torch.Tensor | None,
) -> torch.Tensor:
    """One fused softmax call: ``mask`` (True = attend) or ``causal`` (square, top-left) or neither (all keys).

    Keys/values may have fewer heads than the queries (GQA: ``enable_gqa``, no repeated copy). Sinks ride on an
    extra channel: q' = [q, s_h sqrt(d)], k' = [k, 0] and a sink key [0, ..., 0, 1] with value 0 give the sink the
    score q'.k'_sink / sqrt(d) = s_h for every query, and real keys their usual q.k / sqrt(d); softmax over
    [sink, keys] is then exactly gpt-oss's, with no T x T matrix.
    """
    gqa = q.size(1) != k.size(1)
    if sinks is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout_p, enable_gqa=gqa
        )
    B, H, t_q, d = q.shape
    H_kv, t_k = k.size(1), k.size(-2)
    scale = 1.0 / math.sqrt(d)
    sink_q = (sinks.to(q.dtype) / scale).view(1, H, 1, 1).expand(B, H, t_q, 1)
    qa = torch.cat([q, sink_q], dim=-1)  # (B, nh, Tq, hs + 1)
    ka = torch.cat([k, k.new_zeros(B, H_kv, t_k, 1)], dim=-1)  # (B, nkv, Tk, hs + 1)
    sink_k = torch.cat([k.new_zeros(B, H_kv, 1, d), k.new_ones(B, H_kv, 1, 1)], dim=-1)  # (B, nkv, 1, hs + 1)
    ka = torch.cat([sink_k, ka], dim=-2)  # (B, nkv, 1 + Tk, hs + 1)
    va = torch.cat([v.new_zeros(B, H_kv, 1, d + 1), F.pad(v, (0, 1))], dim=-2)  # (B, nkv, 1 + Tk, hs + 1)
    if q.device.type == "cuda":  # the fused CUDA kernels want a head size that is a multiple of 8
        pad = (-(d + 1)) % 8
        qa, ka, va = (F.pad(t, (0, pad)) for t in (qa, ka, va))
    if causal:
        # A dummy query in front: the (1 + T) x (1 + T) top-left causal mask then lets query i see the sink and
        # keys 0..i, without a mask tensor (the trick of _gk_sdpa).
        qa = torch.cat([qa.new_zeros(B, H, 1, qa.size(-1)), qa], dim=-2)
        out = F.scaled_dot_product_attention(
            qa, ka, va, is_causal=True, dropout_p=dropout_p, scale=scale, enable_gqa=gqa
        )[..., 1:, :]
    else:
        if mask is not None:
            mask = mask.expand(*mask.shape[:-2], t_q, t_k)
            mask = torch.cat([torch.ones_like(mask[..., :1]), mask], dim=-1)  # the sink is always visible
        out = F.scaled_dot_product_attention(
            qa, ka, va, attn_mask=mask, dropout_p=dropout_p, scale=scale, enable_gqa=gqa
        )
    return out[..., :d]  # (B, nh, Tq, hs)


def _softmax_sdpa(q, k, v, attention_mask, dropout_p, window, sinks) -> torch.Tensor:
    """Softmax attention through SDPA: causal without a mask tensor where possible; a sliding window in query
    blocks that each see only their band of keys (``BLOCK_SIZE`` or ``window`` rows, whichever is larger), so
    memory is O(T * (block + window)) instead of O(T^2)."""
    t_q, t_k = q.size(-2), k.size(-2)
    if attention_mask is not None:
        return _sdpa(q, k, v, attention_mask, False, dropout_p, sinks)
    if window is None:
        if t_q == t_k:
            return _sdpa(q, k, v, None, True, dropout_p, sinks)
        if t_q == 1:  # one decoded token sees every cached key: no mask to build
            return _sdpa(q, k, v, None, False, dropout_p, sinks)
        return _sdpa(q, k, v, _causal_mask(t_q, t_k, q.device), False, dropout_p, sinks)
    offset = t_k - t_q
    rows = max(BLOCK_SIZE, window)
    outs = []
    for s in range(0, t_q, rows):
        e = min(s + rows, t_q)
        kv_start, kv_end = max(0, offset + s - window + 1), offset + e
        mask = _causal_mask(e - s, kv_end - kv_start, q.device, q_start=offset + s - kv_start, window=window)
        outs.append(
            _sdpa(
                q[..., s:e, :],
                k[..., kv_start:kv_end, :],
                v[..., kv_start:kv_end, :],
                mask,
                False,
                dropout_p,
                sinks,
            )
        )
    return torch.cat(outs, dim=-2)  # (B, nh, Tq, hs)


def _gk_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """GK through torch's fused softmax attention, with full autograd and no T x T matrix.

    -||q_i - k_j||^2/2 = q_i.k_j - ||q_i||^2/2 - ||k_j||^2/2 is a dot product of augmented vectors
    q'_i = [q_i, -||q_i||^2/2, 1] and k'_j = [k_j, 1, -||k_j||^2/2]; with scale 1/sqrt(d) its softmax weights are
    g_ij / Z_i, g_ij the GK weights and Z_i = sum_j g_ij. A sentinel key k'_* = 0 (score 0, i.e. weight 1),
    visible to every query, with value [0, ..., 0, 1] while the real values get a 0 in that channel, makes the
    last output channel 1 / (1 + Z_i) and the others sum_j g_ij v_j / (1 + Z_i): their ratio is y_i. All scores
    are <= 0 = the sentinel's, so the kernel's running max is the sentinel and nothing over/underflows:
    1 / (1 + Z_i) lies in [1/(Tk + 1), 1]. Follows the issue author's measurement on torch 2.13 CPU (issue 10).
    """
    d = q.size(-1)
    B, H, t_q, _ = q.shape
    t_k = k.size(-2)
    pad = 0
    if q.device.type == "cuda":  # the fused CUDA kernels want a head size that is a multiple of 8
        pad = (-(d + 2)) % 8
    ones_q = q.new_ones(B, H, t_q, 1)
    qa = torch.cat([q, -0.5 * q.square().sum(-1, keepdim=True), ones_q], dim=-1)  # (B, nh, Tq, hs + 2)
    ka = torch.cat(
        [k, k.new_ones(*k.shape[:-1], 1), -0.5 * k.square().sum(-1, keepdim=True)], dim=-1
    )  # (.., Tk, hs+2)
    va = torch.cat([v, v.new_zeros(*v.shape[:-1], 2)], dim=-1)  # (B, nh, Tk, hs + 2); channel hs = 0
    sentinel_k = ka.new_zeros(*ka.shape[:-2], 1, d + 2)  # score 0 for every query
    sentinel_v = va.new_zeros(*va.shape[:-2], 1, d + 2)
    sentinel_v[..., d] = 1.0
    ka = torch.cat([sentinel_k.expand(B, H, 1, d + 2), ka], dim=-2)  # (B, nh, 1 + Tk, hs + 2)
    va = torch.cat([sentinel_v.expand(B, H, 1, d + 2), va], dim=-2)  # (B, nh, 1 + Tk, hs + 2)
    if pad:
        qa, ka, va = (F.pad(t, (0, pad)) for t in (qa, ka, va))
    scale = 1.0 / math.sqrt(d)
    if attention_mask is None and t_q == 1:
        out = F.scaled_dot_product_attention(qa, ka, va, scale=scale)  # one new token sees every key: no mask
    elif attention_mask is None and t_q == t_k:
        # A dummy query in front makes the (1 + T) x (1 + T) top-left causal mask of is_causal=True let query i
        # see the sentinel and keys 0..i, with no mask tensor at all.
        qa = torch.cat([qa.new_zeros(B, H, 1, qa.size(-1)), qa], dim=-2)  # (B, nh, 1 + T, hs + 2)
        out = F.scaled_dot_product_attention(qa, ka, va, is_causal=True, scale=scale)[..., 1:, :]
    else:
        if attention_mask is None:
            attention_mask = _causal_mask(t_q, t_k, q.device)  # (Tq, Tk): small when decoding with a cache
        attention_mask = attention_mask.expand(*attention_mask.shape[:-2], t_q, t_k)
        keep = torch.ones(*attention_mask.shape[:-1], 1, dtype=torch.bool, device=q.device)
        mask = torch.cat([keep, attention_mask], dim=-1)  # (.., Tq, 1 + Tk): the sentinel is always visible
        out = F.scaled_dot_product_attention(qa, ka, va, attn_mask=mask, scale=scale)
    return out[..., :d] / out[..., d : d + 1]  # (B, nh, Tq, hs)


def _flash_lse_op():
    # A private ATen op (torch >= 2.2, CPU only): the only fused kernel that returns the log-sum-exp, which the
    # public F.scaled_dot_product_attention does not. Absent or renamed in another torch: the sentinel path.
    try:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    except (AttributeError, RuntimeError):
        return None


_FLASH_LSE = _flash_lse_op()


def _gk_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor | None:
    """GK forward without autograd through the CPU flash kernel's log-sum-exp; None where it does not apply.

    x_ij = (2 q_i.k_j - ||q_i||^2 - ||k_j||^2) / (2 sqrt d): with scale 1/sqrt(d) and the per-key additive bias
    b_j = -||k_j||^2 / (2 sqrt d), the kernel returns o_i = sum_j e^(s_ij) v_j / sum_j e^(s_ij) and
    lse_i = log sum_j e^(s_ij), s_ij = q_i.k_j / sqrt(d) + b_j = x_ij + ||q_i||^2 / (2 sqrt d). Hence
    y_i = o_i * exp(lse_i - ||q_i||^2 / (2 sqrt d)) = o_i * sum_j exp(x_ij): the factor is taken in log space and
    is at most Tk (every x_ij <= 0), so it cannot overflow however large the norms (the kernel subtracts its own
    running maximum). Issue 10's measurement (torch 2.13 CPU, B=4, 6 heads, T=1024, d=64): 33 ms vs 394 ms naive.
    The op's log-sum-exp output carries no gradient, hence forward-only.
    """
    if _FLASH_LSE is None or q.device.type != "cpu" or q.dtype not in (torch.float32, torch.float64):
        return None
    d = q.size(-1)
    t_q, t_k = q.size(-2), k.size(-2)
    scale = 1.0 / math.sqrt(d)
    bias = (k.square().sum(-1) * (-0.5 * scale)).unsqueeze(-2)  # (B, nh, 1, Tk)
    q_half_sq = q.square().sum(-1, keepdim=True) * (0.5 * scale)  # (B, nh, Tq, 1)

    def part(kk: torch.Tensor, vv: torch.Tensor, mask: torch.Tensor, is_causal: bool) -> torch.Tensor:
        out, lse = _FLASH_LSE(q, kk, vv, is_causal=is_causal, attn_mask=mask, scale=scale)
        return out * torch.exp(lse.unsqueeze(-1) - q_half_sq)  # (B, nh, Tq, hs)

    try:
        if attention_mask is not None:
            # Additive mask: -inf where masked, the key bias elsewhere. (B, nh, Tq, Tk) like the caller's mask.
            add = torch.where(attention_mask, bias, float("-inf"))
            y = part(k, v, add, False)
            # A row with no visible key must be exactly 0; don't trust the kernel's lse for an all -inf row.
            return torch.where(attention_mask.any(-1, keepdim=True), y, 0.0)
        if t_q == 1:
            return part(k, v, bias, False)  # one new token sees every key
        if t_q == t_k:
            return part(k, v, bias, True)
        # Tq < Tk: the kernel's is_causal is top-left aligned (query i sees keys 0..i; checked on torch 2.13),
        # but query i sits at position Tk - Tq + i. Split the keys instead of building a Tq x Tk mask: the
        # prefix is visible to every query, the last Tq keys form a square causal block; the two partial sums
        # of exp(x_ij) v_j simply add.
        p = t_k - t_q
        prefix = part(k[..., :p, :], v[..., :p, :], bias[..., :p].contiguous(), False)
        return prefix + part(k[..., p:, :], v[..., p:, :], bias[..., p:].contiguous(), True)
    except (RuntimeError, NotImplementedError):
        return None  # a kernel that rejects these inputs (another torch version): use the sentinel path


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_type: str = "SM",
    n_positions: int = 1024,
    *,
    attention_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    implementation: str = "sdpa",
    sliding_window: int | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of queries (B, nh, Tq, hs) over keys/values (B, nkv, Tk, hs), Tk >= Tq, nh % nkv == 0.

    Without ``attention_mask`` the queries are the last Tq positions and attend causally, to at most
    ``sliding_window`` keys each (themselves included) when it is set. A boolean ``attention_mask``
    broadcastable to (B, nh, Tq, Tk) (True = may attend) replaces that rule; the caller includes causality and
    any window in it. ``sinks`` (nh,) are gpt-oss's per-head sink logits (softmax only). ``implementation`` is
    ``"sdpa"`` (fast kernels, no T x T matrix without a mask) or ``"eager"`` (the formula with a materialised
    Tq x Tk matrix, the reference). ``n_positions`` is the PA constant's denominator. Returns (B, nh, Tq, hs).
    """
    kind, param = parse_attn_type(attn_type)
    if implementation not in ("sdpa", "eager"):
        raise ValueError(f"implementation={implementation!r} is not known; use 'sdpa' or 'eager'")
    t_q, t_k = q.size(-2), k.size(-2)
    if t_k < t_q:
        raise ValueError(
            f"got {t_q} queries but only {t_k} keys; keys must include the queries' own positions"
        )
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        raise ValueError(f"attention_mask must be boolean (True = may attend), got {attention_mask.dtype}")
    if q.size(1) % k.size(1) != 0 or k.size(1) != v.size(1):
        raise ValueError(f"{q.size(1)} query heads cannot share {k.size(1)} key / {v.size(1)} value heads")
    if sinks is not None and kind != "SM":
        raise ValueError(
            f"attention sinks need softmax attention (attn_type='SM'), got attn_type={attn_type!r}"
        )

    window = None
    if sliding_window is not None and attention_mask is None:
        # Keys before the first query's window are invisible to every query: drop them (a decoded token then
        # sees exactly its last `sliding_window` keys, with no mask at all).
        first = max(0, t_k - t_q - sliding_window + 1)
        k, v = k[..., first:, :], v[..., first:, :]
        t_k = k.size(-2)
        window = sliding_window if t_q > 1 and sliding_window < t_k else None

    if kind == "SM" and implementation == "sdpa":
        return _softmax_sdpa(q, k, v, attention_mask, dropout_p, window, sinks)
    if k.size(1) != q.size(1):
        # The reference and the research variants take one key/value head per query head: repeat them here
        # (head h uses key/value head h // group, the order of SDPA's enable_gqa and transformers' repeat_kv).
        k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)  # (B, nh, Tk, hs)
        v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)  # (B, nh, Tk, hs)

    in_dtype = q.dtype
    if kind in ("GK", "GKpoly") and in_dtype in (torch.float16, torch.bfloat16):
        # ||q||^2 + ||k||^2 - 2 q.k cancels: in 16-bit a distance would be off by ~1e-2 * ||q||^2, an error that
        # the exponential amplifies. Compute these in fp32 and hand back the input dtype.
        q, k, v = q.float(), k.float(), v.float()
    if kind in ("GK", "GKpoly"):
        # ||q - k|| is translation invariant, but its expansion ||q||^2 + ||k||^2 - 2 q.k loses ~eps * ||q||^2 to
        # cancellation, and the c_attn biases give q and k a shared offset. Measure both from the first key (the
        # same for every query and every decoding step, so outputs stay causal and cache-consistent). It is
        # detached: the exact derivative with respect to the shift is zero.
        center = k[..., :1, :].detach()  # (B, nh, 1, hs)
        q, k = q - center, k - center
    with torch.autocast(q.device.type, enabled=False):
        if implementation == "eager":
            if attention_mask is None:
                attention_mask = _causal_mask(t_q, t_k, q.device, window=window)
            y = _eager(q, k, v, kind, param, n_positions, attention_mask, dropout_p, sinks)
        elif kind == "GK" and dropout_p == 0.0:
            if window is not None:  # the fused GK paths take a (Tq, Tk) mask for the band
                attention_mask = _causal_mask(t_q, t_k, q.device, window=window)
            y = None
            if not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))):
                # Evaluation / generation: ~1.4x faster than the sentinel path (docs/attention.md), no gradient.
                y = _gk_lse(q, k, v, attention_mask)
            if y is None:
                y = _gk_sdpa(q, k, v, attention_mask)
        else:
            # GKpoly / PA (and GK with dropout, which would drop the sentinel): exact formula, bounded memory.
            y = _blocked(q, k, v, kind, param, n_positions, attention_mask, dropout_p, BLOCK_SIZE, window)
    return y.to(in_dtype)
