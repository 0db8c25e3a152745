"""Attention variants (SM, GK, GKpoly-<n>, PA_<act>): formula, causality, masks, KV cache, model wiring.

The reference is a float64 evaluation of each variant's definition written independently of attention.py
(direct ||q - k||^2, no expansion), see docs/attention.md.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from gpt2_accel import GPT2AccelConfig, GPT2AccelForCausalLM
from gpt2_accel import attention as attn_mod
from gpt2_accel.attention import causal_attention
from gpt2_accel.modeling_gpt2_accel import CACHE_FIELD
from gpt2_accel.recipe import load_recipe

VARIANTS = [
    "SM",
    "GK",
    "GKpoly-1",
    "GKpoly-3",
    "PA_relu",
    "PA_gelu",
    "PA_sigmoid",
    "PA_square",
    "PA_relu_square",
]
IMPLS = ["sdpa", "eager"]
N_POSITIONS = 64
RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes" / "attention").glob("*.yaml"))

ACTS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "sigmoid": torch.sigmoid,
    "square": torch.square,
    "relu_square": lambda x: F.relu(x) ** 2,
}


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    # Several query blocks even at T = 40, so the blocked path's block boundaries are exercised.
    monkeypatch.setattr(attn_mod, "BLOCK_SIZE", 16)


def reference(q, k, v, attn_type: str, mask: torch.Tensor, n_positions: int = N_POSITIONS) -> torch.Tensor:
    """The definition in float64; ``mask`` (.., Tq, Tk) bool, True = may attend."""
    q, k, v = q.double(), k.double(), v.double()
    d = q.size(-1)
    dots = q @ k.transpose(-2, -1) / math.sqrt(d)  # (B, nh, Tq, Tk)
    if attn_type == "SM":
        w = dots.masked_fill(~mask, float("-inf")).softmax(-1).nan_to_num()
        return w @ v
    if attn_type.startswith("GK"):
        x = -(q[..., :, None, :] - k[..., None, :, :]).square().sum(-1) / (2 * math.sqrt(d))
        if attn_type == "GK":
            w = x.exp()
        else:
            big_n = 2 ** int(attn_type.split("-")[1])
            w = (1 + x / big_n) ** big_n
        return torch.where(mask, w, 0.0) @ v
    act = ACTS[attn_type[3:]]
    return torch.where(mask, act(dots), 0.0) @ v / n_positions


def causal(t_q: int, t_k: int) -> torch.Tensor:
    return torch.arange(t_k)[None, :] <= torch.arange(t_k - t_q, t_k)[:, None]  # (Tq, Tk)


def make_qkv(b=2, h=3, t=40, hs=16, seed=0, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    # scale 0.5 keeps the GK exponent x around -1 (|x| < 4 = GKpoly-1's valid bound 2^(n+1)).
    return [(scale * torch.randn(b, h, t, hs, generator=g)).requires_grad_(True) for _ in range(3)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b).abs().max() / b.abs().max()).item()


def tol(attn_type: str) -> float:
    return 1e-4 if attn_type.startswith("GKpoly") else 1e-5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("attn_type", VARIANTS)
def test_forward_and_grads_match_float64_formula(attn_type, impl):
    q, k, v = make_qkv()
    y = causal_attention(q, k, v, attn_type, N_POSITIONS, implementation=impl)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(y, (q, k, v), g)

    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    y64 = reference(q64, k64, v64, attn_type, causal(40, 40))
    grads64 = torch.autograd.grad(y64, (q64, k64, v64), g.double())

    assert y.dtype == torch.float32 and y.shape == q.shape
    assert rel_err(y, y64) <= tol(attn_type)
    for name, a, b in zip("qkv", grads, grads64):
        assert rel_err(a, b) <= tol(attn_type), f"grad of {name}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("attn_type", VARIANTS)
def test_no_output_depends_on_a_future_position(attn_type, impl):
    q, k, v = (t.detach() for t in make_qkv())
    y = causal_attention(q, k, v, attn_type, N_POSITIONS, implementation=impl)
    cut = 21  # change keys and values at positions >= cut
    k2, v2 = k.clone(), v.clone()
    k2[..., cut:, :] += 3.0
    v2[..., cut:, :] = torch.randn_like(v2[..., cut:, :])
    y2 = causal_attention(q, k2, v2, attn_type, N_POSITIONS, implementation=impl)
    torch.testing.assert_close(y2[..., :cut, :], y[..., :cut, :], rtol=1e-6, atol=1e-7)
    assert not torch.allclose(y2[..., cut:, :], y[..., cut:, :])  # the change is visible where it may be


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("attn_type", VARIANTS)
def test_kv_cache_queries_are_the_last_positions(attn_type, impl):
    """Tq < Tk (decoding with a cache): the queries are the last Tq positions, as in the full computation."""
    q, k, v = (t.detach() for t in make_qkv())
    full = causal_attention(q, k, v, attn_type, N_POSITIONS, implementation=impl)
    for t_q in (1, 5):
        part = causal_attention(q[..., -t_q:, :], k, v, attn_type, N_POSITIONS, implementation=impl)
        torch.testing.assert_close(part, full[..., -t_q:, :], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("attn_type", VARIANTS)
def test_left_padding_mask_matches_formula(attn_type, impl):
    """A boolean (B, 1, Tq, Tk) mask (causal & not padding, as the model builds it) replaces the causal rule."""
    t = 24
    q, k, v = make_qkv(t=t)
    keep = torch.ones(2, t, dtype=torch.bool)
    keep[0, :7] = False  # row 0 is left-padded by 7 tokens
    mask = causal(t, t)[None, None] & keep[:, None, None, :]  # (B, 1, T, T)
    mask = mask | ~mask.any(-1, keepdim=True)  # padding queries see everything (their output is unused)
    y = causal_attention(q, k, v, attn_type, N_POSITIONS, attention_mask=mask, implementation=impl)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad(y, (q, k, v), g)
    q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    y64 = reference(q64, k64, v64, attn_type, mask)
    grads64 = torch.autograd.grad(y64, (q64, k64, v64), g.double())
    assert rel_err(y, y64) <= tol(attn_type)
    for a, b in zip(grads, grads64):
        assert rel_err(a, b) <= tol(attn_type)


@pytest.mark.parametrize("attn_type", ["SM", "GK", "GKpoly-2", "PA_relu"])
def test_fully_masked_rows_give_zero_not_nan(attn_type):
    q, k, v = (t.detach() for t in make_qkv(t=8))
    mask = causal(8, 8).clone()
    mask[3] = False  # query 3 may attend to nothing
    for impl in ("eager",) if attn_type == "SM" else IMPLS:  # SM's fused kernel is torch's (NaN) behaviour
        y = causal_attention(q, k, v, attn_type, N_POSITIONS, attention_mask=mask, implementation=impl)
        assert torch.isfinite(y).all()
        assert (y[..., 3, :] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_gk_accurate_for_large_shared_offset(impl):
    """q and k sharing a large offset (the c_attn biases) would make ||q||^2 + ||k||^2 - 2 q.k cancel."""
    q, k, v = (t.detach() for t in make_qkv())
    q, k = q + 30.0, k + 30.0  # ||q||^2 / (2 sqrt d) ~ 1800
    y = causal_attention(q, k, v, "GK", N_POSITIONS, implementation=impl)
    assert rel_err(y, reference(q, k, v, "GK", causal(40, 40))) <= 1e-5


def test_gk_far_keys_underflow_to_zero_without_nan():
    """Keys far from every query: the exact output is ~exp(-1e4), i.e. 0 in fp32, and gradients stay finite."""
    q, k, v = make_qkv(t=16)
    with torch.no_grad():
        q[..., 1:, :] += 100.0  # queries 1.. are far from every key
    y = causal_attention(q, k, v, "GK", N_POSITIONS)
    y.sum().backward()
    assert torch.isfinite(y).all() and (y[..., 1:, :].abs() < 1e-30).all()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


# -- GK without gradients: the CPU flash kernel's log-sum-exp (attention._gk_lse) ----------------------------


@pytest.fixture
def lse_calls(monkeypatch) -> list[int]:
    """Counts calls of the log-sum-exp kernel, so a test can tell which GK path ran."""
    if attn_mod._FLASH_LSE is None:
        pytest.skip("this torch has no aten._scaled_dot_product_flash_attention_for_cpu")
    calls = [0]
    op = attn_mod._FLASH_LSE

    def counting(*args, **kwargs):
        calls[0] += 1
        return op(*args, **kwargs)

    monkeypatch.setattr(attn_mod, "_FLASH_LSE", counting)
    return calls


def left_padding_mask(t: int) -> torch.Tensor:
    keep = torch.ones(2, t, dtype=torch.bool)
    keep[0, :7] = False  # row 0 is left-padded by 7 tokens: its first 7 queries see no key at all
    return causal(t, t)[None, None] & keep[:, None, None, :]  # (B, 1, T, T)


@pytest.mark.parametrize("offset", [0.0, 30.0])
@pytest.mark.parametrize("case", ["causal", "kv_cache_1", "kv_cache_5", "left_padding"])
def test_gk_no_grad_fast_path_matches_float64(case, offset, lse_calls):
    """Under no_grad (evaluation, generation) GK takes the log-sum-exp kernel and matches the definition to 1e-5,
    also with a large shared offset of q and k (exponent and log-sum-exp ~ 1800, which the centering removes)."""
    t = 24
    q, k, v = make_qkv(t=t)  # they require grad: no_grad alone must select the fast path
    q, k = q + offset, k + offset
    mask = left_padding_mask(t) if case == "left_padding" else None
    t_q = {"kv_cache_1": 1, "kv_cache_5": 5}.get(case, t)
    with torch.no_grad():
        y = causal_attention(q[..., -t_q:, :], k, v, "GK", attention_mask=mask)
    ref = reference(q[..., -t_q:, :], k, v, "GK", causal(t_q, t) if mask is None else mask)
    assert lse_calls[0] >= 1
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    assert rel_err(y, ref) <= 1e-5
    if case == "left_padding":
        assert (y[0, :, :7] == 0).all()  # queries with no visible key give 0, not NaN


def test_gk_fast_path_only_without_gradients(lse_calls):
    """inference_mode and detached inputs take the kernel too; with gradients the sentinel path runs and the
    gradient is there."""
    q, k, v = make_qkv(t=16)
    with torch.inference_mode():
        y_inf = causal_attention(q, k, v, "GK")
    y_detached = causal_attention(q.detach(), k.detach(), v.detach(), "GK")
    assert lse_calls[0] == 2
    y = causal_attention(q, k, v, "GK")
    assert lse_calls[0] == 2 and y.requires_grad
    torch.testing.assert_close(y_inf, y.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y_detached, y.detach(), rtol=1e-5, atol=1e-6)


def test_gk_no_grad_large_norms_do_not_overflow(lse_calls):
    """||q||^2 / (2 sqrt d) ~ 1e4 (queries far from every key): the rescaling exp(lse - ||q||^2 / (2 sqrt d)) is
    taken in log space, so the result is the exact fp32 value 0 (exp(-1e4)), not inf * 0 = NaN; nearby queries
    stay exact."""
    q, k, v = (x.detach() for x in make_qkv(t=16))
    q[..., 1::2, :] += 100.0  # odd queries are far from every key
    y = causal_attention(q, k, v, "GK")
    assert lse_calls[0] == 1
    assert torch.isfinite(y).all() and (y[..., 1::2, :].abs() < 1e-30).all()
    ref = reference(q, k, v, "GK", causal(16, 16))
    assert rel_err(y[..., 0::2, :], ref[..., 0::2, :]) <= 1e-5


def test_gk_no_grad_bf16_computed_in_fp32(lse_calls):
    q, k, v = (t.detach().bfloat16() for t in make_qkv())
    y = causal_attention(q, k, v, "GK")
    assert lse_calls[0] == 1 and y.dtype == torch.bfloat16
    assert rel_err(y, reference(q, k, v, "GK", causal(40, 40))) <= 1e-2  # bf16 output rounding only


@pytest.mark.parametrize("broken", ["missing", "raises"])
def test_gk_no_grad_falls_back_to_the_sentinel_path(broken, monkeypatch):
    """Without the private kernel (another torch) or when it rejects the inputs, GK still gives the formula."""
    q, k, v = (t.detach() for t in make_qkv(t=16))

    def raising(*args, **kwargs):
        raise RuntimeError("not supported")

    monkeypatch.setattr(attn_mod, "_FLASH_LSE", None if broken == "missing" else raising)
    for t_q, mask in ((16, None), (5, None), (16, left_padding_mask(16))):
        y = causal_attention(q[..., -t_q:, :], k, v, "GK", attention_mask=mask)
        ref = reference(q[..., -t_q:, :], k, v, "GK", causal(t_q, 16) if mask is None else mask)
        assert rel_err(y, ref) <= 1e-5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("attn_type", ["GKpoly-8", "PA_square"])
def test_overflowing_weight_at_a_masked_key_does_not_poison_gradients(attn_type, impl):
    """Weights that would overflow at masked / future keys (GKpoly far outside its range, the square of a huge
    score) are masked before the weight function: outputs and gradients stay finite and exact."""
    t, half = 24, 12
    q, k, v = (x.detach() for x in make_qkv(t=t))
    seg = torch.arange(t) >= half  # two packed documents: positions 0..11 and 12..23
    mask = causal(t, t) & (seg[:, None] == seg[None, :])  # (T, T) causal and same document
    if attn_type.startswith("GKpoly"):
        # Document 2 sits 30 away in every coordinate: x ~ -1800 across documents, (1 - 1800/256)^256 = inf.
        q[..., half:, :] += 30.0
        k[..., half:, :] += 30.0
    else:
        # Document 1's queries live in dims 0..7, document 2's in dims 8..15; document 2's keys are huge in dims
        # 0..7, so only (masked) cross-document scores overflow when squared.
        q[..., :half, 8:] = 0.0
        q[..., half:, :8] = 0.0
        k[..., half:, :8] = 1e30
    for x in (q, k, v):
        x.requires_grad_(True)
    y = causal_attention(q, k, v, attn_type, N_POSITIONS, attention_mask=mask, implementation=impl)
    y.sum().backward()
    assert torch.isfinite(y).all()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))
    ref = reference(q, k, v, attn_type, mask)
    assert rel_err(y[..., :half, :], ref[..., :half, :]) <= 1e-4


@pytest.mark.parametrize("n", [1, 3])
def test_gkpoly_valid_range_and_divergence_below_minus_2_to_the_n_plus_1(n):
    """One key at squared distance 2 sqrt(d) * |x| gives weight (1 + x/2^n)^(2^n): close to exp(x) and in [0, 1]
    for -2^(n+1) <= x <= 0, larger than 1 (diverging from exp) below -2^(n+1). Documented in docs/attention.md."""
    d = 4
    for x in (-0.5, -float(2 ** (n + 1)), -(2 ** (n + 1)) - 1.0, -(2 ** (n + 2)) * 1.0):
        q = torch.zeros(1, 1, 1, d, dtype=torch.float64)
        k = torch.zeros(1, 1, 1, d, dtype=torch.float64)
        k[..., 0] = math.sqrt(2 * math.sqrt(d) * -x)
        v = torch.ones(1, 1, 1, 1, dtype=torch.float64)
        w = causal_attention(q, k, v, f"GKpoly-{n}").item()
        assert w == pytest.approx((1 + x / 2**n) ** (2**n), rel=1e-9)
        if x >= -(2 ** (n + 1)):
            assert 0.0 <= w <= 1.0
        else:
            assert w > 1.0 > math.exp(x)


def test_pa_constant_is_one_over_n_positions():
    """PA with v = 1, relu and q.k/sqrt(d) = 1 everywhere: y_i = (i + 1) / n_positions."""
    d, t = 4, 6
    q = torch.full((1, 1, t, d), 1.0)
    k = torch.full((1, 1, t, d), 0.5)  # q.k / sqrt(d) = 4 * 0.5 / 2 = 1
    v = torch.ones(1, 1, t, 1)
    for impl in IMPLS:
        y = causal_attention(q, k, v, "PA_relu", n_positions=32, implementation=impl)
        torch.testing.assert_close(y.flatten(), torch.arange(1.0, t + 1) / 32)


@pytest.mark.parametrize("attn_type", ["GK", "GKpoly-2", "PA_relu"])
def test_dropout_backward_uses_the_forward_dropout_mask(attn_type):
    """With dropout (GK then takes the blocked path: dropout would hit its sentinel), the blocks recomputed in
    backward must drop the same weights as the forward. y is linear in v, so with the same seed
    <g, y(v + dv)> - <g, y(v)> must equal <grad_v, dv> exactly when the masks agree."""
    q, k, v = make_qkv()
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(3))
    dv = torch.randn(v.shape, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(0)
    y = causal_attention(q, k, v, attn_type, N_POSITIONS, dropout_p=0.3)
    (y * g).sum().backward()
    torch.manual_seed(0)
    with torch.no_grad():
        y2 = causal_attention(q, k, v + dv, attn_type, N_POSITIONS, dropout_p=0.3)
    no_drop = causal_attention(q, k, v, attn_type, N_POSITIONS).detach()
    assert not torch.allclose(y.detach(), no_drop)  # dropout did act
    torch.testing.assert_close(((y2 - y.detach()) * g).sum(), (v.grad * dv).sum(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("attn_type", ["GK", "GKpoly-2"])
def test_bf16_inputs_computed_in_fp32(attn_type):
    q, k, v = (t.detach() for t in make_qkv())
    y = causal_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), attn_type)
    ref = reference(q.bfloat16(), k.bfloat16(), v.bfloat16(), attn_type, causal(40, 40))
    assert y.dtype == torch.bfloat16
    assert rel_err(y, ref) <= 1e-2  # bf16 output rounding only


def test_unknown_attn_type_lists_valid_forms():
    q, k, v = (t.detach() for t in make_qkv(t=4))
    for bad in ("softmax", "GKpoly-0", "GKpoly-17", "GKpoly-x", "PA_"):
        with pytest.raises(ValueError, match="valid forms: SM, GK, GKpoly-<n>"):
            causal_attention(q, k, v, bad)
    with pytest.raises(ValueError, match=r"unknown activation 'nope'.*relu_square"):
        causal_attention(q, k, v, "PA_nope")
    with pytest.raises(ValueError, match=r"not a valid attention type; valid forms: SM, GK, GKpoly-<n>"):
        GPT2AccelConfig(attn_type="gaussian")
    with pytest.raises(ValueError, match="implementation='flash'"):
        causal_attention(q, k, v, "GK", implementation="flash")


@pytest.mark.parametrize("bad", ["PA_nope", "PA_", "GKpoly-17", "softmax"])
def test_config_rejects_what_the_forward_would_reject(bad):
    """An unknown PA activation fails when the config is built (from a recipe, --attn_type or config.json), not
    at the first forward, with the message that lists the valid forms."""
    with pytest.raises(ValueError, match=rf"attn_type='{bad}'.*valid forms: SM, GK, GKpoly-<n>"):
        GPT2AccelConfig(attn_type=bad)
    assert GPT2AccelConfig(attn_type="PA_softplus").attn_type == "PA_softplus"


def test_any_elementwise_activation_by_name():
    q, k, v = (t.detach() for t in make_qkv(t=8))
    y = causal_attention(q, k, v, "PA_softplus", N_POSITIONS)
    dots = q.double() @ k.double().transpose(-2, -1) / 4
    ref = torch.where(causal(8, 8), F.softplus(dots), 0.0) @ v.double() / N_POSITIONS
    assert rel_err(y, ref) <= 1e-5


# -- through the model ------------------------------------------------------------------------------------------

MODEL_VARIANTS = ["SM", "GK", "GKpoly-3", "PA_relu"]


@pytest.mark.parametrize("attn_type", MODEL_VARIANTS)
def test_cached_greedy_generation_equals_full_recompute(attn_type, monkeypatch):
    calls = [0]
    if attn_mod._FLASH_LSE is not None:  # count GK's no-grad kernel: generation must run through it
        op = attn_mod._FLASH_LSE

        def counting(*args, **kwargs):
            calls[0] += 1
            return op(*args, **kwargs)

        monkeypatch.setattr(attn_mod, "_FLASH_LSE", counting)
    model = tiny_model(attn_type=attn_type)
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding in row 0
    outs = {
        uc: model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=10,
            do_sample=False,
            use_cache=uc,
            pad_token_id=0,
            eos_token_id=None,
        )
        for uc in (True, False)
    }
    assert torch.equal(outs[True], outs[False])
    # Logits too: step-by-step with the cache == one full forward.
    full = model(ids[1:]).logits  # (1, T, V)
    out = model(ids[1:, :3], use_cache=True)
    steps = [out.logits]
    cache = getattr(out, CACHE_FIELD)
    for t in range(3, 6):
        out = model(ids[1:, t : t + 1], cache=cache, use_cache=True)
        cache = getattr(out, CACHE_FIELD)
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    if attn_type == "GK" and attn_mod._FLASH_LSE is not None:
        assert calls[0] > 0


@pytest.mark.parametrize("attn_type", MODEL_VARIANTS)
def test_model_training_fast_path_equals_eager(attn_type):
    """Loss and every parameter gradient agree between attn_implementation 'sdpa' and 'eager'."""
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    results = []
    for impl in IMPLS:
        torch.manual_seed(0)
        model = GPT2AccelForCausalLM(
            GPT2AccelConfig(
                vocab_size=128,
                n_positions=64,
                n_embd=64,
                n_layer=2,
                n_head=4,
                attn_type=attn_type,
                attn_implementation=impl,
            )
        ).train()
        assert model.config._attn_implementation == impl
        loss = model(ids, labels=ids).loss
        loss.backward()
        results.append(
            (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        )
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-6)
    assert g1.keys() == g2.keys()
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-4, atol=1e-6, msg=n)


def test_attn_type_is_honoured_and_survives_save_and_load(tmp_path):
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    logits = {}
    for attn_type in MODEL_VARIANTS:
        model = tiny_model(attn_type=attn_type)
        logits[attn_type] = model(ids).logits
        model.save_pretrained(tmp_path / attn_type)
        loaded = GPT2AccelForCausalLM.from_pretrained(tmp_path / attn_type).eval()
        assert loaded.config.attn_type == attn_type
        torch.testing.assert_close(loaded(ids).logits, logits[attn_type])
    # Same weights (seed 0), different attention: different predictions.
    for a in MODEL_VARIANTS[1:]:
        assert not torch.allclose(logits[a], logits["SM"], atol=1e-4)


def test_switching_attn_type_of_a_checkpoint(tmp_path):
    """The fork's conversion: load softmax weights into a GK model (from_pretrained with attn_type=...)."""
    tiny_model(attn_type="SM").save_pretrained(tmp_path)
    model = GPT2AccelForCausalLM.from_pretrained(tmp_path, attn_type="GK")
    assert model.config.attn_type == "GK"
    assert model.transformer.h[0].attn.attn_type == "GK"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_attention_recipes_load(path):
    recipe = load_recipe(path)
    assert recipe.model.attn_type is not None
    assert recipe.data.dataset_name == "bundled:shakespeare"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_attention_recipes_build_models_of_their_attention(path):
    """Each attention recipe's model section builds a model whose layers run the attention it names."""
    from gpt2_accel.recipe import model_config

    m = load_recipe(path).model
    config = model_config(m, 128, 127)
    config.update(dict(n_layer=min(m.n_layer, 2), n_embd=32, n_head=min(m.n_head, 2), n_positions=16))
    model = GPT2AccelForCausalLM(config)
    assert {block.attn.attn_type for block in model.transformer.h} == {m.attn_type}
