"""The modern architecture options (docs/architecture.md), each against an independent reference.

Forward passes against a float64 model written from the papers' formulas; the rotary/YaRN frequencies against
transformers' own implementation; causality of sliding windows and sinks; cached generation against recompute.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import ids, tiny_config, tiny_model

from gpt2_accel import GPT2AccelConfig
from gpt2_accel.modeling_gpt2_accel import CACHE_FIELD, rope_inv_freq

YARN = {
    "rope_type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 16,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": False,
}

# name -> overrides of the tiny config; together they exercise every option and the interesting combinations.
OPTIONS = {
    "gpt2": {},
    "rope": dict(position_embedding_type="rope"),
    "rope_yarn": dict(position_embedding_type="rope", rope_theta=500.0, rope_scaling=YARN),
    "rmsnorm": dict(norm_type="rmsnorm"),
    "rmsnorm_no_scale_emb_norm": dict(
        norm_type="rmsnorm", norm_elementwise_affine=False, norm_after_embedding=True
    ),
    "layernorm_no_scale": dict(norm_elementwise_affine=False),
    "swiglu": dict(mlp_type="swiglu", bias=False),
    "relu2": dict(mlp_type="relu2", n_inner=96),
    "gqa": dict(n_kv_head=2),
    "mqa_qk_norm": dict(n_kv_head=1, qk_norm=True),
    "untied_softcap": dict(tie_word_embeddings=False, final_logit_softcapping=3.0),
    "sliding": dict(sliding_window=4),
    "alternating_sinks": dict(
        sliding_window=3, layer_types=["sliding_attention", "full_attention"], attention_sinks=True
    ),
    "llama": dict(
        position_embedding_type="rope", norm_type="rmsnorm", mlp_type="swiglu", bias=False, n_kv_head=2
    ),
    "nanochat": dict(
        position_embedding_type="rope",
        norm_type="rmsnorm",
        norm_elementwise_affine=False,
        norm_after_embedding=True,
        mlp_type="relu2",
        qk_norm=True,
        bias=False,
        n_kv_head=2,
        tie_word_embeddings=False,
        final_logit_softcapping=15.0,
        zero_init_output_proj=True,
    ),
    "gpt_oss_like": dict(
        position_embedding_type="rope",
        rope_theta=1000.0,
        rope_scaling=YARN,
        norm_type="rmsnorm",
        mlp_type="swiglu",
        n_kv_head=2,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
        attention_sinks=True,
        attention_bias=True,
        mlp_bias=True,
    ),
    "gk_sliding_rope": dict(attn_type="GK", sliding_window=5, position_embedding_type="rope", n_kv_head=2),
    "pa_sliding": dict(attn_type="PA_relu", sliding_window=5, qk_norm=True),
    "gkpoly_gqa": dict(attn_type="GKpoly-4", n_kv_head=2, norm_type="rmsnorm"),
}


def perturbed(name: str, seed: int = 0):
    """A tiny model with the option and non-trivial weights everywhere (gains, biases, sinks, zero-init c_proj)."""
    model = tiny_model(seed, **OPTIONS[name])
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


# ------------------------------------------------------------------------------------------- float64 reference


def _reference_forward(model, idx: torch.Tensor) -> torch.Tensor:
    """The whole network in float64, each option written from its paper's formula (no code shared with ours)."""
    cfg = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    T, C, nh, nkv = idx.size(1), cfg.n_embd, cfg.n_head, cfg.n_kv_head
    hs = C // nh
    eps = cfg.layer_norm_epsilon

    def norm(x, name):
        w, b = sd.get(f"{name}.weight"), sd.get(f"{name}.bias")
        if cfg.norm_type == "rmsnorm":  # Zhang & Sennrich 2019: x / rms(x) * g
            y = x / torch.sqrt(x.square().mean(-1, keepdim=True) + eps)
        else:  # Ba et al. 2016
            mu = x.mean(-1, keepdim=True)
            y = (x - mu) / torch.sqrt((x - mu).square().mean(-1, keepdim=True) + eps)
        y = y * w if w is not None else y
        return y + b if b is not None else y

    def lin(x, name):
        y = x @ sd[f"{name}.weight"].T
        return y + sd[f"{name}.bias"] if f"{name}.bias" in sd else y

    def rotate(x):  # RoFormer eq. 34, pairs (i, i + hs/2): angle pos * inv_freq_i, times YaRN's scale
        inv_freq, scale = _reference_inv_freq(cfg)
        ang = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None, :]  # (T, hs/2)
        cos, sin = torch.cos(ang) * scale, torch.sin(ang) * scale
        x1, x2 = x[..., : hs // 2], x[..., hs // 2 :]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    x = sd["transformer.wte.weight"][idx]
    if cfg.position_embedding_type == "learned":
        x = x + sd["transformer.wpe.weight"][:T]
    if cfg.norm_after_embedding:
        x = norm(x, "transformer.ln_emb")
    pos = torch.arange(T)
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}"
        a = lin(norm(x, f"{p}.ln_1"), f"{p}.attn.c_attn")
        q = a[..., :C].unflatten(-1, (nh, hs)).transpose(1, 2)  # (B, nh, T, hs)
        k = a[..., C : C + nkv * hs].unflatten(-1, (nkv, hs)).transpose(1, 2)
        v = a[..., C + nkv * hs :].unflatten(-1, (nkv, hs)).transpose(1, 2)
        if cfg.qk_norm:
            q, k = norm(q, f"{p}.attn.q_norm"), norm(k, f"{p}.attn.k_norm")
        if cfg.position_embedding_type == "rope":
            q, k = rotate(q), rotate(k)
        k, v = (
            k.repeat_interleave(nh // nkv, 1),
            v.repeat_interleave(nh // nkv, 1),
        )  # head h uses kv head h // g
        visible = pos[None, :] <= pos[:, None]  # (T, T): key j <= query i
        if cfg.layer_types[i] == "sliding_attention":
            visible &= pos[None, :] > pos[:, None] - cfg.sliding_window  # the last `window` keys
        if cfg.attn_type == "SM":
            s = (q @ k.transpose(-1, -2) / math.sqrt(hs)).masked_fill(~visible, -math.inf)
            if cfg.attention_sinks:  # gpt-oss: exp(sink) joins the normaliser
                z = s.exp().sum(-1, keepdim=True) + sd[f"{p}.attn.sinks"].exp().view(1, nh, 1, 1)
                att = s.exp() / z
            else:
                att = s.softmax(-1)
            y = att @ v
        elif cfg.attn_type.startswith("GK"):
            d2 = (q[..., :, None, :] - k[..., None, :, :]).square().sum(-1) / (2 * math.sqrt(hs))
            if cfg.attn_type == "GK":
                w = torch.exp(-d2)
            else:
                n = int(cfg.attn_type.split("-")[1])
                w = (1 - d2 / 2**n) ** (2**n)
            y = w.masked_fill(~visible, 0) @ v
        else:  # PA_relu
            w = torch.relu(q @ k.transpose(-1, -2) / math.sqrt(hs)).masked_fill(~visible, 0)
            y = (w @ v) / cfg.n_positions
        x = x + lin(y.transpose(1, 2).flatten(2), f"{p}.attn.c_proj")
        h = lin(norm(x, f"{p}.ln_2"), f"{p}.mlp.c_fc")
        if cfg.mlp_type == "gelu":
            h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
        elif cfg.mlp_type == "relu2":  # Primer
            h = torch.relu(h) ** 2
        else:  # SwiGLU: silu(gate) * up, [gate | up]
            gate, up = h.chunk(2, -1)
            h = gate * torch.sigmoid(gate) * up
        x = x + lin(h, f"{p}.mlp.c_proj")
    head = sd["lm_head.weight"] if "lm_head.weight" in sd else sd["transformer.wte.weight"]
    logits = norm(x, "transformer.ln_f") @ head[: cfg.vocab_size].T
    if cfg.final_logit_softcapping:
        c = cfg.final_logit_softcapping
        logits = c * torch.tanh(logits / c)
    return logits


def _reference_inv_freq(cfg) -> tuple[torch.Tensor, float]:
    """theta^(-2i/d), or YaRN's blend (Peng et al. 2023 eqs. 17-19) in float64."""
    p, d = cfg.rope_parameters, cfg.head_dim
    i = torch.arange(0, d, 2, dtype=torch.float64)
    inv = p["rope_theta"] ** (-i / d)
    if p["rope_type"] == "default":
        return inv, 1.0
    s, L = p["factor"], p["original_max_position_embeddings"]
    # r(d) = L / wavelength = L * inv / (2 pi): rotations of dimension pair i over the original context
    r = L * inv / (2 * math.pi)

    # the dimension index where r = beta (solve L * theta^(-2i/d) / 2pi = beta for i)
    def dim_at(beta):
        return d * math.log(L / (beta * 2 * math.pi)) / (2 * math.log(p["rope_theta"]))

    lo, hi = max(dim_at(p["beta_fast"]), 0), min(dim_at(p["beta_slow"]), d - 1)
    gamma = 1 - ((torch.arange(d // 2, dtype=torch.float64) - lo) / (hi - lo)).clamp(0, 1)
    assert r.shape == gamma.shape
    return (1 - gamma) * inv / s + gamma * inv, 0.1 * math.log(s) + 1


@pytest.mark.parametrize("name", list(OPTIONS))
def test_forward_matches_a_float64_reference(name):
    model = perturbed(name)
    x = ids(2, 14)
    with torch.no_grad():
        out = model(x).logits.double()
    torch.testing.assert_close(out, _reference_forward(model, x), atol=2e-4, rtol=0)


@pytest.mark.parametrize(
    "name", ["alternating_sinks", "gpt_oss_like", "gk_sliding_rope", "pa_sliding", "llama"]
)
def test_sdpa_and_eager_agree_with_padding(name):
    model = perturbed(name)
    x = ids(2, 14)
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    with torch.no_grad():
        fast = model(x, attention_mask=mask).logits
        plain = model(x).logits
        model.set_attn_implementation("eager")
        ref = model(x, attention_mask=mask).logits
        ref_plain = model(x).logits
    torch.testing.assert_close(fast[:, 3:], ref[:, 3:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast[1], ref[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain, ref_plain, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------- rotary against transformers


@pytest.mark.parametrize(
    "rope_parameters",
    [
        {"rope_type": "default", "rope_theta": 10000.0},
        {
            "rope_type": "yarn",
            "rope_theta": 150000.0,
            "factor": 32.0,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
        },  # gpt-oss-20b's config.json
        {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 2048},
    ],
)
def test_rotary_frequencies_equal_transformers(rope_parameters):
    from transformers import GptOssConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    ours = GPT2AccelConfig(
        n_embd=512,
        n_head=8,
        n_positions=131072,
        position_embedding_type="rope",
        rope_parameters=dict(rope_parameters),
    )
    hf = GptOssConfig(
        hidden_size=512,
        num_attention_heads=8,
        head_dim=64,
        max_position_embeddings=131072,
        rope_parameters=dict(rope_parameters),
    )
    inv, scale = rope_inv_freq(ours)
    if rope_parameters["rope_type"] == "default":
        ref = 1.0 / (rope_parameters["rope_theta"] ** (torch.arange(0, 64, 2, dtype=torch.float) / 64))
        ref_scale = 1.0
    else:
        ref, ref_scale = ROPE_INIT_FUNCTIONS["yarn"](hf, device=None)
    torch.testing.assert_close(inv, ref, rtol=1e-6, atol=0)
    assert scale == pytest.approx(ref_scale, rel=1e-12)
    if rope_parameters.get("truncate", True) is False or rope_parameters["rope_type"] == "default":
        # and against the float64 formula of the test (Peng et al. 2023; it does not round the ramp's ends)
        ref64, scale64 = _reference_inv_freq(ours)
        torch.testing.assert_close(inv.double(), ref64, rtol=1e-5, atol=0)
        assert scale == pytest.approx(scale64)


# ---------------------------------------------------------------------------------------------- causality


@pytest.mark.parametrize("attn_type", ["SM", "GK", "PA_relu"])
@pytest.mark.parametrize("sinks", [False, True])
def test_sliding_window_output_never_depends_on_keys_outside_the_window(attn_type, sinks):
    if sinks and attn_type != "SM":
        pytest.skip("sinks are softmax-only")
    W = 4
    model = tiny_model(n_layer=1, sliding_window=W, attn_type=attn_type, attention_sinks=sinks)
    x = ids(1, 20)
    for p in (0, 5, 11):
        y = x.clone()
        y[0, p] = (y[0, p] + 1) % 128
        with torch.no_grad():
            a, b = model(x).logits[0], model(y).logits[0]
        diff = (a - b).abs().amax(-1)  # (T,)
        # A one-layer model: position t sees tokens t - W + 1 .. t only.
        window = torch.zeros(20, dtype=torch.bool)
        window[p : p + W] = True
        assert diff[p] > 1e-3
        # GK measures distances from a centre shared by all queries (the first key, attention.py): exact in
        # arithmetic (translation invariance), so a token outside the window moves other outputs by rounding only.
        tol = 1e-6 if attn_type == "GK" else 0.0
        assert diff[~window].max() <= tol, (p, diff)


def test_sinks_take_probability_mass_and_learn():
    model = tiny_model(n_layer=1, attention_sinks=True).train()
    x = ids()
    with torch.no_grad():
        base = model(x).logits
        model.transformer.h[0].attn.sinks.fill_(20.0)  # the sink soaks up nearly all attention
        sunk = model(x).logits
    assert (base - sunk).abs().max() > 1e-3
    model(x, labels=x).loss.backward()
    assert model.transformer.h[0].attn.sinks.grad.abs().max() > 0


# ------------------------------------------------------------------------------------- generation and caches


@pytest.mark.parametrize(
    "name", ["sliding", "alternating_sinks", "gpt_oss_like", "gk_sliding_rope", "nanochat", "mqa_qk_norm"]
)
def test_cached_generation_equals_recompute_past_the_window(name):
    model = perturbed(name)
    x = ids(2, 6)
    kw = dict(max_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=None)  # 30 tokens >> window
    cached = model.generate(x, use_cache=True, **kw)
    uncached = model.generate(x, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    # step by step with the cache against full recompute, logits included
    with torch.no_grad():
        full = model(cached).logits
        out = model(cached[:, :6], use_cache=True)
        cache = getattr(out, CACHE_FIELD)
        for t in range(6, cached.size(1)):
            out = model(cached[:, t : t + 1], use_cache=True, cache=cache)
            torch.testing.assert_close(out.logits[:, -1], full[:, t], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["alternating_sinks", "gpt_oss_like", "llama"])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("padded", [True, False])
def test_static_cache_equals_dynamic_cache_with_padding(name, attn_implementation, padded):
    model = perturbed(name)
    model.set_attn_implementation(attn_implementation)
    x = ids(2, 7)
    mask = torch.ones_like(x)
    if padded:
        mask[0, :3] = 0
    kw = dict(max_new_tokens=14, do_sample=False, pad_token_id=0, eos_token_id=None, attention_mask=mask)
    assert torch.equal(model.generate(x, cache_implementation="static", **kw), model.generate(x, **kw))


@pytest.mark.parametrize("name", ["gpt_oss_like", "llama"])
def test_left_padded_batch_continues_like_each_prompt_alone(name):
    model = perturbed(name)
    prompts = [ids(1, 9, seed=5)[0], ids(1, 4, seed=6)[0]]
    batch = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, p in enumerate(prompts):
        batch[i, 9 - len(p) :] = p
        mask[i, 9 - len(p) :] = 1
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    together = model.generate(batch, attention_mask=mask, **kw)[:, 9:]
    for i, p in enumerate(prompts):
        # rotary positions start at the first real token only when position_ids say so; generate() derives them
        alone = model.generate(p[None], **kw)[0, len(p) :]
        assert torch.equal(together[i], alone), f"prompt {i}"


def test_gqa_cache_holds_only_the_kv_heads():
    model = tiny_model(n_kv_head=1)
    out = model(ids(2, 5), use_cache=True)
    layer = getattr(out, CACHE_FIELD).layers[0]
    assert layer.keys.shape == (2, 1, 5, 16)  # (B, n_kv_head, T, hs): 4x smaller than MHA's
    assert model.transformer.h[0].attn.c_attn.weight.shape == (64 + 2 * 16, 64)


def test_sliding_cache_keeps_only_the_window():
    model = tiny_model(sliding_window=4, layer_types=["sliding_attention", "full_attention"])
    out = model(ids(1, 10), use_cache=True)
    cache = getattr(out, CACHE_FIELD)
    assert cache.layers[0].keys.shape[-2] == 3  # transformers keeps window - 1 keys for sliding layers
    assert cache.layers[1].keys.shape[-2] == 10


# --------------------------------------------------------------------------------------------- training paths


@pytest.mark.parametrize("name", ["untied_softcap", "nanochat", "gpt_oss_like"])
def test_skip_logits_gives_the_loss_and_grads_of_the_logits_path(name):
    model = perturbed(name).train()
    model.loss_chunk_rows = 7
    x = ids(2, 13)

    def run(**kw):
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=x, labels=x, **kw).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_loss, ref_grads = run()
    loss, grads = run(skip_logits=True)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", ["nanochat", "gpt_oss_like"])
def test_gradient_checkpointing_gives_the_same_loss_and_grads(name):
    model = perturbed(name).train()
    x = ids()

    def run():
        model.zero_grad(set_to_none=True)
        loss = model(x, labels=x).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref_loss, ref_grads = run()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss, grads = run()
    torch.testing.assert_close(loss, ref_loss)
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, msg=n)


def test_softcap_bounds_the_logits():
    model = perturbed("untied_softcap")
    with torch.no_grad():
        model.lm_head.weight.mul_(100)
        logits = model(ids()).logits
    assert 2.9 < logits.abs().max() <= 3.0  # tanh saturates to exactly the cap in fp32


def test_zero_init_output_projections_and_untied_head():
    model = tiny_model(zero_init_output_proj=True, tie_word_embeddings=False)
    for block in model.transformer.h:
        assert block.attn.c_proj.weight.abs().max() == 0 and block.mlp.c_proj.weight.abs().max() == 0
        assert block.attn.c_attn.weight.std() > 0.01
    assert model.lm_head.weight is not model.transformer.wte.weight


def test_untied_head_saves_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    model = perturbed("nanochat")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is not loaded.transformer.wte.weight
    x = ids()
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_swiglu_default_width_matches_gpt2_parameter_count():
    gpt2 = tiny_model(n_embd=192, n_head=4)
    swiglu = tiny_model(n_embd=192, n_head=4, mlp_type="swiglu")
    n = lambda m: sum(p.numel() for p in m.transformer.h[0].mlp.parameters() if p.dim() == 2)  # noqa: E731
    assert swiglu.config.mlp_hidden_size == 512  # 8/3 * 192
    assert n(swiglu) == n(gpt2)


# ---------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            dict(n_kv_head=3),
            r"n_kv_head=3: n_head=4 must be divisible by n_kv_head.*valid values: \[1, 2, 4\]",
        ),
        (
            dict(sliding_window=4, layer_types=["sliding_attention"]),
            r"layer_types has 1 entries but n_layer=2",
        ),
        (dict(layer_types=["full_attention", "local"]), r"valid values: full_attention, sliding_attention"),
        (
            dict(layer_types=["sliding_attention", "full_attention"]),
            r"sliding_window is None: set sliding_window",
        ),
        (dict(sliding_window=0), r"sliding_window=0 must be a positive"),
        (
            dict(norm_type="batchnorm"),
            r"norm_type='batchnorm' is not known; valid values: layernorm, rmsnorm",
        ),
        (dict(mlp_type="geglu"), r"mlp_type='geglu' is not known; valid values: gelu, swiglu, relu2"),
        (dict(position_embedding_type="alibi"), r"valid values: learned, rope"),
        (dict(rope_scaling=YARN), r"rope_scaling is set but position_embedding_type='learned'.*'rope'"),
        (dict(rope_theta=1e4), r"rope_theta is set but position_embedding_type='learned'"),
        (dict(position_embedding_type="rope", rope_scaling={"rope_type": "yarn"}), r"positive 'factor'"),
        (
            dict(position_embedding_type="rope", rope_scaling={"rope_type": "llama3", "factor": 8}),
            r"valid values: default, yarn",
        ),
        (dict(attention_sinks=True, attn_type="GK"), r"attention_sinks=True conflicts with attn_type='GK'"),
        (dict(final_logit_softcapping=0.0), r"final_logit_softcapping=0.0 must be a positive cap"),
    ],
)
def test_impossible_configs_fail_at_construction(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**overrides)


def test_defaults_are_exactly_gpt2():
    c = GPT2AccelConfig()
    assert (c.position_embedding_type, c.norm_type, c.mlp_type, c.n_kv_head) == (
        "learned",
        "layernorm",
        "gelu",
        12,
    )
    assert c.rope_parameters is None and c.sliding_window is None and not c.attention_sinks and not c.qk_norm
    assert (
        c.layer_types == ["full_attention"] * 12
        and c.tie_word_embeddings
        and c.final_logit_softcapping is None
    )
    names = {n for n, _ in tiny_model().named_parameters()}
    assert {
        "transformer.wpe.weight",
        "transformer.h.0.ln_1.bias",
        "transformer.h.0.attn.c_attn.weight",
    } <= names
    assert not any("norm" in n or "sinks" in n for n in names)


def test_gradients_of_the_float64_reference_match_for_sinks_and_rope():
    # The float64 reference is differentiable: compare parameter gradients of the modern path too.
    model = perturbed("gpt_oss_like").double().train()
    x = ids(1, 10)
    target = ids(1, 10, seed=9)
    F.cross_entropy(model(x).logits[0], target[0]).backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    params = dict(model.named_parameters())
    model.zero_grad()
    sd_backup = model.state_dict

    def state_dict_with_grad():  # hand the reference the live parameters
        return {k: params[k] for k in params}

    model.state_dict = state_dict_with_grad
    try:
        F.cross_entropy(_reference_forward(model, x)[0], target[0]).backward()
    finally:
        model.state_dict = sd_backup
    for n, p in params.items():
        # rotary angles are fp32 in the model (as in transformers): ~1e-8 apart in float64
        torch.testing.assert_close(p.grad, ours[n], rtol=1e-5, atol=1e-6, msg=n)
