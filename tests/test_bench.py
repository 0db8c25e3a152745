"""``gpt2-accel bench`` runs on a tiny recipe and reports finite figures (no timing is asserted)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from gpt2_accel.cli.bench import main

DEMO = str(Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml")
TINY = [
    "--n_layer=2",
    "--n_embd=64",
    "--n_head=2",
    "--n_positions=32",
    "--per_device_train_batch_size=2",
    "--vocab_size=256",
    "--steps=2",
    "--warmup=1",
]


def _figure(out: str, label: str) -> float:
    m = re.search(rf"^{label}: ([\d,.]+)", out, re.MULTILINE)
    assert m, f"{label!r} missing from output:\n{out}"
    return float(m.group(1).replace(",", ""))


def test_bench_prints_and_writes_finite_figures(tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    assert main([DEMO, *TINY, "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    for label in ("ms/step", "tokens/s", "MFU"):
        value = _figure(out, label)
        assert math.isfinite(value) and value > 0, (label, value)
    assert "peak memory" in out and "getrusage" in out  # CPU: says which memory it is
    r = json.loads(out_json.read_text())
    assert r["tokens_per_step"] == 2 * 32  # batch x context, one accumulation step
    for key in ("ms_per_step", "tokens_per_sec", "mfu", "peak_memory_bytes", "flops_per_token"):
        assert math.isfinite(r[key]) and r[key] > 0, (key, r[key])
    assert r["tokens_per_sec"] == pytest.approx(r["tokens_per_step"] / (r["ms_per_step"] / 1e3))
    # MFU is consistent with the FLOP formula: 6N + 12 L d T (PaLM appendix B), N without position embeddings.
    assert r["flops_per_token"] == 6 * r["n_params"] + 12 * 2 * 64 * 32
    assert r["mfu"] == pytest.approx(r["achieved_flops"] / r["peak_flops"])
    assert math.isfinite(r["final_loss"]) and r["final_loss"] > 0


def test_bench_accumulation_counts_every_micro_batch(tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    assert main([DEMO, *TINY, "--gradient_accumulation_steps=3", "--json", str(out_json)]) == 0
    assert json.loads(out_json.read_text())["tokens_per_step"] == 3 * 2 * 32


def test_bench_profile_writes_a_chrome_trace(tmp_path, capsys):
    prof = tmp_path / "prof"
    assert main([DEMO, *TINY, "--profile", str(prof)]) == 0
    trace = json.loads((prof / "trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert "train_step_0" in names and "aten::mm" in names  # the profiled steps and their matmuls
    assert str(prof / "trace.json") in capsys.readouterr().out


def test_bench_bad_key_is_an_error_naming_it(capsys):
    assert main([DEMO, *TINY, "--n_layr=2"]) == 2
    assert "n_layr" in capsys.readouterr().err


def test_bench_bad_steps_is_an_error(capsys):
    assert main([DEMO, *TINY[:-2], "--steps=0"]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err


def test_bench_real_data_goes_through_the_pipeline(tmp_path, capsys):
    # The bundled Shakespeare through the GPT-2 BPE tokenizer: the model vocabulary must hold its 50257 ids.
    out_json = tmp_path / "bench.json"
    argv = [
        DEMO,
        *[a for a in TINY if not a.startswith("--vocab_size")],
        "--dataloader_num_workers=0",
        "--real-data",
    ]
    assert main([*argv, "--json", str(out_json)]) == 0
    r = json.loads(out_json.read_text())
    assert r["tokens_per_step"] == 2 * 32
    # A random init predicts ~uniformly over 50257 tokens: real text gives a loss near ln(50257) = 10.8.
    assert 9.5 < r["final_loss"] < 12.0


def test_generation_benchmark_methods_agree(capsys):
    # benchmarks/bench_generate.py: the cached loop, generate() and nanoGPT-style recomputation must decode the
    # same greedy tokens, or its speed-ups compare different work.
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_generate.py"
    spec = importlib.util.spec_from_file_location("bench_generate", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    threads = torch.get_num_threads()
    try:
        # every method, the static-cache ones too (generate(cache_implementation="static") once decoded wrong tokens)
        assert mod.main(["--quick", "--rounds", "1", "--methods", ",".join(mod.METHODS)]) == 0
    finally:
        torch.set_num_threads(threads)  # the benchmark sets its own; leave the test process as it was
    assert "greedy tokens identical across methods: True" in capsys.readouterr().out
