"""`gpt2-accel export`: transformers, GGUF (llama.cpp) and ONNX (onnxruntime), each checked against the runtime
that loads it, on a run directory the trainer writes. Bad input fails before anything is written."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt2_accel.cli.export import main
from gpt2_accel.export import ExportError, export

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "ROMEO: But soft, what light"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A model directory as the trainer writes it (save_pretrained + the GPT-2 BPE with the model's context): a
    2-layer, 64-wide GPT-2 whose non-embedding weights are spread wide (std ~0.3), so that greedy decoding gives a
    varied, context-dependent token sequence rather than one repeated token."""
    from gpt2_accel import GPT2AccelConfig, GPT2AccelForCausalLM
    from gpt2_accel.tokenization import get_tokenizer

    torch.manual_seed(0)
    config = GPT2AccelConfig(
        vocab_size=50257, n_positions=64, n_embd=64, n_layer=2, n_head=2, pad_vocab_size_multiple=64
    )
    model = GPT2AccelForCausalLM(config).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "wte" not in name:  # a wide tied embedding makes every token predict itself
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    out = tmp_path_factory.mktemp("export") / "run"
    model.save_pretrained(out)
    get_tokenizer("gpt2").save_pretrained(out, model_max_length=config.n_positions)
    return out


def _ours(run: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(run).eval()


def _greedy(model, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, pad_token_id=0
        )
    return out[0, len(ids) :].tolist()


def _prompt_ids(run: Path) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(run, trust_remote_code=False)(PROMPT)["input_ids"]


# ------------------------------------------------------------------------------------------------ bad input


def test_unsupported_quantisation_and_existing_output_fail_before_writing(run_dir, tmp_path):
    with pytest.raises(
        ExportError, match=r"--outtype 'q4_0' is not supported for --format gguf.*f32, f16, q8_0"
    ):
        export(str(run_dir), "gguf", tmp_path / "m.gguf", outtype="q4_0")
    with pytest.raises(ExportError, match=r"--outtype 'f16' is not supported for --format onnx"):
        export(str(run_dir), "onnx", tmp_path / "onnx", outtype="f16")
    assert list(tmp_path.iterdir()) == []
    existing = tmp_path / "m.gguf"
    existing.write_bytes(b"keep me")
    with pytest.raises(ExportError, match="already exists; pass --overwrite"):
        export(str(run_dir), "gguf", existing)
    assert existing.read_bytes() == b"keep me"
    # the command line says the same, with exit status 2
    with pytest.raises(SystemExit) as e:
        main([str(run_dir), "--format", "gguf", "--output", str(existing)])
    assert e.value.code == 2 and existing.read_bytes() == b"keep me"


@pytest.mark.parametrize("fmt", ["hf", "gguf", "onnx"])
def test_gk_attention_cannot_be_exported_and_nothing_is_written(fmt, tmp_path):
    from conftest import tiny_model

    src = tmp_path / "gk"
    tiny_model(attn_type="GK").save_pretrained(src)
    out = tmp_path / "out"
    with pytest.raises(
        ExportError, match=rf"attn_type='GK' cannot be exported to {fmt}: .*softmax attention only"
    ):
        export(str(src), fmt, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gk"]


def test_failed_export_leaves_no_partial_file_and_keeps_the_old_one(run_dir, tmp_path, monkeypatch):
    import gpt2_accel.export as ex

    target = tmp_path / "m.gguf"
    target.write_bytes(b"previous export")

    def broken(directory, path, outtype="f32", **kwargs):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(ex, "write_gguf", broken)
    with pytest.raises(OSError, match="disk full"):
        export(str(run_dir), "gguf", target, overwrite=True)
    assert target.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no temporary left either


# ------------------------------------------------------------------------------------------------ transformers


def test_hf_export_loads_without_our_package_or_any_prompt(run_dir, tmp_path):
    out = tmp_path / "hf"
    assert main([str(run_dir), "--format", "hf", "--output", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["n_ctx"] == cfg["n_positions"] == 64 and "auto_map" not in cfg
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 64
    assert (out.stat().st_mode & 0o777) == (0o777 & ~_umask())  # an ordinary directory, not mkdtemp's 0700
    ids = _prompt_ids(run_dir)
    want = _greedy(_ours(run_dir), ids, 16)
    assert len(set(want)) > 2, f"the test model is degenerate: {want}"
    # A fresh process without gpt2_accel on the path and no terminal to answer a prompt.
    code = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"tok = AutoTokenizer.from_pretrained({str(out)!r})\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()\n"
        f"x = torch.tensor([tok({PROMPT!r})['input_ids']])\n"
        "g = m.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=16, do_sample=False, pad_token_id=0)\n"
        "print(json.dumps([type(m).__name__, tok.model_max_length, g[0, x.size(1):].tolist(),\n"
        "                  'gpt2_accel' in sys.modules]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env={**env, "HF_HUB_OFFLINE": "1"},
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "custom code" not in proc.stdout + proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == ["GPT2LMHeadModel", 64, want, False]


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


# ------------------------------------------------------------------------------------------------ GGUF


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_gguf_holds_the_exported_weights_tokenizer_and_hyperparameters(run_dir, tmp_path, outtype):
    gguf = pytest.importorskip("gguf")
    from gguf.quants import dequantize
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from gpt2_accel.convert import to_hf_gpt2

    out = tmp_path / f"m-{outtype}.gguf"
    assert main([str(run_dir), "--format", "gguf", "--output", str(out), "--outtype", outtype]) == 0
    r = gguf.GGUFReader(out)

    def field(key):
        f = r.fields[key]
        return f.contents()

    assert field("general.architecture") == "gpt2"
    assert field("gpt2.context_length") == 64 and field("gpt2.embedding_length") == 64
    assert field("gpt2.block_count") == 2 and field("gpt2.attention.head_count") == 2
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    tok = AutoTokenizer.from_pretrained(run_dir, trust_remote_code=False)
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == 50257 and tokens[tok.eos_token_id] == "<|endoftext|>"
    assert tokens[:300] == tok.convert_ids_to_tokens(list(range(300)))
    assert field("tokenizer.ggml.eos_token_id") == field("tokenizer.ggml.bos_token_id") == 50256
    assert len(field("tokenizer.ggml.merges")) == 50000  # GPT-2's BPE merges

    hf: GPT2LMHeadModel = to_hf_gpt2(_ours(run_dir))
    want = {
        "token_embd.weight": hf.transformer.wte.weight,
        "position_embd.weight": hf.transformer.wpe.weight,
        "blk.1.attn_qkv.weight": hf.transformer.h[1].attn.c_attn.weight.t(),  # Conv1D (in, out) -> (out, in)
        "blk.1.attn_qkv.bias": hf.transformer.h[1].attn.c_attn.bias,
        "blk.0.ffn_down.weight": hf.transformer.h[0].mlp.c_proj.weight.t(),
        "output_norm.weight": hf.transformer.ln_f.weight,
    }
    got = {t.name: t for t in r.tensors}
    assert "output.weight" not in got  # tied head: llama.cpp reuses token_embd
    tol = {"f32": 0.0, "f16": 1e-3, "q8_0": 2e-2}[outtype]
    for name, w in want.items():
        t = got[name]
        data = torch.from_numpy(dequantize(t.data, t.tensor_type).reshape(w.shape).astype("float32").copy())
        torch.testing.assert_close(
            data, w.detach().float(), atol=tol * w.abs().max().item(), rtol=0, msg=name
        )
        if w.dim() == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, name  # norms and biases stay f32
        else:
            expect = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}[outtype]
            assert t.tensor_type == gguf.GGMLQuantizationType[expect], name


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:
        # scripts/setup_env.sh (scripts/llama_cpp_wheel.sh) says what happened to the binding's build
        setup = os.environ.get("GPT2_ACCEL_LLAMA_CPP_STATUS", "no set-up status: not run by scripts/test.sh")
        pytest.skip(
            f"llama_cpp is not importable ({e}); set-up: {setup}. `bash scripts/llama_cpp_wheel.sh` builds and "
            "caches it (compiles llama.cpp, ~5-25 min)"
        )
    return llama_cpp


def _llama_cpp_run(path: Path, ids: list[int], n: int):
    """llama.cpp on the GGUF at ``path``: its own tokenisation of PROMPT, the next-token logits after ``ids``
    and its first ``n`` greedy tokens."""
    import numpy as np

    llama_cpp = _llama_cpp()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, verbose=False, logits_all=False)
    tokens = llm.tokenize(PROMPT.encode(), add_bos=False, special=False)
    llm.reset()
    llm.eval(ids)
    # The last prompt position's logits, through llama.cpp's C API (logits_all=False keeps no score rows)
    last = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    logits = torch.from_numpy(np.ctypeslib.as_array(last, shape=(llm.n_vocab(),)).copy())  # (V,)
    got = []
    for tok in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        got.append(tok)
        if len(got) == n:
            break
    llm.close()
    return tokens, logits, got


def _hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].float()  # (V,)


def _check_llama_cpp(gguf_path: Path, hf_model, ids: list[int], outtype: str) -> None:
    """llama.cpp's tokenizer splits PROMPT into ``ids`` (transformers'); its next-token logits after the prompt are
    within 0.1% (f32), 1% (f16), 8% (q8_0) of the span of transformers' logits; f32/f16: its first 16 greedy tokens
    equal transformers'; q8_0 (weights rounded to 8 bits): its first greedy token does (a longer greedy run of a
    random model flips on near-ties, so it is not asserted)."""
    want = _greedy(hf_model, ids, 16)
    assert len(set(want)) > 2, f"the test model is degenerate: {want}"
    tokens, logits, got = _llama_cpp_run(gguf_path, ids, 16)
    assert tokens == ids  # llama.cpp's BPE, read from the GGUF's vocabulary and merges
    ref = _hf_logits(hf_model, ids)
    span = (ref.max() - ref.min()).item()
    # f32 differs by llama.cpp's f16 KV cache (measured <= 8e-4 of the span), f16 by its weight rounding too
    # (5e-4); q8_0 rounds weights and (in llama.cpp's dot products) activations to 8 bits, which these tests' wide
    # random weights (std 0.3) amplify: measured 1.0e-2 (gpt2), 5.4e-2 (llama), 2.3e-2 (qwen3). A wrong layout,
    # rotation or norm gives errors of the order of the span itself.
    tol = {"f32": 1e-3, "f16": 1e-2, "q8_0": 8e-2}[outtype]
    print(
        f"{gguf_path.name}: llama.cpp logits within {(logits - ref).abs().max().item() / span:.2e} of the span"
    )
    torch.testing.assert_close(logits, ref, atol=tol * span, rtol=0)
    if outtype == "q8_0":
        assert got[0] == want[0]
    else:
        assert got == want


@pytest.mark.slow
@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_llama_cpp_greedy_tokens_equal_transformers(run_dir, tmp_path, outtype):
    _llama_cpp()
    out = tmp_path / f"m-{outtype}.gguf"
    assert main([str(run_dir), "--format", "gguf", "--output", str(out), "--outtype", outtype]) == 0
    _check_llama_cpp(out, _ours(run_dir), _prompt_ids(run_dir), outtype)


# ------------------------------------------------------------------------------------------------ GGUF: Llama, Qwen3

ROTARY = dict(position_embedding_type="rope", norm_type="rmsnorm", mlp_type="swiglu", bias=False)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
# name -> (our options, llama.cpp architecture). Prompt + 16 new tokens reach position ~24, past YaRN's 16.
ROTARY_RUNS = {
    "llama": (  # GQA, YaRN with its default attention temperature, every bias, untied head
        dict(ROTARY, n_kv_head=2, rope_scaling=YARN, attention_bias=True, mlp_bias=True, tie_word_embeddings=False),
        "llama",
    ),
    "llama_mha_attention_factor": (  # MHA, tied head, YaRN with an explicit attention_factor
        dict(ROTARY, rope_scaling=dict(YARN, factor=2.0, attention_factor=1.5)),
        "llama",
    ),
    "qwen3": (dict(ROTARY, n_kv_head=1, qk_norm=True, rope_theta=50000.0), "qwen3"),  # MQA, qk-norm
}  # fmt: skip


@pytest.fixture(scope="module")
def rotary_runs(tmp_path_factory) -> dict[str, Path]:
    """Llama-class (GQA, YaRN, biases, untied head) and Qwen3-class (MQA, qk-norm) model directories with the GPT-2
    BPE, weights spread as in ``run_dir`` so that greedy decoding varies."""
    from conftest import tiny_model

    from gpt2_accel.tokenization import get_tokenizer

    runs = {}
    for name, (options, _) in ROTARY_RUNS.items():
        model = tiny_model(vocab_size=50257, pad_vocab_size_multiple=64, **options)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "wte" not in pname:
                    p.add_(0.3 * torch.randn(p.shape, generator=g))
        out = tmp_path_factory.mktemp("rotary") / name
        model.save_pretrained(out)
        get_tokenizer("gpt2").save_pretrained(out, model_max_length=model.config.n_positions)
        runs[name] = out
    return runs


def _rope_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """llama.cpp's "normal" rope (ggml_rope, mode 0): rotate adjacent pairs (x_2i, x_2i+1) by angle i.
    x: (T, nh, hs); cos, sin: (T, hs/2), the angles' cosines and sines (attention scaling included)."""
    a, b = x[..., 0::2], x[..., 1::2]
    c, s = cos[:, None], sin[:, None]
    return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2)


