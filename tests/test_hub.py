"""Pushing runs to a Hub and loading them back, over real HTTP against tests/hub_server.py (a local
Hub-API-compatible test server, not the Hub).

huggingface_hub reads HF_ENDPOINT when it is imported, so pushes through the CLI and every load run in
subprocesses with the test server's address in their environment; in-process pushes pass ``endpoint=``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from gpt2_accel import GPT2AccelForCausalLM
from gpt2_accel.hub import HubPushError, _hub_dataset_ids, push_run, write_model_card
from gpt2_accel.run_files import hardware_name, last_logs, read_eval_results, read_run_info

sys.path.insert(0, str(Path(__file__).parent))
from conftest import RUN_SECRET
from hub_server import HubTestServer

pytestmark = pytest.mark.timeout(180)
REPO_ROOT = Path(__file__).resolve().parents[1]
SECRET = RUN_SECRET  # the hub_token the run was trained with


def _without_checkpoint(run: Path, step: int, aside: Path) -> Path:
    """Move one committed checkpoint of ``run`` out of it (to ``aside``); return where it went."""
    src = run / "checkpoints" / f"step_{step:08d}"
    return Path(shutil.move(src, aside / src.name))


def _tree_digest(d: Path) -> dict[str, str]:
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(d.rglob("*"))
    }


@pytest.fixture(scope="module")
def hub():
    with HubTestServer() as server:
        yield server


@pytest.fixture
def run_dir(trained_run):
    """The run directory a real (tiny) training run wrote; pushes only read it."""
    return trained_run


def _env(hub: HubTestServer, home: Path, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HUB_DISABLE_XET="1",
        HF_TOKEN=hub.token,
        HF_HOME=str(home),
        HF_HUB_DISABLE_TELEMETRY="1",
        TOKENIZERS_PARALLELISM="false",
        **extra,
    )
    return env


@pytest.fixture
def no_xet(monkeypatch):
    # In-process pushes: the test server speaks LFS, not Xet (read by huggingface_hub at call time).
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)


_LOAD = """
import sys, torch
if {hide}:
    sys.modules["gpt2_accel"] = None  # belt and braces: `python -I` from a temp cwd already hides the package
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained("{repo}", trust_remote_code=True).eval()
if {hide}:
    assert type(m).__module__.startswith("transformers_modules"), type(m).__module__
else:
    import gpt2_accel
ids = torch.tensor([[464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]])
with torch.no_grad():
    torch.save(m(ids).logits, "{out}")
