"""GPT2AccelForCausalLM as a transformers citizen: Auto classes, generation, save/load, remote code, flags."""

from __future__ import annotations

import logging
import math
import textwrap
import warnings
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from conftest import ids, run_without_package, tiny_config, tiny_model
from safetensors import safe_open
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from gpt2_accel import GPT2AccelConfig, GPT2AccelForCausalLM, GPT2AccelModel
from gpt2_accel.modeling_gpt2_accel import CACHE_FIELD


@contextmanager
def transformers_warnings():
    """Collect what transformers would show a user: its logger's warnings plus Python warnings."""
    records: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                records.append(record.getMessage())

    handler = _Collect()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield records
        finally:
            logger.removeHandler(handler)
    records.extend(
        str(w.message)
        for w in caught
        if "gpt2_accel" in (w.filename or "") or "transformers" in (w.filename or "")
    )


# ---------------------------------------------------------------------------------------------------- config / Auto


def test_auto_classes_are_registered_and_standard_names_map(tmp_path):
    config = tiny_config()
    assert isinstance(AutoConfig.for_model("gpt2_accel", n_layer=3), GPT2AccelConfig)
    assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers) == (64, 4, 2)
    assert config.max_position_embeddings == 64
    assert GPT2AccelConfig(hidden_size=96, num_attention_heads=3).n_embd == 96
    assert isinstance(AutoModelForCausalLM.from_config(config), GPT2AccelForCausalLM)
    assert isinstance(AutoModel.from_config(config), GPT2AccelModel)
    config.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).to_dict()["n_embd"] == 64


def test_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="divisible by n_head"):
        GPT2AccelConfig(n_embd=65, n_head=4)
    with pytest.raises(ValueError, match="valid forms"):
        GPT2AccelConfig(attn_type="linear")
    with pytest.raises(ValueError, match="pad_vocab_size_multiple must be >= 1"):
        GPT2AccelConfig(pad_vocab_size_multiple=0)


def test_special_ids_default_inside_the_vocabulary():
    assert GPT2AccelConfig().eos_token_id == 50256  # GPT-2's <|endoftext|>
    assert tiny_config().eos_token_id == tiny_config().bos_token_id == 127
    assert GPT2AccelConfig(vocab_size=257).eos_token_id == 256  # the character tokenizer's <|endoftext|>


def test_normal_use_shows_no_transformers_warnings(tmp_path):
    with transformers_warnings() as seen:
        model = tiny_model()
        x = ids()
        model(x, labels=x)
        model.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=3, do_sample=False, pad_token_id=0
        )
        model.save_pretrained(tmp_path)
        AutoModelForCausalLM.from_pretrained(tmp_path)(x)
        AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")(x)
        model.set_attn_implementation("eager")
        # transformers 5.23 renamed gradient_checkpointing_enable (which now warns) to activation_checkpointing_enable
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
        model.train()(x, labels=x).loss.backward()
    assert seen == []


# ------------------------------------------------------------------------------------------------- architecture


def test_init_follows_gpt2():
    model = tiny_model(n_embd=256, n_layer=4, n_head=4, vocab_size=1024)
    assert model.lm_head.weight is model.transformer.wte.weight  # tied
    std = {n: p.std().item() for n, p in model.named_parameters() if p.dim() == 2}
    assert std["transformer.wte.weight"] == pytest.approx(0.02, rel=0.05)
    assert std["transformer.h.0.attn.c_attn.weight"] == pytest.approx(0.02, rel=0.05)
    residual = 0.02 / math.sqrt(2 * 4)  # GPT-2 paper sec. 2.3
    assert std["transformer.h.3.attn.c_proj.weight"] == pytest.approx(residual, rel=0.05)
    assert std["transformer.h.3.mlp.c_proj.weight"] == pytest.approx(residual, rel=0.05)
    assert all(b.abs().max() == 0 for n, b in model.named_parameters() if n.endswith(".bias"))


