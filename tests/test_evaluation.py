"""Evaluation: loss/perplexity against float64 and transformers references, HellaSwag against a plain per-example
float64 loop (build-nanogpt's rule), the CLI's JSON/table output, and real 2-process runs."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port, tiny_hf_gpt2, tiny_model

from gpt2_accel import GPT2AccelConfig, GPT2AccelForCausalLM
from gpt2_accel.cli.eval import main
from gpt2_accel.evaluation import (
    default_tokenizer_name,
    evaluate_loss,
    load_hellaswag,
    render_hellaswag,
    score_hellaswag,
)
from gpt2_accel.recipe import load_recipe
from gpt2_accel.tokenization import get_tokenizer

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "hellaswag_tiny.jsonl"


def _has_build_eval_windows() -> bool:
    try:
        from gpt2_accel.data import build_eval_windows  # noqa: F401
    except ImportError:
        return False
    return True


needs_data = pytest.mark.skipif(
    not _has_build_eval_windows(), reason="gpt2_accel.data.build_eval_windows missing"
)


@pytest.fixture(scope="module")
def bpe_model() -> GPT2AccelForCausalLM:
    """A tiny random model over GPT-2's 50257-token BPE (so the real tokenizer and HellaSwag text fit)."""
    torch.manual_seed(0)
    cfg = GPT2AccelConfig(vocab_size=50257, n_positions=128, n_embd=32, n_layer=2, n_head=2)
    return GPT2AccelForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model_dir(bpe_model, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny_bpe_model")
    bpe_model.save_pretrained(d)
    get_tokenizer("gpt2").save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    text = (REPO / "gpt2_accel" / "assets" / "data" / "shakespeare.txt").read_text(encoding="utf-8")[:40_000]
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------------
# evaluate_loss
# ---------------------------------------------------------------------------------------------------------------


def _loss_float64(model, windows: torch.Tensor) -> float:
    """Mean token loss with the model and the log-softmax in float64, one window at a time."""
    ref = copy.deepcopy(model).double()
    total, n = 0.0, 0
    for w in windows:
        logp = torch.log_softmax(ref(input_ids=w[None, :-1]).logits[0].double(), dim=-1)  # (T, V)
        total += -logp.gather(1, w[1:, None]).sum().item()
        n += w.numel() - 1
    return total / n


def test_evaluate_loss_matches_float64_reference_for_any_batch_size():
    model = tiny_model()
    windows = torch.randint(0, 128, (7, 33), generator=torch.Generator().manual_seed(1))
    ref = _loss_float64(model, windows)
    for bs in (1, 3, 7, 100):
        out = evaluate_loss(model, windows, batch_size=bs)
        assert out["tokens"] == 7 * 32
        assert out["loss"] == pytest.approx(ref, abs=1e-5)
        assert out["perplexity"] == pytest.approx(math.exp(ref), rel=1e-5)


def test_evaluate_loss_matches_transformers_gpt2_own_loss_and_restores_train_mode():
    # Vanilla transformers GPT2LMHeadModel: its labels= loss on the whole window is the same next-token mean.
    model = tiny_hf_gpt2().train()
    windows = torch.randint(0, 128, (4, 17), generator=torch.Generator().manual_seed(2))
    out = evaluate_loss(model, windows, batch_size=2)
    model.eval()
    with torch.no_grad():
        hf_loss = model(input_ids=windows, labels=windows).loss.item()  # equal-length windows: mean of means
    assert out["loss"] == pytest.approx(hf_loss, abs=1e-5)
    model.train()
    evaluate_loss(model, windows, batch_size=2)
    assert model.training, "evaluate_loss must hand the model back in training mode"


def test_evaluate_loss_rejects_bad_windows():
    with pytest.raises(ValueError, match=r"\(n, block_size \+ 1\)"):
        evaluate_loss(tiny_model(), torch.zeros(5, dtype=torch.long), batch_size=2)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        evaluate_loss(tiny_model(), torch.zeros(2, 5, dtype=torch.long), batch_size=0)


# ---------------------------------------------------------------------------------------------------------------
# HellaSwag
# ---------------------------------------------------------------------------------------------------------------


def test_load_hellaswag_reads_the_official_format():
    ex = load_hellaswag(str(FIXTURE))
    assert len(ex) == 8
    assert all(len(e["endings"]) == 4 and isinstance(e["label"], int) for e in ex)
    assert ex[0]["ctx"] == ex[0]["ctx_a"] + " " + ex[0]["ctx_b"]
    assert [e["ind"] for e in load_hellaswag(str(FIXTURE), max_examples=3)] == [100, 101, 102]
    assert load_hellaswag(str(FIXTURE)) is not load_hellaswag(str(FIXTURE))  # callers may mutate their copy


def test_load_hellaswag_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="download the validation set"):
        load_hellaswag(str(tmp_path / "hellaswag_val.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"ctx": "A man", "label": 0}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: HellaSwag example lacks field\(s\) \['endings'\]"):
        load_hellaswag(str(bad))
    three = tmp_path / "three.jsonl"
    three.write_text(json.dumps({"ctx": "A man", "label": "1", "endings": ["a", "b", "c"]}) + "\n")
    with pytest.raises(ValueError, match="has 3 endings, expected 4"):
        load_hellaswag(str(three))
    unlabeled = tmp_path / "test_split.jsonl"
    unlabeled.write_text(json.dumps({"ctx": "A man", "label": "", "endings": ["a", "b", "c", "d"]}) + "\n")
    with pytest.raises(ValueError, match="use the validation split"):
        load_hellaswag(str(unlabeled))


def test_load_hellaswag_from_an_unreachable_hub_says_to_use_the_file(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    # Offline mode makes the Hub fail at once instead of after network retries (this machine has no internet).
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        RuntimeError, match=r"could not load HellaSwag from the Hub dataset 'Rowan/hellaswag'.*"
    ):
        load_hellaswag("Rowan/hellaswag", max_examples=3)
    with pytest.raises(RuntimeError, match=r"hellaswag_val\.jsonl once and pass the file path"):
        load_hellaswag("Rowan/hellaswag", max_examples=3)


def _hellaswag_reference(model, tokenizer, examples) -> list[dict]:
    """build-nanogpt's rule, written independently: per example and ending, a float64 forward of
    ctx + " " + ending; summed and mean loss over the ending tokens; argmin (first on ties)."""
    ref = copy.deepcopy(model).double()
    out = []
    for ex in examples:
        ctx = tokenizer.encode(ex["ctx"])
        sums, means = [], []
        for ending in ex["endings"]:
            end = tokenizer.encode(" " + ending)
            ids = torch.tensor([ctx + end])
            logp = torch.log_softmax(ref(input_ids=ids).logits[0].double(), dim=-1)  # (T, V)
            # ending token k sits at position len(ctx) + k and is predicted from position len(ctx) + k - 1
            nll = [-logp[len(ctx) + k - 1, tok].item() for k, tok in enumerate(end)]
            sums.append(sum(nll))
            means.append(sum(nll) / len(nll))
        out.append(
            {
                "label": ex["label"],
                "pred": sums.index(min(sums)),
                "pred_norm": means.index(min(means)),
                "sums": sums,
            }
        )
    return out


def test_score_hellaswag_matches_independent_float64_loop(bpe_model):
    tok = get_tokenizer("gpt2")
    examples = load_hellaswag(str(FIXTURE))
    ref = _hellaswag_reference(bpe_model, tok, examples)
    acc = sum(r["pred"] == r["label"] for r in ref) / len(ref)
    acc_norm = sum(r["pred_norm"] == r["label"] for r in ref) / len(ref)
    # The fixture mixes one-word and long endings, so summed and mean loss pick differently: in at least one
    # example exactly one of acc / acc_norm is right.
    assert any((r["pred"] == r["label"]) != (r["pred_norm"] == r["label"]) for r in ref)
    assert acc != acc_norm
    for bs in (3, 8):
        out = score_hellaswag(bpe_model, tok, examples, batch_size=bs, return_details=True)
        assert (out["acc"], out["acc_norm"], out["n"]) == (acc, acc_norm, 8)
        for d, r in zip(out["details"], ref):
            assert (d["pred"], d["pred_norm"]) == (r["pred"], r["pred_norm"])
            assert d["sum_losses"] == pytest.approx(r["sums"], abs=1e-4)


def test_score_hellaswag_shards_by_rank_and_accepts_hf_tokenizers(bpe_model):
    tok = get_tokenizer("gpt2")
    examples = load_hellaswag(str(FIXTURE))
    full = score_hellaswag(bpe_model, tok, examples)
    # Without a process group each rank reports its own share (examples i % 3 == rank): shares add up.
    parts = [score_hellaswag(bpe_model, tok, examples, rank=r, world_size=3) for r in range(3)]
    assert [p["n"] for p in parts] == [3, 3, 2]
    assert sum(p["acc"] * p["n"] for p in parts) == pytest.approx(full["acc"] * full["n"])
    assert sum(p["acc_norm"] * p["n"] for p in parts) == pytest.approx(full["acc_norm"] * full["n"])
    # The transformers tokenizer gives the same ids, hence the same scores.
    assert score_hellaswag(bpe_model, tok.hf, examples) == full
    assert render_hellaswag(examples[0], tok) is render_hellaswag(
        examples[0], tok
    )  # cached for repeated evals


def test_score_hellaswag_truncates_long_contexts_from_the_left():
    torch.manual_seed(0)
    short = GPT2AccelForCausalLM(
        GPT2AccelConfig(vocab_size=50257, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    )
    ex = load_hellaswag(str(FIXTURE), max_examples=2)
    out = score_hellaswag(short.eval(), get_tokenizer("gpt2"), ex, return_details=True)
    assert out["n"] == 2 and all(math.isfinite(x) for d in out["details"] for x in d["mean_losses"])


# ---------------------------------------------------------------------------------------------------------------
# recipes and the command line
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, model",
    [("gpt2", "gpt2"), ("gpt2_medium", "gpt2-medium"), ("gpt2_large", "gpt2-large"), ("gpt2_xl", "gpt2-xl")],
)
def test_eval_recipes_reproduce_nanogpt_configs(name, model):
    r = load_recipe(REPO / "recipes" / f"eval_{name}.yaml")
    assert r.model.init_from == model
    assert r.data.block_size == 1024 and r.data.tokenizer_name == "gpt2"
    assert "openwebtext" in r.data.dataset_name
    # nanoGPT's eval configs: eval_iters=500 batches of batch_size=8 windows
    assert r.data.max_eval_samples == 500 * 8
    assert r.training.hellaswag_data is not None


def test_default_tokenizer_follows_the_model(model_dir, tmp_path):
    assert default_tokenizer_name(str(model_dir)) == str(model_dir)
    assert default_tokenizer_name("gpt2-xl") == "gpt2"
    assert default_tokenizer_name("openai-community/gpt2") == "gpt2"
    assert default_tokenizer_name("someone/other-model") == "someone/other-model"
    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        default_tokenizer_name(str(tmp_path))


def test_cli_hellaswag_writes_json_next_to_the_model_and_prints_a_table(bpe_model, model_dir, capsys):
    assert (
        main(["--model", str(model_dir), "--task", "hellaswag", "--data", str(FIXTURE), "--batch_size", "3"])
        == 0
    )
    result = json.loads((model_dir / "eval_results_hellaswag.json").read_text())
    expected = score_hellaswag(bpe_model, get_tokenizer("gpt2"), load_hellaswag(str(FIXTURE)))
    assert (result["acc"], result["acc_norm"], result["n"]) == (expected["acc"], expected["acc_norm"], 8)
    assert result["num_processes"] == 1 and "_timestamp" in result and "_gpt2_accel_version" in result
    table = capsys.readouterr().out
    assert "acc_norm" in table and f"{expected['acc_norm']:.6f}" in table
    merged = json.loads((model_dir / "eval_results.json").read_text())  # next to the model's own results
    assert (merged["hellaswag_acc"], merged["hellaswag_acc_norm"], merged["hellaswag_n"]) == (
        expected["acc"],
        expected["acc_norm"],
        8,
    )


def test_cli_scores_a_vanilla_transformers_gpt2_directory(tmp_path):
    hf = tiny_hf_gpt2(
        vocab_size=50257, n_positions=128, n_embd=32, n_head=2, bos_token_id=50256, eos_token_id=50256
    )
    hf.save_pretrained(
        tmp_path / "hf_gpt2"
    )  # a GPT2LMHeadModel dir without tokenizer files: GPT-2 BPE by default
    out = tmp_path / "hs.json"
    argv = [
        "--model",
        str(tmp_path / "hf_gpt2"),
        "--task",
        "hellaswag",
        "--data",
        str(FIXTURE),
        "--output",
        str(out),
    ]
    assert main([*argv, "--max_examples", "4"]) == 0
    result = json.loads(out.read_text())
    expected = score_hellaswag(hf, get_tokenizer("gpt2"), load_hellaswag(str(FIXTURE), 4))
    assert (result["acc"], result["acc_norm"], result["n"], result["tokenizer"]) == (
        expected["acc"],
        expected["acc_norm"],
        4,
        "gpt2",
    )


def test_cli_errors_name_the_fix(model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--task", "hellaswag", "--data", str(FIXTURE)])  # no model
    with pytest.raises(SystemExit):
        main(
            ["--init_from", str(model_dir), str(REPO / "recipes" / "eval_gpt2.yaml")]
        )  # bare value taken as recipe
    assert "is not a recipe file (.yaml)" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["--model", str(tmp_path / "nope"), "--task", "hellaswag", "--data", str(FIXTURE)])
    tiny = tmp_path / "tiny128"
    tiny_model().save_pretrained(tiny)  # 128-token vocabulary, no tokenizer files -> GPT-2 BPE by default
    with pytest.raises(ValueError, match="has 50257 tokens but the model only 128"):
        main(
            [
                "--model",
                str(tiny),
                "--task",
                "hellaswag",
                "--data",
                str(FIXTURE),
                "--output",
                str(tmp_path / "o.json"),
            ]
        )


@needs_data
def test_cli_loss_matches_evaluate_loss_on_the_same_windows(bpe_model, model_dir, text_file, tmp_path):
    from gpt2_accel.data import build_eval_windows
    from gpt2_accel.recipe import DataArguments

    out = tmp_path / "loss.json"
    args = ["--model", str(model_dir), "--data", str(text_file), "--max_tokens", "256", "--block_size", "32"]
    assert main([*args, "--batch_size", "3", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    # --data is the evaluation set itself: its windows start at the file's first token (no training hold-out).
    data = DataArguments(validation_dataset_name=str(text_file), tokenizer_name=str(model_dir))
    tok = get_tokenizer("gpt2")
    windows = build_eval_windows(data, tok, block_size=32, max_samples=8, rank=0, world_size=1)
    assert text_file.read_text(encoding="utf-8").startswith(tok.decode(windows[0, :8].tolist()))
    assert result["tokens"] == 8 * 32 == windows.numel() - windows.size(0)
    assert (result["data"], result["split"], result["windows"]) == (str(text_file), "train", 8)
    assert result["loss"] == pytest.approx(_loss_float64(bpe_model, windows), abs=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))


@needs_data
def test_cli_accepts_a_recipe_with_overrides(model_dir, text_file, tmp_path):
    out = tmp_path / "r.json"
    argv = [
        str(REPO / "recipes" / "eval_gpt2.yaml"),
        f"--init_from={model_dir}",
        f"--dataset_name={text_file}",
    ]
    argv += [
        "--block_size=32",
        "--max_eval_samples=4",
        "--validation_split_percentage=20",
        "--output",
        str(out),
    ]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["model"] == str(model_dir) and result["tokens"] == 4 * 32 and result["block_size"] == 32
    # Without --data a recipe is scored on the trainer's own validation windows (the held-out documents).
    assert result["split"] == "train (held-out 20.0%)"


# ---------------------------------------------------------------------------------------------------------------
# real 2-process runs (gloo on CPU)
# ---------------------------------------------------------------------------------------------------------------


def _run_eval(nproc: int, args: list[str], out: Path) -> dict:
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        str(nproc),
        "--num_machines",
        "1",
    ]
    # A plain launch with no GPU silently runs ONE process; --multi_gpu + ACCELERATE_USE_CPU=1 gives gloo DDP on CPU.
    cmd += ["--multi_gpu"] if nproc > 1 else []
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    cmd += ["--module", "gpt2_accel.evaluation", *args, "--output", str(out)]
    # A timeout on every launch: a rare hang at gloo process-group exit has been seen on this kind of machine.
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_two_processes_give_the_one_process_hellaswag_scores(bpe_model, model_dir, tmp_path):
    # 7 examples in batches of 3: rank 0 makes 2 forwards, rank 1 one real and one dummy forward.
    args = ["--model", str(model_dir), "--task", "hellaswag", "--data", str(FIXTURE), "--max_examples", "7"]
    two = _run_eval(2, [*args, "--batch_size", "3"], tmp_path / "two.json")
    one = score_hellaswag(bpe_model, get_tokenizer("gpt2"), load_hellaswag(str(FIXTURE), 7))  # same weights
    assert two["num_processes"] == 2
    assert (two["acc"], two["acc_norm"], two["n"]) == (one["acc"], one["acc_norm"], 7)


@pytest.mark.slow
@needs_data
def test_two_processes_give_the_one_process_loss(bpe_model, model_dir, text_file, tmp_path):
    from gpt2_accel.data import build_eval_windows
    from gpt2_accel.recipe import DataArguments

    args = ["--model", str(model_dir), "--data", str(text_file), "--max_tokens", "320", "--block_size", "32"]
    two = _run_eval(2, [*args, "--batch_size", "2"], tmp_path / "two.json")
    data = DataArguments(validation_dataset_name=str(text_file))
    windows = build_eval_windows(
        data, get_tokenizer("gpt2"), block_size=32, max_samples=10, rank=0, world_size=1
    )
    one = evaluate_loss(bpe_model, windows, batch_size=4)  # one process, all windows, other batches
    assert two["num_processes"] == 2
    assert two["tokens"] == one["tokens"] == 10 * 32
    assert two["loss"] == pytest.approx(one["loss"], abs=1e-6)