print(type(m).__module__)
"""


@pytest.mark.slow  # three fresh Python processes importing torch + transformers
def test_push_then_load_with_and_without_the_package_gives_identical_logits(hub, run_dir, tmp_path):
    env = _env(hub, tmp_path / "hf_home")
    before = _tree_digest(run_dir)
    r = subprocess.run(
        [sys.executable, "-m", "gpt2_accel.hub", str(run_dir), "--repo-id", "tester/tiny"],
        env={**env, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{hub.url}/tester/tiny"
    assert hub.token not in r.stdout + r.stderr
    assert _tree_digest(run_dir) == before  # the push wrote nothing into the run (no README, no staging left)

    files = hub.files("tester/tiny")
    for f in (
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "configuration_gpt2_accel.py",
        "modeling_gpt2_accel.py",
        "attention.py",
        "README.md",
        "loss_curve.png",
        "recipe.yaml",
        "metrics.jsonl",
        "run_info.json",
    ):
        assert f in files, f"{f} not pushed"
    assert not any(f.startswith("checkpoints/") for f in files)  # only with --include-checkpoints
    assert {"model.safetensors", "loss_curve.png"} <= hub.lfs_paths(
        "tester/tiny"
    )  # went through the LFS protocol
    assert files["model.safetensors"] == (run_dir / "model.safetensors").read_bytes()
    assert "auto_map" in json.loads(files["config.json"])
    assert SECRET.encode() not in files["recipe.yaml"] and b"learning_rate: 0.0006" in files["recipe.yaml"]

    torch.manual_seed(0)
    local = GPT2AccelForCausalLM.from_pretrained(run_dir).eval()
    ids = torch.tensor([[464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]])
    with torch.no_grad():
        ref = local(ids).logits
    for hide in (False, True):
        out = tmp_path / f"logits_{hide}.pt"
        code = _LOAD.format(hide=hide, repo="tester/tiny", out=out)
        cmd = [sys.executable, "-I", "-c", code] if hide else [sys.executable, "-c", code]
        r = subprocess.run(
            cmd,
            env=_env(hub, tmp_path / f"cache_{hide}", **({} if hide else {"PYTHONPATH": str(REPO_ROOT)})),
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        # equal up to float rounding: a different BLAS thread count may change the summation order
        torch.testing.assert_close(
            torch.load(out, weights_only=True),
            ref,
            rtol=1e-6,
            atol=1e-6,
            msg=f"logits differ (package hidden: {hide})",
        )


def test_model_card_shows_what_the_run_recorded(trained_run, tmp_path):
    from huggingface_hub import ModelCard

    d = tmp_path / "run"
    shutil.copytree(trained_run, d)
    info, evals, (last_train, _) = read_run_info(d), read_eval_results(d), last_logs(d)
    path = write_model_card(d, "tester/tiny")
    assert path == d / "README.md"
    card = ModelCard.load(path)
    data = card.data
    assert data.library_name == "transformers" and data.license == info.license == "apache-2.0"
    assert data.datasets is None  # bundled:shakespeare is not a Hub dataset id
    assert "gpt2_accel" in data.tags and data.pipeline_tag == "text-generation"
    metrics = {r.metric_type: r.metric_value for r in data.eval_results}
    assert metrics == {"loss": evals["val_loss"], "perplexity": evals["val_ppl"]}
    text = card.text
    for fact in (
        "| n_layer | 2 |",
        "| n_embd | 32 |",
        "| Optimizer steps | 3 |",
        "| Tokens seen | 192 |",  # 3 steps x 2 windows x 32 tokens
        f"| Final train loss | {last_train['loss']:.4f} |",
        f"| Final validation loss | {evals['val_loss']:.4f} |",
        f"| Hardware | {hardware_name(torch.device('cpu'))} |",
        "| Processes (world size) | 1 |",
        "| learning_rate | 0.0006 |",
        "![Training and validation loss](loss_curve.png)",
        'from_pretrained("tester/tiny", trust_remote_code=True)',
        "bundled:shakespeare",
    ):
        assert fact in text, fact
    wall = re.search(r"\| Wall time \| ([0-9.]+) s \|", text)
    assert wall and info.wall_time_s > 0 and float(wall.group(1)) == round(info.wall_time_s, 1)
    assert SECRET not in card.content


def test_model_card_of_a_run_written_by_the_previous_version(trained_run, tmp_path):
    """run_info.json of earlier versions had no wall time, device type or licence: the card still renders, with the
    recipe's licence, and leaves out the wall time it cannot know."""
    from huggingface_hub import ModelCard

    d = tmp_path / "run"
    shutil.copytree(trained_run, d)
    old = json.loads((d / "run_info.json").read_text())
    for key in ("wall_time_s", "license", "device_type"):
        del old[key]
    (d / "run_info.json").write_text(json.dumps(old))
    card = ModelCard.load(write_model_card(d))
    assert card.data.license == "apache-2.0"  # recipe.yaml's
    assert "| Optimizer steps | 3 |" in card.text and "Wall time" not in card.text


def test_only_hub_dataset_ids_go_to_the_card_metadata(tmp_path):
    local = tmp_path / "mine.jsonl"
    local.write_text("{}\n")
    names = [
        "HuggingFaceFW/fineweb-edu",
        str(local),
        "data/train.parquet",
        "bundled:shakespeare",
        "openwebtext",
    ]
    assert _hub_dataset_ids(names) == ["HuggingFaceFW/fineweb-edu", "openwebtext"]


def test_in_process_push_from_a_thread_private_with_one_resumable_checkpoint(
    hub, trained_run, tmp_path, no_xet
):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (tmp_path / "aside").mkdir()
    step3 = _without_checkpoint(run, 3, tmp_path / "aside")  # newest committed checkpoint: step 2
    result: dict = {}

    def push():
        try:
            result["url"] = push_run(
                run, "tester/ckpt", token=hub.token, private=True, include_checkpoints=True, endpoint=hub.url
            )
        except Exception as e:  # pragma: no cover - surfaced by the assert below
            result["error"] = e

    t = threading.Thread(target=push)  # off the training loop, as the trainer does (huggingface_hub's worker)
    t.start()
    t.join(timeout=120)
    assert "error" not in result, result.get("error")
    assert result["url"] == f"{hub.url}/tester/ckpt"
    assert hub.repos["tester/ckpt"].private
    files = hub.files("tester/ckpt")
    assert "checkpoints/step_00000002/trainer_state.json" in files
    assert (
        files["checkpoints/step_00000002/state/optimizer.bin"]
        == (run / "checkpoints/step_00000002/state/optimizer.bin").read_bytes()
    )

    shutil.move(step3, run / "checkpoints" / step3.name)
    push_run(run, "tester/ckpt", token=hub.token, include_checkpoints=True, endpoint=hub.url)
    ckpts = {f.split("/")[1] for f in hub.files("tester/ckpt") if f.startswith("checkpoints/")}
    assert ckpts == {"step_00000003"}  # the Hub keeps the newest resumable state only
    assert (run / "checkpoints/step_00000002/COMPLETE").is_file()  # local checkpoints are never touched


