"""`gpt2-accel sample`: reproducible sampling, KV-cache decoding equal to full recomputation, top-p, streaming."""

from __future__ import annotations

import pytest
import torch
from conftest import hf_generate

from gpt2_accel import GPT2AccelConfig, GPT2AccelForCausalLM
from gpt2_accel.cli.sample import main
from gpt2_accel.sample import generate_samples, load_model_and_tokenizer
from gpt2_accel.tokenization import get_tokenizer

pytestmark = pytest.mark.timeout(120)


def _save_ours(d):
    torch.manual_seed(0)
    GPT2AccelForCausalLM(
        GPT2AccelConfig(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)
    ).save_pretrained(d)
    get_tokenizer("gpt2").save_pretrained(d)
    return d


def _save_hf_gpt2(d, with_tokenizer: bool = True):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)
    ).save_pretrained(d)
    if with_tokenizer:
        get_tokenizer("gpt2").save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    return _save_ours(tmp_path_factory.mktemp("ours"))


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    return _save_hf_gpt2(tmp_path_factory.mktemp("hf_gpt2"))


def _cli(capsys, *argv) -> str:
    assert main(list(argv)) == 0
    out, err = capsys.readouterr()
    assert "Loading weights" not in err  # the console shows the samples, not transformers' loading bar
    return out


def test_same_seed_same_text_different_seed_different(ours, capsys):
    args = [
        "--model",
        str(ours),
        "--prompt",
        "Once upon a time",
        "--num_samples",
        "2",
        "--max_new_tokens",
        "12",
    ]
    a = _cli(capsys, *args, "--seed", "7", "--no-stream")
    b = _cli(capsys, *args, "--seed", "7", "--no-stream")
    c = _cli(capsys, *args, "--seed", "8", "--no-stream")
    assert a == b
    assert a != c
    samples = [s for s in a.split("---------------\n") if s.strip()]
    assert len(samples) == 2 and all(s.startswith("Once upon a time") for s in samples)
    assert samples[0] != samples[1]  # the RNG runs on between samples, as in nanoGPT


def test_streamed_output_is_the_generated_text(ours, capsys):
    model, tok = load_model_and_tokenizer(str(ours))
    expected = generate_samples(model, tok, "Hello", max_new_tokens=10, seed=3)[0]
    capsys.readouterr()
    out = _cli(
        capsys,
        "--model",
        str(ours),
        "--prompt",
        "Hello",
        "--num_samples",
        "1",
        "--max_new_tokens",
        "10",
        "--seed",
        "3",
    )
    assert out.rstrip("\n") == expected.rstrip("\n")


@pytest.mark.parametrize("which", ["ours", "hf_gpt2"])
def test_greedy_kv_cache_decoding_equals_full_recomputation(which, request):
    """Reference: argmax of a full forward over the whole sequence at each step, no cache."""
    model, tok = load_model_and_tokenizer(str(request.getfixturevalue(which)))
    prompt = "The quick brown fox"
    text = generate_samples(model, tok, prompt, max_new_tokens=15, temperature=0.0)[0]
    ids = tok(prompt)["input_ids"]
    with torch.no_grad():
        for _ in range(15):
            logits = model(torch.tensor([ids]), use_cache=False).logits  # (1, T, V)
            ids.append(int(logits[0, -1].argmax()))
    assert text == tok.decode(ids)


def test_tiny_top_p_is_greedy_and_top_p_one_is_not(ours):
    model, tok = load_model_and_tokenizer(str(ours))
    greedy = generate_samples(model, tok, "A", max_new_tokens=12, temperature=0.0)[0]
    nucleus = generate_samples(model, tok, "A", max_new_tokens=12, temperature=1.0, top_k=0, top_p=1e-6)[0]
    full = generate_samples(model, tok, "A", max_new_tokens=12, temperature=1.0, top_k=0, top_p=1.0, seed=1)[
        0
    ]
    assert nucleus == greedy  # the nucleus holds only the likeliest token
    assert full != greedy  # an untrained model's distribution is near uniform over 50k tokens


def test_default_prompt_is_newline_and_prompt_from_file(ours, tmp_path, capsys):
    out = _cli(capsys, "--model", str(ours), "--num_samples", "1", "--max_new_tokens", "3", "--no-stream")
    assert out.startswith("\n")
    f = tmp_path / "prompt.txt"
    f.write_text("To be, or not to be", encoding="utf-8")
    out = _cli(
        capsys,
        "--model",
        str(ours),
        "--prompt",
        f"FILE:{f}",
        "--num_samples",
        "1",
        "--max_new_tokens",
        "3",
        "--no-stream",
    )
    assert out.startswith("To be, or not to be")


def test_run_dir_without_final_model_samples_from_latest_checkpoint(ours, tmp_path, capsys):
    import shutil

    for step, mark in ((100, True), (200, True), (300, False)):  # step 300 is not committed (no COMPLETE)
        ck = tmp_path / "checkpoints" / f"step_{step:08d}"
        shutil.copytree(ours, ck / "model")
        if mark:
            (ck / "COMPLETE").touch()
    GPT2AccelForCausalLM.from_pretrained(ours).save_pretrained(tmp_path / "checkpoints/step_00000300/model")
    capsys.readouterr()  # the test's own load and save above
    args = ["--prompt", "x", "--num_samples", "1", "--max_new_tokens", "5", "--no-stream"]
    assert _cli(capsys, "--model", str(tmp_path), *args) == _cli(capsys, "--model", str(ours), *args)