@pytest.mark.parametrize("name", list(ROTARY_RUNS))
def test_gguf_of_llama_and_qwen3_models_holds_their_weights_and_hyperparameters(rotary_runs, tmp_path, name):
    gguf = pytest.importorskip("gguf")
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from gpt2_accel.convert import to_hf

    arch = ROTARY_RUNS[name][1]
    out = tmp_path / f"{name}.gguf"
    assert main([str(rotary_runs[name]), "--format", "gguf", "--output", str(out)]) == 0
    r = gguf.GGUFReader(out)
    field = {k: f.contents() for k, f in r.fields.items()}
    hf = to_hf(_ours(rotary_runs[name])).double()
    c = hf.config
    assert field["general.architecture"] == arch and field["general.name"] == name
    expect = {
        "context_length": 64, "embedding_length": 64, "feed_forward_length": c.intermediate_size, "block_count": 2,
        "attention.head_count": 4, "attention.head_count_kv": c.num_key_value_heads, "rope.dimension_count": 16,
        "rope.freq_base": c.rope_parameters["rope_theta"], "vocab_size": 50257,
    }  # fmt: skip
    assert {k: field[f"{arch}.{k}"] for k in expect} == expect
    assert field[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(c.rms_norm_eps)
    options = ROTARY_RUNS[name][0]
    yarn = options.get("rope_scaling")
    if yarn:
        assert (
            field["llama.rope.scaling.type"] == "yarn"
            and field["llama.rope.scaling.factor"] == yarn["factor"]
        )
        assert field["llama.rope.scaling.original_context_length"] == 16
        if "attention_factor" in yarn:  # llama.cpp multiplies its own 0.1 ln(factor) + 1 by this
            want_attn = yarn["attention_factor"] / (0.1 * math.log(yarn["factor"]) + 1)
            assert field["llama.rope.scaling.attn_factor"] == pytest.approx(want_attn)
        else:
            assert "llama.rope.scaling.attn_factor" not in field
    else:
        assert f"{arch}.rope.scaling.type" not in field
    assert field["tokenizer.ggml.model"] == "gpt2" and field["tokenizer.ggml.pre"] == "gpt-2"
    assert len(field["tokenizer.ggml.tokens"]) == 50257 and len(field["tokenizer.ggml.merges"]) == 50000

    # Every transformers tensor is there once, under llama.cpp's name and (out, in) shape.
    got = {
        t.name: torch.from_numpy(t.data.copy()).double().reshape(tuple(reversed(t.shape.tolist())))
        for t in r.tensors
    }
    per_layer = [
        "attn_norm",
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_output",
        "ffn_norm",
        "ffn_gate",
        "ffn_up",
        "ffn_down",
    ]
    if options.get("attention_bias"):
        per_layer += ["attn_q.bias", "attn_k.bias", "attn_v.bias", "attn_output.bias"]
    if options.get("mlp_bias"):
        per_layer += ["ffn_gate.bias", "ffn_up.bias", "ffn_down.bias"]
    if arch == "qwen3":
        per_layer += ["attn_q_norm", "attn_k_norm"]
    untied = options.get("tie_word_embeddings") is False
    names = {"token_embd.weight", "output_norm.weight"} | ({"output.weight"} if untied else set())
    names |= {
        f"blk.{i}.{n}" + ("" if n.endswith(".bias") else ".weight") for i in range(2) for n in per_layer
    }
    assert set(got) == names  # fmt: skip
    att = hf.model.layers[1].self_attn
    assert got["blk.1.attn_v.weight"].shape == att.v_proj.weight.shape
    torch.testing.assert_close(got["blk.1.attn_output.weight"], att.o_proj.weight, atol=0, rtol=0)
    torch.testing.assert_close(
        got["blk.1.ffn_gate.weight"], hf.model.layers[1].mlp.gate_proj.weight, atol=0, rtol=0
    )

    # Q and K: attention scores computed the llama.cpp way (its rope on the GGUF's rows) equal transformers'
    # (its rope on q_proj/k_proj), in float64, at positions 0..19 -- whatever row order each uses.
    T, nh, nkv, hs = 20, 4, c.num_key_value_heads, 16
    x = torch.randn(T, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(T, dtype=torch.float64)
    cos, sin = hf.model.rotary_emb(x[None], pos[None].long())  # (1, T, hs), YaRN's scaling included

    def heads(w, b, n):
        y = x @ w.T + (b if b is not None else 0)  # (T, n * hs)
        return y.view(T, n, hs)

    def scores(q, k):  # (T, nh, hs), (T, nkv, hs) -> (nh, T, T)
        return torch.einsum("thd,shd->hts", q, k.repeat_interleave(nh // nkv, dim=1))

    q, k = heads(att.q_proj.weight, att.q_proj.bias, nh), heads(att.k_proj.weight, att.k_proj.bias, nkv)
    if arch == "qwen3":  # per-head RMSNorm before the rotation, in both graphs
        q, k = att.q_norm(q), att.k_norm(k)
    qh, kh = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    want = scores(qh[0].transpose(0, 1), kh[0].transpose(0, 1))
    gq, gk = got["blk.1.attn_q.weight"], got["blk.1.attn_k.weight"]
    q2, k2 = heads(gq, got.get("blk.1.attn_q.bias"), nh), heads(gk, got.get("blk.1.attn_k.bias"), nkv)
    if arch == "qwen3":  # llama.cpp's qwen3 graph rotates halves as transformers does (NEOX rope)
        q2, k2 = att.q_norm(q2), att.k_norm(k2)
        assert torch.equal(gq, att.q_proj.weight)
        q2, k2 = (
            (q2 * cos[0, :, None] + _rotate_half(q2) * sin[0, :, None]),
            (k2 * cos[0, :, None] + _rotate_half(k2) * sin[0, :, None]),
        )
    else:  # llama.cpp's llama graph rotates adjacent pairs (the same angles, YaRN's scaling included)
        half = (cos[0, :, : hs // 2], sin[0, :, : hs // 2])  # transformers' cos/sin repeat each angle twice
        q2, k2 = _rope_pairs(q2, *half), _rope_pairs(k2, *half)
        assert not torch.equal(gq, att.q_proj.weight)  # rows reordered
    torch.testing.assert_close(scores(q2, k2), want, atol=1e-9, rtol=1e-9)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.size(-1) // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(ROTARY, qk_norm=True, sliding_window=4), r"qwen3 class, which llama.cpp cannot .*sliding_window"),
        (dict(ROTARY, qk_norm=True, attention_bias=True), r"attention_bias=True \(llama.cpp's qwen3 graph has no"),
        (dict(ROTARY, rope_scaling=dict(YARN, truncate=False)), r"llama class.*YaRN truncate=False"),
        (dict(ROTARY, rope_scaling=dict(YARN, beta_fast=16)), r"YaRN beta_fast=16 \(llama.cpp's llama graph uses 32"),
        (dict(ROTARY, mlp_type="relu2", qk_norm=True, norm_after_embedding=True, norm_elementwise_affine=False),
         r"model_type='nanochat' \(llama.cpp architectures written: gpt2, llama, qwen3\)"),
    ],
    ids=["qwen3-sliding", "qwen3-attention-bias", "yarn-untruncated", "yarn-beta", "nanochat"],
)  # fmt: skip
def test_gguf_refuses_what_llama_cpp_cannot_compute_before_writing(options, match, tmp_path):
    from conftest import tiny_model

    src = tmp_path / "m"
    tiny_model(**options).save_pretrained(src)
    with pytest.raises(ExportError, match=match):
        export(str(src), "gguf", tmp_path / "m.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


@pytest.mark.slow
@pytest.mark.parametrize("outtype", ["f32", "q8_0"])
@pytest.mark.parametrize("name", list(ROTARY_RUNS))
def test_llama_cpp_runs_llama_and_qwen3_exports_as_transformers_does(rotary_runs, tmp_path, name, outtype):
    from transformers import AutoModelForCausalLM

    _llama_cpp()
    run = rotary_runs[name]
    hf_dir, out = tmp_path / "hf", tmp_path / f"{name}-{outtype}.gguf"
    assert main([str(run), "--format", "hf", "--output", str(hf_dir)]) == 0
    assert main([str(run), "--format", "gguf", "--output", str(out), "--outtype", outtype]) == 0
    hf = AutoModelForCausalLM.from_pretrained(
        hf_dir
    ).eval()  # transformers' own LlamaForCausalLM / Qwen3ForCausalLM
    assert (
        type(hf).__name__ == {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}[ROTARY_RUNS[name][1]]
    )
    _check_llama_cpp(out, hf, _prompt_ids(run), outtype)


# ------------------------------------------------------------------------------------------------ ONNX


@pytest.fixture(scope="module")
def onnx_dir(run_dir, tmp_path_factory) -> Path:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = tmp_path_factory.mktemp("onnx") / "onnx"
    assert main([str(run_dir), "--format", "onnx", "--output", str(out)]) == 0
    return out


@pytest.mark.slow
def test_onnx_logits_match_at_several_shapes(run_dir, onnx_dir):
    import onnxruntime as ort

    from gpt2_accel.export import onnx_io_names

    ours = _ours(run_dir)
    L = ours.config.n_layer
    full = ort.InferenceSession(str(onnx_dir / "decoder_model.onnx"), providers=["CPUExecutionProvider"])
    step = ort.InferenceSession(
        str(onnx_dir / "decoder_with_past_model.onnx"), providers=["CPUExecutionProvider"]
    )
    g = torch.Generator().manual_seed(0)
    for B, T in [(1, 1), (1, 17), (3, 5), (2, 64)]:
        x = torch.randint(0, 50257, (B, T), generator=g)
        with torch.no_grad():
            want = ours(x, use_cache=False).logits
        got = full.run(None, {"input_ids": x.numpy()})
        torch.testing.assert_close(torch.from_numpy(got[0]), want, atol=1e-4, rtol=0)
    # the cached graph: the first P tokens' keys/values from the full graph, then Tn new tokens
    for B, P, Tn in [(1, 1, 1), (2, 9, 1), (3, 20, 4)]:
        x = torch.randint(0, 50257, (B, P + Tn), generator=g)
        with torch.no_grad():
            want = ours(x, use_cache=False).logits[:, P:]
        present = full.run(None, {"input_ids": x[:, :P].numpy()})[1:]
        names = onnx_io_names(L, with_past=True)[0]
        feed = {"input_ids": x[:, P:].numpy(), **dict(zip(names[1:], present, strict=True))}
        got = step.run(None, feed)
        torch.testing.assert_close(torch.from_numpy(got[0]), want, atol=1e-4, rtol=0)
        assert got[1].shape == (B, ours.config.n_head, P + Tn, 32)


@pytest.mark.slow
def test_onnx_greedy_decoding_with_the_cache_equals_ours(run_dir, onnx_dir):
    import numpy as np
    import onnxruntime as ort

    from gpt2_accel.export import onnx_io_names

    ours = _ours(run_dir)
    ids = _prompt_ids(run_dir)
    want = _greedy(ours, ids, 32)
    full = ort.InferenceSession(str(onnx_dir / "decoder_model.onnx"), providers=["CPUExecutionProvider"])
    step = ort.InferenceSession(
        str(onnx_dir / "decoder_with_past_model.onnx"), providers=["CPUExecutionProvider"]
    )
    names = onnx_io_names(ours.config.n_layer, with_past=True)[0][1:]
    logits, *present = full.run(None, {"input_ids": np.array([ids], dtype=np.int64)})
    got = []
    for _ in range(32):
        nxt = int(logits[0, -1].argmax())
        got.append(nxt)
        logits, *present = step.run(
            None, {"input_ids": np.array([[nxt]], dtype=np.int64), **dict(zip(names, present, strict=True))}
        )
    assert got == want