def test_push_to_a_branch(hub, run_dir, no_xet):
    url = push_run(run_dir, "tester/branchy", token=hub.token, revision="dev", endpoint=hub.url)
    assert url.endswith("/tester/branchy/tree/dev")
    assert "model.safetensors" in hub.files("tester/branchy", "dev")
    assert "model.safetensors" not in hub.files("tester/branchy", "main")


def test_server_errors_are_retried_then_reported_and_the_run_is_intact(hub, run_dir, no_xet):
    before = _tree_digest(run_dir)
    n0 = len(hub.requests)
    hub.fail_status = 500
    try:
        with pytest.raises(HubPushError, match=r"failed after 3 attempts.*local run is intact"):
            push_run(run_dir, "tester/down", token=hub.token, endpoint=hub.url, retries=2, backoff_s=0.01)
    finally:
        hub.fail_status = None
    assert hub.requests[n0:].count(("POST", "/api/repos/create")) == 3
    assert _tree_digest(run_dir) == before


def test_connection_refused_is_retried_then_reported(run_dir, no_xet):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(HubPushError, match=r"failed after 2 attempts.*unreachable"):
        push_run(
            run_dir,
            "tester/x",
            token="hf_whatever_token_1234",
            endpoint=f"http://127.0.0.1:{port}",
            retries=1,
            backoff_s=0.01,
        )


def test_auth_error_says_how_to_log_in_and_never_shows_the_token(hub, run_dir, no_xet):
    bad = "hf_wrongTOKENwrongTOKEN1234"
    with pytest.raises(HubPushError, match=r"HTTP 401.*hf auth login.*HF_TOKEN.*hub_token") as err:
        push_run(
            run_dir, "tester/auth", token=bad, endpoint=hub.url, retries=3, backoff_s=5
        )  # no retry on 401
    assert bad not in str(err.value)
    assert "tester/auth" not in hub.repos


def test_no_token_at_all_says_how_to_log_in(run_dir, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(HubPushError, match=r"no Hugging Face token.*hf auth login"):
        push_run(run_dir, "tester/x")


@pytest.mark.slow  # a fresh Python process
def test_cli_failure_exits_1_with_the_message(hub, run_dir, tmp_path):
    env = {
        **_env(hub, tmp_path / "hf_home"),
        "PYTHONPATH": str(REPO_ROOT),
        "HF_TOKEN": "hf_badbadbadbadbad123",
    }
    r = subprocess.run(
        [sys.executable, "-m", "gpt2_accel.hub", str(run_dir), "--repo-id", "tester/cli"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
    )
    assert r.returncode == 1
    assert "hf auth login" in r.stderr and "hf_badbadbadbadbad123" not in r.stderr


@pytest.mark.parametrize("bad", ["no-namespace", None])
def test_bad_inputs_are_clear_errors(tmp_path, bad):
    if bad is None:
        with pytest.raises(HubPushError, match="holds no model to push"):
            push_run(tmp_path, "tester/x", token="hf_x")
    else:
        with pytest.raises(HubPushError, match="must be 'namespace/name'"):
            push_run(tmp_path, bad, token="hf_x")


def test_model_card_shows_scores_that_eval_filed_in_the_run(trained_run, tmp_path):
    """`gpt2-accel eval` merges HellaSwag and lm-eval scores into eval_results.json; the card shows them next to
    the run's own validation loss, which stays."""
    from huggingface_hub import ModelCard

    from gpt2_accel.run_files import EvalResults, update_eval_results

    d = tmp_path / "run"
    shutil.copytree(trained_run, d)
    val_loss = read_eval_results(d)["val_loss"]
    update_eval_results(d, EvalResults(hellaswag_acc=0.25, hellaswag_acc_norm=0.5, hellaswag_n=8))
    update_eval_results(d, EvalResults(lm_eval={"tiny_choice": {"acc,none": 0.75, "acc_stderr,none": 0.1}}))
    card = ModelCard.load(write_model_card(d))
    assert "| HellaSwag acc / acc_norm | 0.2500 / 0.5000 |" in card.text
    assert "| lm-eval tiny_choice acc,none | 0.7500 |" in card.text and "stderr" not in card.text
    assert f"| Final validation loss | {val_loss:.4f} |" in card.text
    metrics = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert metrics["accuracy"] == 0.5 and metrics["loss"] == val_loss
