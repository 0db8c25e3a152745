"""The CPU decoding kernel (gpt2_accel.gemv) and what `gpt2-accel sample` builds on it (issue 19).

* the kernel's products against a float64 formula, fp32 and int8 weights, odd sizes, one and two threads;
* the torch path when the kernel cannot be built (no compiler), with the same greedy tokens;
* greedy tokens of the kernel decoder equal transformers' generate(), at batch sizes across the kernel's limit;
* the kernel's fused one-token step (every block in one call): logits against a float64 forward, with and
  without biases and norm gains, odd head sizes, int8 weights; the op-by-op path where it does not apply;
* weight-only int8 on a trained tiny model: the same greedy tokens and logits within a stated bound of fp32;
* `gpt2-accel sample --quantize int8`, and the errors where it cannot apply.
"""

from __future__ import annotations

import copy
import logging
from types import SimpleNamespace

import pytest
import torch
from conftest import hf_generate, jitter, tiny_model

from gpt2_accel import gemv
from gpt2_accel.decode import Decoder

pytestmark = pytest.mark.timeout(600)  # the first test in a fresh cache compiles the kernel (~1-3 min)

FP32_EPS = 2.0**-24  # unit roundoff of fp32


@pytest.fixture(scope="module")
def kernel():
    mod = gemv.kernel()
    if mod is None:
        pytest.skip(
            "gpt2_accel.gemv's kernel cannot be built here (no g++/ninja/AVX2): the torch path is tested"
        )
    return mod


def _bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Any order of fp32 sums of K products is within K * u * sum |x_k w_k| of the exact value (Higham,
    "Accuracy and Stability of Numerical Algorithms", 2nd ed., section 3.1), plus the final bias/scale roundings."""
    K = x.size(1)
    return (K + 2) * FP32_EPS * (x.double().abs() @ w.double().abs().t()) + 1e-30


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "M, N, K",
    [
        (1, 1, 1),
        (1, 7, 13),
        (2, 4, 8),
        (3, 130, 385),
        (5, 1537, 64),
        (33, 9, 40),
        (1, 33001, 65),
        (64, 9001, 33),
    ],
)
def test_kernel_equals_the_float64_product(kernel, M, N, K, threads):
    """fp32 and int8 weights, with and without bias. With 2 threads the kernel splits a product of more than
    ~8 MB of weights (or as much work): (1, 33001, 65) fp32 and (64, 9001, 33) fp32 and int8 are split."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(M * 1000 + N + K)
        x = torch.randn(M, K, generator=g)
        w = torch.randn(N, K, generator=g)
        b = torch.randn(N, generator=g)
        q, s = gemv.quantize_int8(w)
        wq = q.double() * s.double()[:, None]  # the int8 weights as the kernel must use them
        for weight, scale, exact_w in ((w, None, w.double()), (q, s, wq)):
            for bias in (None, b):
                want = x.double() @ exact_w.t() + (bias.double() if bias is not None else 0)  # (M, N)
                got = kernel.gemv(x, weight, scale, bias)
                assert got.shape == (M, N) and got.dtype == torch.float32
                err = (got.double() - want).abs()
                tol = _bound(x, exact_w.float()) + FP32_EPS * want.abs() * 2
                assert (err <= tol).all(), f"max error {err.max():.3g}, bound {tol[err > tol].min():.3g}"
    finally:
        torch.set_num_threads(old)


