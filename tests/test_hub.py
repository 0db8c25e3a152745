"""Pushing runs to a Hub and loading them back, over real HTTP against tests/hub_server.py (a local
Hub-API-compatible test server, not the Hub).

huggingface_hub reads HF_ENDPOINT when it is imported, so pushes through the CLI and every load run in
subprocesses with the test server's address in their environment; in-process pushes pass ``endpoint=``.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from gpt2_accel import GPT2AccelConfig, GPT2AccelForCausalLM
from gpt2_accel.hub import HubPushError, push_run, write_model_card
from gpt2_accel.tokenization import get_tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import HubTestServer

pytestmark = pytest.mark.timeout(180)
REPO_ROOT = Path(__file__).resolve().parents[1]
SECRET = "hf_SECRETrecipeTOKEN123456"
PNG = bytes.fromhex("89504e470d0a1a0a") + b"\0fake png for the card test"


def _make_run(d: Path, *, checkpoints: tuple[int, ...] = ()) -> Path:
    torch.manual_seed(0)
    model = GPT2AccelForCausalLM(
        GPT2AccelConfig(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)
    )
    model.save_pretrained(d)
    get_tokenizer("gpt2").save_pretrained(d)
    (d / "recipe.yaml").write_text(
        "model:\n  n_layer: 2\n  n_embd: 32\ndata:\n  dataset_name: HuggingFaceFW/fineweb-edu\n  tokenizer_name: gpt2\n"
        f"training:\n  max_steps: 3\n  learning_rate: 0.0006\n  push_to_hub: true\n  hub_token: {SECRET}\n"
    )
    lines = [
        {
            "step": 1,
            "loss": 10.9,
            "lr": 6e-4,
            "tokens": 1024,
            "grad_norm": 1.0,
            "tokens_per_sec": 1e4,
            "mfu": 0.01,
        },
        {
            "step": 3,
            "loss": 10.25,
            "lr": 6e-5,
            "tokens": 3072,
            "grad_norm": 0.9,
            "tokens_per_sec": 1e4,
            "mfu": 0.01,
        },
        {"step": 3, "val_loss": 10.5, "val_ppl": 36315.5, "hellaswag_acc": 0.25, "hellaswag_acc_norm": 0.26},
    ]
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (d / "loss_curve.png").write_bytes(PNG)
    (d / "run_info.json").write_text(
        json.dumps(
            {
                "tokens_seen": 3072,
                "hardware": "1x CPU",
                "world_size": 1,
                "mixed_precision": "no",
                "steps": 3,
                "wall_time_s": 12.0,
            }
        )
    )
    for step in checkpoints:
        _add_checkpoint(d, step)
    return d


def _add_checkpoint(d: Path, step: int) -> Path:
    ck = d / "checkpoints" / f"step_{step:08d}"
    (ck / "model").mkdir(parents=True)
    for f in (
        "config.json",
        "model.safetensors",
        "configuration_gpt2_accel.py",
        "modeling_gpt2_accel.py",
        "attention.py",
    ):
        (ck / "model" / f).write_bytes((d / f).read_bytes())
    (ck / "training_state.json").write_text(json.dumps({"step": step}))
    (ck / "COMPLETE").touch()
    return ck


def _tree_digest(d: Path) -> dict[str, str]:
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(d.rglob("*"))
    }


@pytest.fixture(scope="module")
def hub():
    with HubTestServer() as server:
        yield server


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return _make_run(tmp_path_factory.mktemp("run") / "tiny-run", checkpoints=(2, 3))


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


def test_model_card_has_hub_metadata_and_run_facts(run_dir, tmp_path):
    import shutil

    from huggingface_hub import ModelCard

    d = tmp_path / "run"
    shutil.copytree(run_dir, d)
    path = write_model_card(d, "tester/tiny")
    assert path == d / "README.md"
    card = ModelCard.load(path)
    data = card.data
    assert data.library_name == "transformers" and data.license == "mit"
    assert data.datasets == ["HuggingFaceFW/fineweb-edu"]
    assert "gpt2_accel" in data.tags and data.pipeline_tag == "text-generation"
    metrics = {r.metric_type: r.metric_value for r in data.eval_results}
    assert metrics == {"loss": 10.5, "perplexity": 36315.5, "accuracy": 0.26}
    text = card.text
    for fact in (
        "| n_layer | 2 |",
        "| Final train loss | 10.2500 |",
        "| Final validation loss | 10.5000 |",
        "| Tokens seen | 3072 |",
        "| Hardware | 1x CPU |",
        "![Training and validation loss](loss_curve.png)",
        'from_pretrained("tester/tiny", trust_remote_code=True)',
        "HuggingFaceFW/fineweb-edu",
    ):
        assert fact in text, fact
    assert SECRET not in card.content


def test_in_process_push_from_a_thread_private_with_one_resumable_checkpoint(hub, tmp_path, no_xet):
    run = _make_run(tmp_path / "run", checkpoints=(2,))
    result: dict = {}

    def push():
        try:
            result["url"] = push_run(
                run, "tester/ckpt", token=hub.token, private=True, include_checkpoints=True, endpoint=hub.url
            )
        except Exception as e:  # pragma: no cover - surfaced by the assert below
            result["error"] = e

    t = threading.Thread(target=push)  # as the trainer does, off the training loop
    t.start()
    t.join(timeout=120)
    assert "error" not in result, result.get("error")
    assert result["url"] == f"{hub.url}/tester/ckpt"
    assert hub.repos["tester/ckpt"].private
    assert "checkpoints/step_00000002/training_state.json" in hub.files("tester/ckpt")

    _add_checkpoint(run, 3)
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