def _reference_forward(model: GPT2AccelForCausalLM, idx: torch.Tensor) -> torch.Tensor:
    """GPT-2 written out in float64 from the paper's description, to check the module wiring."""
    sd = {k: v.double() for k, v in model.state_dict().items()}
    cfg = model.config
    T = idx.size(1)
    hs = cfg.n_embd // cfg.n_head
    x = sd["transformer.wte.weight"][idx] + sd["transformer.wpe.weight"][:T]
    causal = torch.ones(T, T, dtype=torch.bool).tril()

    def ln(x, name):
        return F.layer_norm(
            x, (cfg.n_embd,), sd[f"{name}.weight"], sd[f"{name}.bias"], cfg.layer_norm_epsilon
        )

    def lin(x, name):
        return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]

    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}"
        q, k, v = lin(ln(x, f"{p}.ln_1"), f"{p}.attn.c_attn").split(cfg.n_embd, dim=-1)
        q, k, v = (t.unflatten(-1, (cfg.n_head, hs)).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-1, -2) / math.sqrt(hs)).masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + lin((att @ v).transpose(1, 2).flatten(2), f"{p}.attn.c_proj")
        h = lin(ln(x, f"{p}.ln_2"), f"{p}.mlp.c_fc")
        h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))  # GELU, tanh form
        x = x + lin(h, f"{p}.mlp.c_proj")
    return ln(x, "transformer.ln_f") @ sd["transformer.wte.weight"].T