def test_int8_quantization_is_per_row_symmetric():
    w = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    w[2] *= 100  # one row's scale must not affect another's
    q, s = gemv.quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (6,)
    assert torch.equal(q.abs().amax(1), torch.full((6,), 127, dtype=torch.int8))
    assert ((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 + 1e-6).all()  # round to nearest
    assert torch.allclose(s, w.abs().amax(1) / 127)


def test_kernel_refuses_bad_inputs(kernel):
    x = torch.randn(1, 8)
    with pytest.raises(RuntimeError, match="x \\(M, K\\) and w \\(N, K\\)"):
        kernel.gemv(x, torch.randn(4, 9), None, None)
    with pytest.raises(RuntimeError, match="a scale goes with int8 weights"):
        kernel.gemv(x, torch.randn(4, 8), torch.ones(4), None)
    with pytest.raises(RuntimeError, match="contiguous fp32"):
        kernel.gemv(x.double(), torch.randn(4, 8), None, None)


def _generate(model, prompt, n):
    return hf_generate(  # transformers' own loop, not the decoder plugged into generate()
        model,
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,  # as `gpt2-accel sample`: no row stops (generate() would pad it after an eos)
    )


@pytest.mark.parametrize("batch", [1, 3, gemv.MAX_ROWS + 1])
def test_kernel_decoder_greedy_equals_generate(kernel, batch):
    """One row per prompt goes through the kernel up to MAX_ROWS prompts, through F.linear beyond; the prompt
    (batch x 5 rows) through F.linear or the kernel depending on its size. Both sum in another order than
    generate()'s BLAS: the greedy tokens must still be the same."""
    model = tiny_model(initializer_range=0.2)
    prompt = torch.randint(0, 128, (batch, 5), generator=torch.Generator().manual_seed(batch))
    dec = Decoder(model)
    assert (
        dec.kernel is kernel and dec.lin[0]["mlp_in"].wt is None
    )  # no transposed block copies with the kernel
    calls = _count_fused(dec)
    got = dec.generate(prompt, 20)
    assert calls["n"] == (19 if batch <= gemv.MAX_ROWS else 0)  # the fused step up to MAX_ROWS prompts
    assert torch.equal(got, _generate(model, prompt, 20))
    assert torch.equal(got, Decoder(model, kernel=False).generate(prompt, 20))


def _count_fused(dec: Decoder) -> dict:
    """Count the decoder's calls of the kernel's fused step (a proxy in front of the compiled module)."""
    calls = {"n": 0}
    real = dec.kernel

    def decode_step(*args):
        calls["n"] += 1
        return real.decode_step(*args)

    dec.kernel = SimpleNamespace(gemv=real.gemv, decode_step=decode_step)
    return calls


def _step_logits(dec: Decoder, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of positions prefill-1 .. T-1 of ``ids`` (B, T): the prompt's last, then one cached step each."""
    with torch.inference_mode():
        dec._alloc(ids.size(0), ids.size(1))
        out = [dec._prefill(ids[:, :prefill])]
        for i in range(prefill, ids.size(1)):
            out.append(dec._step(ids[:, i : i + 1], i))
    return torch.stack(out, 1)  # (B, T - prefill + 1, V)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"bias": False},  # no Linear or LayerNorm biases: empty tensors in the fused step's list
        {
            "n_embd": 60,
            "n_head": 4,
            "norm_elementwise_affine": False,
        },  # head size 15: the vector loops' tails
    ],
    ids=["gpt2", "no-bias", "odd-heads-no-gain"],
)
def test_fused_step_logits_equal_the_float64_forward(kernel, overrides):
    """Every step of the fused decoder (3 prompts, 40 positions) gives the float64 forward's logits to fp32
    rounding (1e-5 of the logits' scale), as the model's own fp32 forward does. Parameters are jittered so that
    a swapped bias, gain or GELU variant shows."""
    model = jitter(tiny_model(**overrides), scale=0.05)
    ref64 = copy.deepcopy(model).double()
    ids = torch.randint(0, 128, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref64(ids, use_cache=False).logits[:, 3:]  # (3, 37, V) float64
        fp32 = model(ids, use_cache=False).logits[:, 3:].double()
    dec = Decoder(model)
    calls = _count_fused(dec)
    got = _step_logits(dec, ids, 4).double()  # (3, 37, V)
    assert calls["n"] == 36
    scale = want.abs().amax()
    err, err_fp32 = (got - want).abs().amax() / scale, (fp32 - want).abs().amax() / scale
    assert err_fp32 < 1e-5  # the bound is one fp32 arithmetic meets
    assert err < 1e-5, (
        f"fused step {err:.3g} of the logits' scale from float64 (model's fp32 forward {err_fp32:.3g})"
    )
    # the op-by-op step (fused=False) agrees too: both are the same model
    unfused = _step_logits(Decoder(model, fused=False), ids, 4).double()
    assert (unfused - want).abs().amax() / scale < 1e-5


def test_fused_step_with_int8_weights_equals_the_op_by_op_int8_step(kernel):
    """int8 matrices go through the fused step too (row scales applied in the kernel): its logits equal the
    op-by-op int8 decoder's (the same quantised products, computed by the same kernel) to fp32 rounding."""
    model = jitter(tiny_model(), scale=0.05)
    ids = torch.randint(0, 128, (2, 30), generator=torch.Generator().manual_seed(1))
    fused = Decoder(model, quantize="int8")
    calls = _count_fused(fused)
    a = _step_logits(fused, ids, 3)
    b = _step_logits(Decoder(model, quantize="int8", fused=False), ids, 3)
    assert calls["n"] == 27
    assert ((a - b).abs().amax() / b.abs().amax()) < 1e-5


@pytest.mark.parametrize("attn_type", ["GK", "PA_relu"])
def test_non_softmax_attention_decodes_op_by_op(kernel, attn_type):
    """The fused step computes softmax attention only: other variants keep causal_attention, and their greedy
    tokens still equal generate()'s."""
    model = tiny_model(initializer_range=0.2, attn_type=attn_type)
    dec = Decoder(model)
    assert dec.fused is None
    prompt = torch.randint(0, 128, (2, 4), generator=torch.Generator().manual_seed(0))
    assert torch.equal(dec.generate(prompt, 16), _generate(model, prompt, 16))


def test_without_a_compiler_decoding_falls_back_to_torch(tmp_path, monkeypatch, caplog):
    """A machine without a C++ compiler: the build fails, a warning says so, and decoding still gives
    generate()'s tokens through torch's products. (CXX names a compiler that does not exist; a fresh extension
    directory so that no cached build is found.)"""
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.setattr(gemv, "_state", {})
    with caplog.at_level(logging.WARNING, logger="gpt2_accel.gemv"):
        assert gemv.kernel() is None
    assert "could not build the CPU decoding kernel" in caplog.text
    model = tiny_model(initializer_range=0.2)
    dec = Decoder(model)
    assert dec.kernel is None and dec.fused is None and dec.lin[0]["mlp_in"].wt is not None
    prompt = torch.randint(0, 128, (2, 4), generator=torch.Generator().manual_seed(0))
    assert torch.equal(dec.generate(prompt, 16), _generate(model, prompt, 16))
    with pytest.raises(ValueError, match=r"needs gpt2_accel\.gemv's CPU kernel, which could not be built"):
        Decoder(model, quantize="int8")
    monkeypatch.setattr(gemv, "_state", {})
    monkeypatch.setenv("GPT2_ACCEL_GEMV", "torch")  # the documented switch: torch's products without a build
    assert gemv.kernel() is None


# ----------------------------------------------------------------------------------------------- weight-only int8
@pytest.fixture(scope="module")
def trained():
    """A tiny model trained (100 AdamW steps, ~2 s at 1 thread) to follow a fixed random permutation of its 128
    tokens: confident predictions, as a trained model makes (a freshly initialised one has near-tied logits,
    where any rounding picks another argmax)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny steps: a second thread only waits (minutes on a loaded 2-core host)
    try:
        torch.manual_seed(0)
        model = tiny_model(seed=0).train()
        perm = torch.randperm(128, generator=torch.Generator().manual_seed(0))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(1)
        for _ in range(100):
            seq = [torch.randint(0, 128, (4,), generator=g)]
            for _ in range(42):
                seq.append(perm[seq[-1]])
            ids = torch.stack(seq, 1)  # (4, 43): every position the test decodes
            logits = model(ids[:, :-1]).logits  # (4, 42, V)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(old)
    assert loss.item() < 0.1, f"the tiny model did not learn the permutation (loss {loss.item():.3f})"
    return model.eval(), perm


INT8_LOGIT_TOL = 0.01
"""Stated tolerance of int8 decoding: max |logit(int8) - logit(fp32)| per position, relative to the range of the
fp32 logits (max - min). Measured 0.0021 on the trained tiny model below (0.048 absolute on a range of ~23)."""


def test_int8_decoding_stays_within_the_stated_tolerance(kernel, trained):
    """Greedy tokens of int8 decoding equal fp32's (all 40, batch of 3 prompts), and every step's logits are
    within INT8_LOGIT_TOL of the fp32 decoder's, relative to their range."""
    model, perm = trained
    prompt = torch.tensor([[3, 5], [77, 1], [100, 42]])
    fp32, int8 = Decoder(model), Decoder(model, quantize="int8")
    want = fp32.generate(prompt, 40)
    got = int8.generate(prompt, 40)
    assert torch.equal(got, want)
    assert torch.equal(want[:, 2:], perm[want[:, 1:-1]])  # the model does follow the permutation
    # logits of every decoded position: prefill, then steps fed the same tokens
    with torch.inference_mode():
        fp32._alloc(3, 42)
        int8._alloc(3, 42)
        a, b = [fp32._prefill(prompt)], [int8._prefill(prompt)]
        for i in range(2, 41):
            a.append(fp32._step(want[:, i : i + 1], i))
            b.append(int8._step(want[:, i : i + 1], i))
    a, b = torch.stack(a), torch.stack(b)  # (40, 3, V)
    rng = a.amax(-1) - a.amin(-1)  # (40, 3)
    rel = (a - b).abs().amax(-1) / rng
    assert rel.max() < INT8_LOGIT_TOL, f"int8 logits {rel.max():.4f} of the range away from fp32"
    assert rel.max() > 0  # int8 is really in use
    assert (
        int8.weight_bytes() < 0.4 * fp32.weight_bytes()
    )  # int8 matrices + fp32 scales, LayerNorms, positions


def test_fused_greedy_tokens_equal_generate_on_a_trained_model(kernel, trained):
    """On a trained model (confident logits) the fused decoder's 40 greedy tokens equal generate()'s and follow
    what the model learned, at batch 1 and 3."""
    model, perm = trained
    for prompt in (torch.tensor([[9, 4]]), torch.tensor([[3, 5], [77, 1], [100, 42]])):
        dec = Decoder(model)
        calls = _count_fused(dec)
        got = dec.generate(prompt, 40)
        assert calls["n"] == 39
        assert torch.equal(got, _generate(model, prompt, 40))
        assert torch.equal(got[:, 2:], perm[got[:, 1:-1]])


def test_int8_is_refused_where_it_cannot_apply():
    model = tiny_model()
    with pytest.raises(ValueError, match="quantize must be one of"):
        Decoder(model, quantize="int4")
    with pytest.raises(ValueError, match=r"decodes fp32 weights on the CPU; this model is torch\.bfloat16"):
        Decoder(tiny_model().to(torch.bfloat16), quantize="int8")


# ----------------------------------------------------------------------------------------------- the command
def _samples(out: str) -> list[str]:
    """The sample lines of the command's stdout (without a third-party library's one-off notice)."""
    return [line for line in out.splitlines() if "real_accelerator" not in line]


def test_sample_quantize_int8_command(kernel, tmp_path, capsys, monkeypatch):
    from gpt2_accel.cli.sample import main
    from gpt2_accel.sample import generate_samples, load_model_and_tokenizer
    from gpt2_accel.tokenization import get_tokenizer

    torch.manual_seed(0)
    tiny_model(vocab_size=50257, n_embd=32, n_head=2).save_pretrained(tmp_path / "ours")
    get_tokenizer("gpt2").save_pretrained(tmp_path / "ours")
    made = []
    real = Decoder.__init__

    def spy(self, *a, **kw):
        made.append(kw.get("quantize"))
        real(self, *a, **kw)

    monkeypatch.setattr(Decoder, "__init__", spy)
    args = ["--model", str(tmp_path / "ours"), "--prompt", "Hello", "--num_samples", "2", "--max_new_tokens", "8",
            "--quantize", "int8", "--no-stream"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("---------------") == 2 and out.count("Hello") == 2
    assert "int8" in made
    assert main(args) == 0 and _samples(capsys.readouterr().out) == _samples(out)  # same seed, same text
    # greedy: the library call with quantize gives the text the command prints
    model, tok = load_model_and_tokenizer(str(tmp_path / "ours"))
    text = generate_samples(
        model, tok, "Hello", num_samples=1, max_new_tokens=8, temperature=0, quantize="int8"
    )
    assert main([*args[:-3], "--temperature", "0", "--num_samples", "1", "--no-stream"]) == 0
    assert _samples(capsys.readouterr().out)[0] == text[0]

    # a transformers model samples through generate(): int8 does not apply, and the error says what to do
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=32)).save_pretrained(
        tmp_path / "hf"
    )
    get_tokenizer("gpt2").save_pretrained(tmp_path / "hf")
    assert main(["--model", str(tmp_path / "hf"), "--quantize", "int8", "--num_samples", "1"]) == 2
    assert "leave quantization off" in capsys.readouterr().err
    assert main([*args, "--dtype", "bfloat16"]) == 2
    assert "decodes fp32 weights on the CPU" in capsys.readouterr().err