def test_model_dir_without_tokenizer_uses_bundled_gpt2(tmp_path, hf_gpt2, capsys):
    bare = _save_hf_gpt2(tmp_path / "bare", with_tokenizer=False)
    args = [
        "--prompt",
        "Hi there",
        "--num_samples",
        "1",
        "--max_new_tokens",
        "5",
        "--no-stream",
        "--seed",
        "1",
    ]
    assert _cli(capsys, "--model", str(bare), *args) == _cli(capsys, "--model", str(hf_gpt2), *args)


def test_max_new_tokens_is_cut_to_the_context(ours):
    model, tok = load_model_and_tokenizer(str(ours))
    text = generate_samples(model, tok, "a", max_new_tokens=500, temperature=0.0)[0]
    assert len(tok(text)["input_ids"]) <= model.config.n_positions


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    assert main(["--model", str(tmp_path), "--num_samples", "1"]) == 1
    assert "holds no model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path), "--top_p", "0"])


@pytest.mark.parametrize("attn_type", ["SM", "GK"])
@pytest.mark.parametrize("static", [False, True])
def test_fast_decoder_greedy_equals_generate_and_recomputation(attn_type, static):
    """The static-cache decoder (gpt2_accel.decode) against generate() and against argmax of full forwards, for
    a batch of prompts; ``static`` is the fixed-shape step that CUDA compiles (run here uncompiled)."""
    from conftest import hf_generate, tiny_model

    from gpt2_accel.decode import Decoder

    model = tiny_model(attn_type=attn_type, initializer_range=0.2)
    prompt = torch.randint(0, 128, (3, 5), generator=torch.Generator().manual_seed(0))
    got = Decoder(model, static=static).generate(prompt, 20)
    want = hf_generate(  # transformers' own loop, not the decoder plugged into generate()
        model,
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=20,
        do_sample=False,
        pad_token_id=0,
    )
    assert torch.equal(got, want)
    assert len(set(got[0, 5:].tolist())) > 2  # not a degenerate repetition
    ids = prompt
    with torch.no_grad():
        for _ in range(20):
            ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(got, ids)


def test_fast_decoder_sampling_follows_top_k_top_p_and_the_seed():
    from conftest import tiny_model

    from gpt2_accel.decode import Decoder, _choose

    model = tiny_model(initializer_range=0.2)
    dec = Decoder(model)
    prompt = torch.tensor([[1, 2, 3]])
    torch.manual_seed(0)
    a = dec.generate(prompt, 30, temperature=1.0, top_k=50, top_p=0.9)
    torch.manual_seed(0)
    b = dec.generate(prompt, 30, temperature=1.0, top_k=50, top_p=0.9)
    assert torch.equal(a, b)
    # the filters keep exactly the tokens transformers' TopK/TopP warpers keep
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(4, 128, generator=torch.Generator().manual_seed(1))
    ref = TopPLogitsWarper(0.7)(None, TopKLogitsWarper(20)(None, logits.clone()))
    for _ in range(200):
        tok = _choose(logits, 1.0, 20, 0.7)
        assert torch.isfinite(ref.gather(1, tok[:, None])).all()
    kept = torch.isfinite(ref)
    seen = torch.zeros_like(kept)
    for _ in range(400):
        seen.scatter_(1, _choose(logits, 1.0, 20, 0.7)[:, None], True)
    assert torch.equal(seen | kept, kept)


def test_fast_decoder_refuses_a_block_it_does_not_compute():
    """An architecture option the decoder does not re-express (here a ReLU MLP) is caught by its self-check, so
    sampling falls back to generate() instead of decoding wrongly."""
    from conftest import tiny_model

    from gpt2_accel.decode import supports_fast_decoding

    model = tiny_model(initializer_range=0.2)
    assert supports_fast_decoding(model)
    mlp = model.transformer.h[1].mlp
    mlp.forward = lambda x: mlp.c_proj(torch.relu(mlp.c_fc(x)))
    assert not supports_fast_decoding(model)


def test_batched_sampling_decodes_the_samples_together_and_greedy_rows_equal_generate(
    ours, capsys, monkeypatch
):
    """`--batch_size` decodes several samples in one forward per token through the fast decoder; its greedy rows
    are transformers' generate() continuation, the same as one sample at a time."""
    import gpt2_accel.decode as decode

    model, tok = load_model_and_tokenizer(str(ours))
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.mul_(
            20
        )  # a varied greedy continuation, not one repeated token
    shapes = []
    real = decode.Decoder.generate

    def spy(self, input_ids, *args, **kwargs):
        shapes.append(tuple(input_ids.shape))
        return real(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(decode.Decoder, "generate", spy)
    prompt = "Once upon a time"
    kw = dict(max_new_tokens=12, temperature=0.0, seed=0)
    batched = generate_samples(model, tok, prompt, num_samples=5, batch_size=3, **kw)
    T = len(tok(prompt)["input_ids"])
    assert shapes == [(3, T), (2, T)]  # the fast path, two batches
    x = torch.tensor([tok(prompt)["input_ids"]])
    want = hf_generate(
        model, x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False, pad_token_id=0
    )
    want_text = tok.decode(want[0].tolist())
    assert len(set(want[0, T:].tolist())) > 2, "degenerate test model"
    assert (
        batched == [want_text] * 5 == generate_samples(model, tok, prompt, num_samples=5, batch_size=1, **kw)
    )
    with pytest.raises(ValueError, match="streaming prints one sample at a time"):
        generate_samples(model, tok, prompt, num_samples=2, batch_size=2, stream=True, **kw)
    # the command line: --batch_size > 1 prints whole samples (no streaming)
    out = _cli(capsys, "--model", str(ours), "--prompt", prompt, "--num_samples", "3", "--batch_size", "2",
               "--max_new_tokens", "5", "--temperature", "0")  # fmt: skip
    assert out.count("---------------") == 3 and out.count(prompt) == 3
