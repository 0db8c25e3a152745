"""`gpt2-accel export`: transformers, GGUF (llama.cpp) and ONNX (onnxruntime), each checked against the runtime
that loads it, on a run directory the trainer writes. Bad input fails before anything is written."""

from __future__ import annotations

import json
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

    def broken(directory, path, outtype="f32"):
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
    except ImportError:
        pytest.skip(
            "llama-cpp-python is not installed (pip install -e '.[llama_cpp]'; it compiles llama.cpp, ~5-25 min)"
        )
    return llama_cpp


@pytest.mark.slow
@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_llama_cpp_greedy_tokens_equal_transformers(run_dir, tmp_path, outtype):
    llama_cpp = _llama_cpp()
    out = tmp_path / f"m-{outtype}.gguf"
    assert main([str(run_dir), "--format", "gguf", "--output", str(out), "--outtype", outtype]) == 0
    ids = _prompt_ids(run_dir)
    want = _greedy(_ours(run_dir), ids, 16)
    assert len(set(want)) > 2, f"the test model is degenerate: {want}"
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, n_threads=1, verbose=False, logits_all=False)
    # llama.cpp's own tokenizer, read from the GGUF, splits the prompt as transformers does
    assert llm.tokenize(PROMPT.encode(), add_bos=False, special=False) == ids
    got = []
    for tok in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        got.append(tok)
        if len(got) == 16:
            break
    assert got == want


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
