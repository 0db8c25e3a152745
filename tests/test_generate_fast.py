"""generate() on our model runs its greedy/sampling loop on gpt2_accel.decode's decoder (issue 19).

transformers prepares the call (generation config, logits processors, stopping criteria, the prompt streamed);
``GPT2AccelForCausalLM._sample`` hands the loop to ``gpt2_accel.decode.fast_sample``, which returns None where the
decoder does not compute the call exactly, and transformers' own loop runs. The reference everywhere is that
loop (``model.fast_sample = None``):

* the same tokens for greedy, seeded sampling (temperature, top-k, top-p), processors (repetition penalty,
  min_new_tokens, no_repeat_ngram), eos lists with rows finishing early and padding, max_length, streamers;
* the decoder really ran (a spy on its prefill), and did NOT run where it would be wrong: padding, training mode,
  returned scores, beams, no cache, a static cache, bf16, a hooked layer, a PEFT adapter;
* weights changed in place, reloaded or moved rebuild the decoder; the cache of decoders does not keep a model alive;
  the tokens returned are ordinary tensors (usable in a training step).
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from conftest import hf_generate as hf_loop
from conftest import jitter, tiny_model
from transformers import GenerationConfig

from gpt2_accel import GPT2AccelForCausalLM
from gpt2_accel import decode as decode_mod


@pytest.fixture
def prefills(monkeypatch) -> dict:
    """Counts the decoder's prompt passes made by generate() (the check against the model's forward excluded)."""
    calls = {"n": 0}
    real = decode_mod.Decoder._prefill

    def spy(self, ids):
        if ids.shape != (1, 4):  # agrees_with_model's own 4-token check
            calls["n"] += 1
        return real(self, ids)

    monkeypatch.setattr(decode_mod.Decoder, "_prefill", spy)
    return calls


@pytest.fixture(scope="module")
def model() -> GPT2AccelForCausalLM:
    return tiny_model(initializer_range=0.2)


def _prompt(batch: int, t: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 128, (batch, t), generator=torch.Generator().manual_seed(seed))  # 0 is the pad id


CASES = {
    "greedy": dict(max_new_tokens=24, do_sample=False),
    "max_length": dict(max_length=29, do_sample=False),
    "sample": dict(max_new_tokens=24, do_sample=True, temperature=1.3, top_k=20, top_p=0.9),
    "sample-plain": dict(max_new_tokens=24, do_sample=True, top_k=0),
    "processors": dict(max_new_tokens=24, do_sample=False, repetition_penalty=1.4, no_repeat_ngram_size=2),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("batch", [1, 3, 33])
def test_generate_uses_the_decoder_and_equals_transformers_loop(model, prefills, case, batch):
    assert GPT2AccelForCausalLM.fast_sample is decode_mod.fast_sample  # plugged in by importing gpt2_accel
    x = _prompt(batch)
    kw = dict(CASES[case], pad_token_id=0, eos_token_id=None)
    torch.manual_seed(7)
    got = model.generate(x, **kw)
    assert prefills["n"] == 1, "generate() did not run the decoder"
    torch.manual_seed(7)
    want = hf_loop(model, x, **kw)
    assert prefills["n"] == 1
    assert got.shape == want.shape == (batch, 29)
    assert torch.equal(got, want)
    assert len(set(got[0, 5:].tolist())) > 3, "degenerate test model"


def test_eos_rows_finish_early_and_are_padded_as_transformers_does(model, prefills):
    """Several eos ids; rows stop at different steps, later tokens are pad_token_id, and generation ends when all
    rows are done (a shorter output). min_new_tokens holds eos back for the first steps."""
    x = _prompt(4, seed=3)
    free = hf_loop(model, x, max_new_tokens=30, do_sample=False, eos_token_id=None, pad_token_id=0)[:, 5:]
    # eos = the first new token of rows 0 and 1 at step 2 and 6, so those rows end early, at different steps
    eos = sorted({int(free[0, 2]), int(free[1, 6])})
    kw = dict(max_new_tokens=30, do_sample=False, eos_token_id=eos, pad_token_id=99)
    got = model.generate(x, **kw)
    want = hf_loop(model, x, **kw)
    assert prefills["n"] == 1
    assert torch.equal(got, want)
    assert (got == 99).any(), "no row finished early: the test does not test padding"
    held = model.generate(x, min_new_tokens=8, **kw)
    assert torch.equal(held, hf_loop(model, x, min_new_tokens=8, **kw))
    assert not torch.isin(held[:, 5:13], torch.tensor(eos)).any()


def test_generation_config_and_streamer(model, prefills):
    class Collect:
        def __init__(self):
            self.parts, self.ended = [], False

        def put(self, t):
            self.parts.append(t.clone())

        def end(self):
            self.ended = True

    x = _prompt(1)
    cfg = GenerationConfig(max_new_tokens=12, do_sample=True, temperature=0.8, top_p=0.8, pad_token_id=0)
    a, b = Collect(), Collect()
    torch.manual_seed(3)
    got = model.generate(x, generation_config=cfg, streamer=a)
    torch.manual_seed(3)
    want = hf_loop(model, x, generation_config=cfg, streamer=b)
    assert prefills["n"] == 1
    assert torch.equal(got, want) and a.ended and b.ended
    assert len(a.parts) == len(b.parts) == 13  # the prompt, then one put per token
    assert all(torch.equal(p, q) for p, q in zip(a.parts, b.parts, strict=True))


def _left_padded(m, x) -> dict:
    return dict(
        attention_mask=torch.cat([torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 3, dtype=torch.long)], 1)
    )


FALLBACKS = {
    "padding": _left_padded,
    "training mode": lambda m, x: m.train() and {},
    "scores": lambda m, x: dict(return_dict_in_generate=True, output_scores=True),
    "beams": lambda m, x: dict(num_beams=2),
    "no cache": lambda m, x: dict(use_cache=False),
    "static cache": lambda m, x: dict(cache_implementation="static"),
    "forward hook": lambda m, x: m.transformer.h[0].mlp.register_forward_hook(lambda *a: None) and {},
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_calls_the_decoder_does_not_compute_go_to_transformers_loop(prefills, case):
    m = tiny_model(initializer_range=0.2, n_positions=32)
    x = _prompt(3)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, **FALLBACKS[case](m, x))
    got = m.generate(x, **kw)
    assert prefills["n"] == 0, f"the decoder ran for {case}"
    want = hf_loop(m, x, **kw)
    if case == "scores":
        got, want = got.sequences, want.sequences
    if case != "training mode":  # dropout is 0 in the tiny config: the same tokens either way
        assert torch.equal(got, want)
    # too long for the context: transformers' loop (and its handling) too
    m.eval()
    hooks = [h for mod in m.modules() for h in (mod._forward_hooks,)]
    for h in hooks:
        h.clear()
    with pytest.raises(Exception):  # noqa: B017 - whatever transformers' loop raises past n_positions
        m.generate(x, max_new_tokens=40, do_sample=False, pad_token_id=0)
    assert prefills["n"] == 0


def test_bf16_and_peft_adapters_use_transformers_loop(model, prefills):
    peft = pytest.importorskip("peft")
    x = _prompt(2)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    half = tiny_model(initializer_range=0.2).to(torch.bfloat16)
    half.generate(x, **kw)
    assert prefills["n"] == 0
    # LoRA with non-zero B: the adapted layers' weight attribute is the base weight, so the decoder would be wrong
    base = tiny_model(initializer_range=0.2)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], init_lora_weights=False)
    lora = peft.get_peft_model(base, cfg).eval()
    got = lora.generate(input_ids=x, **kw)
    assert prefills["n"] == 0
    merged = lora.merge_and_unload()
    assert torch.equal(got, hf_loop(merged, x, **kw))
    assert torch.equal(merged.generate(x, **kw), got)  # merged, it is a plain model again: the decoder
    assert prefills["n"] == 1


def test_changed_weights_rebuild_the_decoder_and_the_cache_keeps_no_model_alive(prefills):
    m = tiny_model(initializer_range=0.2)
    x = _prompt(1)  # one row: the head's product reads the decoder's transposed copy, which goes stale
    kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=0)
    before = m.generate(x, **kw)
    jitter(m, scale=0.3)  # in place, as an optimizer step
    after = m.generate(x, **kw)
    assert not torch.equal(after, before)
    assert torch.equal(after, hf_loop(m, x, **kw))
    m.load_state_dict(tiny_model(seed=5, initializer_range=0.2).state_dict())
    assert torch.equal(m.generate(x, **kw), hf_loop(m, x, **kw))
    assert prefills["n"] == 3
    # the tokens are ordinary tensors: a training step on them works
    out = m.generate(x, **kw)
    m.train()
    m(out, labels=out).loss.backward()
    assert m.lm_head.weight.grad is not None
    ref = weakref.ref(m)
    del m
    gc.collect()
    assert ref() is None, "the decoder cache keeps the model alive"