def test_forward_matches_a_float64_gpt2_reference():
    model = tiny_model()
    with torch.no_grad():
        for p in model.parameters():  # non-trivial biases and LayerNorm gains
            p.add_(0.05 * torch.randn_like(p))
        x = ids()
        torch.testing.assert_close(model(x).logits.double(), _reference_forward(model, x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("attn_type", ["SM", "GK", "PA_relu"])
def test_sdpa_and_eager_give_the_same_logits(attn_type):
    model = tiny_model(attn_type=attn_type)
    x = ids()
    mask = torch.ones_like(x)
    mask[0, :3] = 0  # left padding on the first row
    with torch.no_grad():
        assert model.config._attn_implementation == "sdpa"  # SDPA is the default
        fast = model(x, attention_mask=mask).logits
        model.set_attn_implementation("eager")
        ref = model(x, attention_mask=mask).logits
    torch.testing.assert_close(fast[:, 3:], ref[:, 3:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast[1], ref[1], atol=1e-5, rtol=1e-5)


def test_eager_is_selectable_in_from_pretrained(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "sdpa"


def test_loss_matches_cross_entropy_on_shifted_labels():
    model = tiny_model()
    x = ids()
    labels = x.clone()
    labels[0, :4] = -100
    out = model(x, labels=labels)
    expected = F.cross_entropy(
        out.logits[:, :-1].reshape(-1, 128), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, expected)
    shifted = F.pad(labels, (0, 1), value=-100)[:, 1:]
    torch.testing.assert_close(model(x, shift_labels=shifted).loss, expected)


def test_too_long_input_says_how_to_fix():
    with pytest.raises(ValueError, match=r"exceeds the model's context n_positions=64.*crop"):
        tiny_model()(ids(1, 65))


# --------------------------------------------------------------------------------------------- padded vocabulary


def test_padded_vocabulary_is_never_predicted_nor_sampled():
    model = tiny_model(vocab_size=100, pad_vocab_size_multiple=64)
    assert model.transformer.wte.weight.shape[0] == 128
    with torch.no_grad():
        # Make the padded rows win every argmax if they were visible: h @ wte[pad] is huge for any h.
        model.transformer.wte.weight[100:] = 50.0 * model.transformer.ln_f.weight.sign()
    x = ids(vocab=100)
    out = model(x, labels=x)
    assert out.logits.shape[-1] == 100
    unpadded = tiny_model(vocab_size=100)
    unpadded.load_state_dict(
        {
            k: v[:100] if k in ("transformer.wte.weight", "lm_head.weight") else v
            for k, v in model.state_dict().items()
        }
    )
    torch.testing.assert_close(out.logits, unpadded(x).logits)
    torch.testing.assert_close(out.loss, unpadded(x, labels=x).loss)
    torch.manual_seed(0)
    sampled = model.generate(x, max_new_tokens=20, do_sample=True, temperature=2.0, top_k=0, pad_token_id=0)
    assert sampled.max() < 100
    assert model.generate(x, max_new_tokens=5, do_sample=False, pad_token_id=0).max() < 100


# -------------------------------------------------------------------------------------------------- generation


@pytest.mark.parametrize("attn_type", ["SM", "GK"])
def test_greedy_with_cache_equals_without_cache(attn_type):
    model = tiny_model(attn_type=attn_type)
    x = ids(2, 5)
    kw = dict(max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None)
    cached = model.generate(x, use_cache=True, **kw)
    uncached = model.generate(x, use_cache=False, **kw)
    assert cached.shape == (2, 25)
    assert torch.equal(cached, uncached)


def test_sampling_knobs():
    model = tiny_model()
    x = ids(2, 5)
    kw = dict(max_new_tokens=15, pad_token_id=0, eos_token_id=None)
    greedy = model.generate(x, do_sample=False, **kw)
    assert torch.equal(model.generate(x, do_sample=True, top_k=1, **kw), greedy)
    assert torch.equal(model.generate(x, do_sample=True, top_p=1e-6, **kw), greedy)
    assert torch.equal(model.generate(x, do_sample=True, temperature=1e-4, **kw), greedy)
    torch.manual_seed(3)
    a = model.generate(x, do_sample=True, temperature=1.5, top_k=50, top_p=0.95, **kw)
    torch.manual_seed(3)
    b = model.generate(x, do_sample=True, temperature=1.5, top_k=50, top_p=0.95, **kw)
    assert torch.equal(a, b) and not torch.equal(a, greedy)


def test_sampling_with_top_k_stays_in_the_top_k():
    model = tiny_model()
    x = ids(1, 8)
    with torch.no_grad():
        allowed = model(x).logits[0, -1].topk(3).indices
    torch.manual_seed(0)
    firsts = {
        int(model.generate(x, do_sample=True, top_k=3, max_new_tokens=1, pad_token_id=0)[0, -1])
        for _ in range(30)
    }
    assert firsts <= set(allowed.tolist()) and len(firsts) > 1


@pytest.mark.parametrize("attn_type", ["SM", "GK"])
def test_left_padded_batch_continues_like_each_prompt_alone(attn_type):
    model = tiny_model(attn_type=attn_type)
    prompts = [ids(1, 9, seed=5)[0], ids(1, 4, seed=6)[0], ids(1, 6, seed=7)[0]]
    width = max(len(p) for p in prompts)
    batch = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, p in enumerate(prompts):
        batch[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    together = model.generate(batch, attention_mask=mask, **kw)[:, width:]
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], **kw)[0, len(p) :]
        assert torch.equal(together[i], alone), f"prompt {i}"


@pytest.mark.parametrize("attn_type", ["SM", "GK"])
@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_static_cache_generation_equals_dynamic_cache(attn_implementation, padded, attn_type):
    # A static (compilable) cache makes generate() pass 4-D masks: boolean for sdpa, additive for eager. Unpadded,
    # the prefill gets no mask at all while the cache returns its whole zero-filled buffer (the case that broke).
    model = tiny_model(attn_type=attn_type)
    model.set_attn_implementation(attn_implementation)
    x = ids(2, 7)
    mask = torch.ones_like(x)
    if padded:
        mask[0, :3] = 0
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None, attention_mask=mask)
    assert torch.equal(model.generate(x, cache_implementation="static", **kw), model.generate(x, **kw))


def test_text_generation_pipeline_from_a_saved_directory(tmp_path):
    from transformers import pipeline

    from gpt2_accel.tokenization import get_tokenizer

    tiny_model(vocab_size=257).save_pretrained(tmp_path)
    get_tokenizer("char").save_pretrained(tmp_path)
    generator = pipeline("text-generation", model=str(tmp_path))
    out = generator("To be", max_new_tokens=8, do_sample=False)
    assert out[0]["generated_text"].startswith("To be")
    assert len(out[0]["generated_text"].encode()) > len(b"To be")


# ------------------------------------------------------------------------------------------------ save / load


def test_save_pretrained_stores_the_tied_embedding_once_and_reloads_identically(tmp_path):
    model = tiny_model(pad_vocab_size_multiple=64, vocab_size=100)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "transformer.wte.weight" in keys and "lm_head.weight" not in keys
    assert len(keys) == len(model.state_dict()) - 1
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is GPT2AccelForCausalLM
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    x = ids(vocab=100)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


MODERN = dict(  # every modern option at once (docs/architecture.md)
    position_embedding_type="rope",
    rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    norm_type="rmsnorm",
    norm_after_embedding=True,
    mlp_type="swiglu",
    n_kv_head=2,
    qk_norm=True,
    sliding_window=4,
    layer_types=["sliding_attention", "full_attention"],
    attention_sinks=True,
    final_logit_softcapping=10.0,
    tie_word_embeddings=False,
)


MAGNITUDE_PRESERVING = dict(magnitude_preserving=True, bias=False, norm_elementwise_affine=False)  # EDM2


@pytest.mark.parametrize(
    "overrides", [dict(attn_type="GK"), MODERN, MAGNITUDE_PRESERVING], ids=["gk", "modern", "edm2"]
)
def test_trust_remote_code_loads_without_the_package(tmp_path, overrides):
    model_dir = tmp_path / "model"
    model = tiny_model(**overrides)
    model.save_pretrained(model_dir)
    import json

    auto_map = json.loads((model_dir / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForCausalLM"] == "modeling_gpt2_accel.GPT2AccelForCausalLM"
    for name in ("configuration_gpt2_accel.py", "modeling_gpt2_accel.py", "attention.py"):
        assert (model_dir / name).exists(), name
    x = ids()
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(model(x).logits, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(model_dir)!r}, trust_remote_code=True).eval()
        assert "gpt2_accel" not in sys.modules
        x = torch.load({str(tmp_path / "x.pt")!r})
        with torch.no_grad():
            torch.testing.assert_close(m(x).logits, torch.load({str(tmp_path / "expected.pt")!r}), atol=0, rtol=0)
        print("REMOTE_OK", type(m).__module__)
        """
    )
    # remote-code modules are cached in HF_HOME
    proc = run_without_package(script, tmp_path, timeout=300, HF_HOME=str(tmp_path / "hf_home"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "REMOTE_OK transformers_modules" in proc.stdout


# --------------------------------------------------------------------------------------------- training features


def test_gradient_checkpointing_gives_the_same_loss_and_grads():
    model = tiny_model(dropout=0.0).train()
    x = ids()

    def loss_and_grads():
        model.zero_grad()
        loss = model(x, labels=x).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    plain_loss, plain_grads = loss_and_grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.transformer.h[0].gradient_checkpointing
    ckpt_loss, ckpt_grads = loss_and_grads()
    torch.testing.assert_close(ckpt_loss, plain_loss)
    for name, g in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], g, msg=name)


def test_training_mode_does_not_build_a_cache():
    model = tiny_model().train()
    assert getattr(model(ids()), CACHE_FIELD) is None


def test_capability_flags():
    assert GPT2AccelForCausalLM._no_split_modules == ["GPT2AccelBlock"]
    assert GPT2AccelForCausalLM._supports_sdpa is True
    assert GPT2AccelForCausalLM.supports_gradient_checkpointing is True
    assert GPT2AccelForCausalLM._tied_weights_keys == {"lm_head.weight": "transformer.wte.weight"}
    model = tiny_model()
    block_cls = {type(m).__name__ for m in model.modules()}
    assert set(GPT2AccelForCausalLM._no_split_modules) <= block_cls


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [{}, MODERN], ids=["gpt2", "modern"])
def test_torch_compile_matches_eager(overrides):
    model = tiny_model(**overrides)
    x = ids()
    compiled = torch.compile(model, dynamic=False)
    with torch.no_grad():
        eager = model(x, use_cache=False).logits
        fast = compiled(x, use_cache=False).logits
    torch.testing.assert_close(fast, eager, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ skip_logits: chunked LM head + loss


def _loss_and_grads(model: GPT2AccelForCausalLM, **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(**kwargs)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _targets_with_ignored_rows(x: torch.Tensor, vocab: int) -> torch.Tensor:
    t = ids(*x.shape, vocab=vocab, seed=7)  # (B, T) aligned targets
    t[0, :4] = -100  # a masked prompt
    t[-1, -1] = -100
    return t


@pytest.mark.parametrize("chunk", [7, 1024])  # B*T = 39: chunks of 7 leave a partial one; 1024 = one chunk
def test_skip_logits_gives_the_loss_and_grads_of_the_logits_path(chunk):
    # vocab 100 padded to 128: the padded rows must stay out of the normaliser and get no gradient.
    model = tiny_model(vocab_size=100, pad_vocab_size_multiple=64, dropout=0.0).train()
    assert model.lm_head.weight.shape[0] == 128 and model.lm_head.weight is model.transformer.wte.weight
    model.loss_chunk_rows = chunk
    x = ids(3, 13, vocab=100)
    t = _targets_with_ignored_rows(x, 100)
    ref_loss, ref_grads = _loss_and_grads(model, input_ids=x, shift_labels=t)
    out = model(input_ids=x, shift_labels=t, skip_logits=True)
    assert out.logits is None
    loss, grads = _loss_and_grads(model, input_ids=x, shift_labels=t, skip_logits=True)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    for name, g in ref_grads.items():  # the tied wte/lm_head weight gets both of its gradient terms
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7, msg=name)
    # A padded id is never a target nor predicted: no gradient reaches its embedding row.
    assert grads["transformer.wte.weight"][100:].abs().max() == 0
    # HF-style labels (shifted inside) take the same route.
    torch.testing.assert_close(
        model(input_ids=x, labels=x, skip_logits=True).loss,
        model(input_ids=x, labels=x).loss,
        rtol=1e-6,
        atol=0,
    )


def test_skip_logits_equals_the_unpadded_model():
    padded = tiny_model(vocab_size=100, pad_vocab_size_multiple=64)
    unpadded = tiny_model(vocab_size=100, pad_vocab_size_multiple=1)
    with torch.no_grad():
        for p, q in zip(padded.parameters(), unpadded.parameters(), strict=True):
            q.copy_(p[: q.shape[0]] if p.shape != q.shape else p)
    x = ids(2, 12, vocab=100)
    t = _targets_with_ignored_rows(x, 100)
    with torch.no_grad():
        ref = unpadded(input_ids=x, shift_labels=t).loss
        torch.testing.assert_close(
            padded(input_ids=x, shift_labels=t, skip_logits=True).loss, ref, rtol=1e-6, atol=0
        )


def test_skip_logits_without_targets_says_what_to_pass():
    with pytest.raises(
        ValueError, match="skip_logits=True returns only the loss: pass labels or shift_labels"
    ):
        tiny_model()(ids(), skip_logits=True)


def test_skip_logits_with_gradient_checkpointing_and_bf16_autocast():
    model = tiny_model(dropout=0.0).train()
    model.loss_chunk_rows = 5
    x = ids()
    ref_loss, ref_grads = _loss_and_grads(model, input_ids=x, labels=x)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss, grads = _loss_and_grads(model, input_ids=x, labels=x, skip_logits=True)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7, msg=name)
    # bf16 autocast: bf16 matmuls, fp32 softmax; the same loss and gradients as the logits path to bf16 accuracy.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss, ref_grads = _loss_and_grads(model, input_ids=x, labels=x)
        loss, grads = _loss_and_grads(model, input_ids=x, labels=x, skip_logits=True)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=1e-2, atol=0)
    for name, g in ref_grads.items():
        assert g.dtype == grads[name].dtype == torch.float32
        assert (grads[name] - g).norm() <= 0.05 * g.norm() + 1e-6, name


@pytest.mark.slow
def test_skip_logits_under_torch_compile_matches_eager():
    model = tiny_model(vocab_size=100, dropout=0.0).train()
    model.loss_chunk_rows = 16  # B*T = 24: a full and a partial chunk
    x = ids(2, 12, vocab=100)
    t = _targets_with_ignored_rows(x, 100)
    ref_loss, ref_grads = _loss_and_grads(model, input_ids=x, shift_labels=t, skip_logits=True)
    compiled = torch.compile(model, dynamic=False)
    loss, grads = _loss_and_grads(compiled, input_ids=x, shift_labels=t, skip_logits=True)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    for name, g in ref_grads.items():  # the compiled wrapper names them _orig_mod.<name>
        torch.testing.assert_close(grads["_orig_mod." + name], g, rtol=1e-4, atol=1e-6, msg=name)
