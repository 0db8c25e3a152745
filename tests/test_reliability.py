"""What a cluster's faults do to a run (docs/reliability.md): one writer per run directory, verified checkpoints,
no code from checkpoints, a run that ends exits, a full disk, SIGTERM during a save, and bad run directories.

Every run is the tiny model of tests/test_train.py on the bundled Shakespeare; each fault is made on files a real
run wrote, and the resumed run is compared with the run that was not interrupted.
"""

from __future__ import annotations

import contextlib
import errno
import json
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gpt2_accel import checkpoint as ckpt
from gpt2_accel.runlock import LOCK_NAME, RunLock, RunLockedError

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "demo.yaml"
TIMEOUT = 240
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--n_positions=32", "--per_device_train_batch_size=2",
        "--per_device_eval_batch_size=4", "--max_eval_samples=4", "--warmup_steps=1", "--logging_steps=1",
        "--eval_steps=0"]  # fmt: skip


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    return env


def _train_cmd(run: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "gpt2_accel", "train", str(DEMO), *TINY, f"--output_dir={run}", *args]


def _trainer(run: Path, **keys):
    from gpt2_accel.trainer import Trainer

    base = dict(
        n_layer=2, n_head=2, n_embd=32, n_positions=32, per_device_train_batch_size=2, per_device_eval_batch_size=4,
        max_eval_samples=4, dataloader_num_workers=0, warmup_steps=1, logging_steps=1, eval_steps=0, save_steps=2,
        max_steps=4, save_total_limit=None, output_dir=str(run),
    )  # fmt: skip
    base.update(keys)
    return Trainer(**base)


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _snapshot(run: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(run)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in run.rglob("*")
        if p.is_file()
    }


def _wait_for(cond, proc: subprocess.Popen, what: str, timeout: float = TIMEOUT) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return
        if proc.poll() is not None:
            raise AssertionError(
                f"process ended before {what}: {proc.stderr.read()[-3000:] if proc.stderr else ''}"
            )
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout}s")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A 4-step run with checkpoints at steps 2 and 4, written by the trainer; tests copy it before damaging it."""
    run = tmp_path_factory.mktemp("finished") / "run"
    _trainer(run).train()
    return run


def _copy(run: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(run, dest)
    return dest


# ---------------------------------------------------------------------------------------------------------------
# one writer per run directory
# ---------------------------------------------------------------------------------------------------------------
def test_a_second_run_on_the_same_output_dir_is_refused_and_writes_nothing(tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen(_train_cmd(run, "--max_steps=100000", "--save_steps=2", "--dataloader_num_workers=1"),
                             env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)  # fmt: skip
    try:
        _wait_for(lambda: ckpt.latest_checkpoint(run) is not None, first, "the first checkpoint")
        holder = json.loads((run / LOCK_NAME).read_text())
        assert holder["pid"] == first.pid and holder["host"] and holder["started"]
        before = {k: v for k, v in _snapshot(run).items() if not k.startswith(("metrics", "checkpoints"))}
        second = subprocess.run(_train_cmd(run, "--max_steps=4"), env=_env(), cwd=ROOT, capture_output=True,
                                text=True, timeout=TIMEOUT)  # fmt: skip
        assert second.returncode == 2
        line = [x for x in second.stderr.splitlines() if x.startswith("error:")]
        assert len(line) == 1 and f"pid {first.pid}" in line[0] and "in use by another run" in line[0]
        assert "force_unlock" in line[0] and str(run) in line[0]
        after = {k: v for k, v in _snapshot(run).items() if not k.startswith(("metrics", "checkpoints"))}
        assert (
            after == before
        )  # the refused run wrote nothing (the first one keeps writing metrics/checkpoints)
        steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert steps == sorted(set(steps))  # one writer: no interleaved records
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # a node loss: no clean-up runs
        first.wait(timeout=60)
    # the kernel dropped the dead run's lock: the same command resumes at once
    t = _trainer(run, max_steps=int(ckpt.latest_checkpoint(run).name.split("_")[1]) + 2, save_steps=100)
    t.train()
    assert t.state.step >= 4


_HOLD = "import sys, time; from gpt2_accel.runlock import RunLock; lock = RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)"  # fmt: skip


def _holder(run: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(run)], env=_env(), stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_lock_dies_with_its_process_and_force_unlock_moves_it_aside(tmp_path):
    run = tmp_path / "run"
    holder = _holder(run)
    try:
        with pytest.raises(RunLockedError, match=rf"pid {holder.pid}.*force_unlock=true"):
            RunLock(run).acquire()
        forced = RunLock(run, force=True).acquire()  # the documented way past a holder nobody can reach
        assert forced.held and list(run.glob(f"{LOCK_NAME}.broken-*"))  # the old lock file is kept, renamed
        forced.release()
    finally:
        holder.kill()
        holder.wait(timeout=30)
    holder = _holder(run)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    with RunLock(run) as lock:  # SIGKILL released it: no stale lock to break
        assert lock.held and json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()


# The holder forks a child (as a DataLoader worker is forked), lets a second child exit normally, then waits.
_FORKING_HOLDER = """
import os, sys, time
from gpt2_accel.runlock import RunLock
lock = RunLock(sys.argv[1]).acquire()
if os.fork() == 0:
    sys.exit(0)  # a worker that ends normally: its exit must not unlock or blank the parent's lock
os.wait()
if os.fork() == 0:
    time.sleep(60)  # a worker that outlives its parent for a while (torch's workers poll for it every few s)
    os._exit(0)
print("held", flush=True)
time.sleep(600)
"""


def test_forked_workers_neither_hold_nor_release_the_run_lock(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _FORKING_HOLDER, str(run)], env=_env(), stdout=subprocess.PIPE,
                              text=True, start_new_session=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        # the first child exited: the parent still holds the lock, and its record still names it
        with pytest.raises(RunLockedError, match=rf"pid {holder.pid}"):
            RunLock(run).acquire()
        holder.send_signal(signal.SIGKILL)  # the trainer alone dies; its sleeping child lives on
        holder.wait(timeout=30)
        with RunLock(run) as lock:  # the relaunch gets the lock at once, while the orphaned worker still runs
            assert lock.held
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(holder.pid, signal.SIGKILL)  # the orphaned child


# ---------------------------------------------------------------------------------------------------------------
# verified checkpoints
# ---------------------------------------------------------------------------------------------------------------
def _checkpoints_cli(run: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpt2_accel", "checkpoints", str(run)], env=_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip


def test_a_truncated_checkpoint_is_skipped_renamed_and_the_older_one_resumes_exactly(
    finished_run, tmp_path, caplog
):
    run = _copy(finished_run, tmp_path / "run")
    original = _losses(run)
    newest = run / "checkpoints" / "step_00000004"
    weights = newest / "state" / "model.safetensors"
    with open(weights, "r+b") as f:  # a partial copy / quota hit: the "invalid header length"
        f.truncate(weights.stat().st_size // 2)
    listing = _checkpoints_cli(run)
    assert listing.returncode == 1, listing.stderr
    rows = {line.split()[0]: line for line in listing.stdout.splitlines()[1:]}
    assert "CORRUPT" in rows["4"] and "state/model.safetensors" in rows["4"] and "truncated" in rows["4"]
    assert " ok " in rows["2"] and "<- resume" in rows["2"]

    t = _trainer(run)
    with caplog.at_level("WARNING", logger="gpt2_accel"):
        t.train()
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "step_00000004" in warning and "state/model.safetensors" in warning and "truncated" in warning
    kept = run / "checkpoints" / "step_00000004.corrupt"
    assert kept.is_dir() and (kept / "state" / "model.safetensors").is_file()  # kept, never deleted
    assert _losses(run) == original  # steps 3-4 retrained from step 2: the same losses, bitwise
    assert ckpt.verify(run / "checkpoints" / "step_00000004").ok  # the retrained step 4 was committed again
    after = _checkpoints_cli(run)
    assert after.returncode == 0 and "renamed aside" in after.stdout


def test_verification_checks_size_hash_and_layout(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path / "run")
    c = run / "checkpoints" / "step_00000002"
    assert ckpt.verify(c).ok and ckpt.verify(c).manifest
    data = bytearray((c / "state" / "optimizer.bin").read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit: same size, other content
    (c / "state" / "optimizer.bin").write_bytes(bytes(data))
    v = ckpt.verify(c)
    assert not v.ok and "state/optimizer.bin: content differs" in v.status
    assert ckpt.verify(c, hashes=False).ok  # --no_hash sees sizes only
    (c / "data_state.json").unlink()
    assert "data_state.json: missing" in ckpt.verify(c).status


def test_a_complete_marker_without_files_is_skipped_and_none_left_is_a_clear_error(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path / "run")
    fake = run / "checkpoints" / "step_00000006"
    fake.mkdir()
    ckpt.write_json(fake / ckpt.COMPLETE, {"step": 6})  # a marker copied without its files
    assert ckpt.newest_intact_checkpoint(run)[0].name == "step_00000004"
    assert (run / "checkpoints" / "step_00000006.corrupt" / ckpt.COMPLETE).is_file()
    # every checkpoint damaged: the run refuses rather than silently starting over, and names the fix
    for c in ckpt.complete_checkpoints(run):
        (c[1] / "trainer_state.json").unlink()
    with pytest.raises(ckpt.CheckpointError, match=r"no intact checkpoint left.*overwrite_output_dir=true"):
        _trainer(run).train()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step_00000002.corrupt", "step_00000004.corrupt", "step_00000006.corrupt"]  # fmt: skip
    assert not (run / LOCK_NAME).read_text()  # the refused run released its lock


# ---------------------------------------------------------------------------------------------------------------
# resume never runs code from a checkpoint
# ---------------------------------------------------------------------------------------------------------------
class _Payload:
    """Unpickling this creates ``path``: what a poisoned checkpoint would do with os.system instead."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("name", ["optimizer.bin", "random_states_0.pkl"])
def test_a_state_file_carrying_a_pickle_payload_is_refused_before_loading(finished_run, tmp_path, name):
    run = _copy(finished_run, tmp_path / "run")
    marker = tmp_path / "pwned"
    c = run / "checkpoints" / "step_00000004"
    torch.save({"state": _Payload(marker), "param_groups": []}, c / "state" / name)
    # a forger rewrites the manifest too: verification passes, the pickle check must not
    ckpt.write_manifest(c)
    assert ckpt.verify(c).ok
    with pytest.raises(ckpt.CheckpointError, match=rf"{name} would import io.open.*may run code"):
        _trainer(run, max_steps=6).train()
    assert not marker.exists()
    assert c.is_dir()  # refused, not renamed or deleted: the user decides


def test_pickle_globals_are_read_without_unpickling():
    import numpy as np

    assert ckpt.pickle_globals(pickle.dumps(os.system, protocol=0)) == [("posix", "system")]
    assert ("posix", "system") in ckpt.pickle_globals(pickle.dumps([1, os.system], protocol=4))
    legit = {
        "t": torch.ones(2),
        "rng": np.random.get_state(),
        "od": __import__("collections").OrderedDict(a=1),
    }
    import io

    buf = io.BytesIO()
    torch.save(legit, buf)
    path = Path(__file__).parent / "__never_written__"
    assert not path.exists()
    import zipfile

    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith(".pkl")))
    assert all(ckpt._allowed(m, n) for m, n in ckpt.pickle_globals(data))


# ---------------------------------------------------------------------------------------------------------------
# faults during a save
# ---------------------------------------------------------------------------------------------------------------
def test_disk_full_during_a_save_stops_clearly_keeps_the_previous_and_the_relaunch_resumes(
    finished_run, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    real_save = torch.save

    def full_disk(obj, f, *a, **k):  # the optimizer state of the step-4 save hits ENOSPC half way
        if ".tmp-step_00000004" in str(f):
            Path(f).write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(
        ckpt.CheckpointError, match=r"disk is full.*step 4.*step_00000002 is intact.*relaunch"
    ):
        _trainer(run).train()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step_00000002"
    ]  # partial save removed
    assert ckpt.verify(run / "checkpoints" / "step_00000002").ok
    monkeypatch.setattr(torch, "save", real_save)  # space freed
    t = _trainer(run)
    t.train()
    assert t.state.step == 4 and _losses(run) == _losses(finished_run)


def test_sigterm_during_a_save_completes_it_whole_and_stops(finished_run, tmp_path, monkeypatch):
    from accelerate import Accelerator

    run = tmp_path / "run"
    real = Accelerator.save_state

    def save_then_signal(self, output_dir=None, **kw):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the checkpoint is being written
        return real(self, output_dir, **kw)

    monkeypatch.setattr(Accelerator, "save_state", save_then_signal)
    out = _trainer(run).train()
    assert out == {"step": 2, "stopped": True}
    monkeypatch.setattr(Accelerator, "save_state", real)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000002"]
    assert ckpt.verify(run / "checkpoints" / "step_00000002").ok
    _trainer(run).train()
    assert _losses(run) == _losses(finished_run)


def test_a_save_killed_before_its_commit_is_discarded_whole(finished_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    real = ckpt.commit

    def killed(tmp, step):
        if step == 4:
            raise SystemExit("killed")  # the process dies after writing the files, before COMPLETE/rename
        return real(tmp, step)

    monkeypatch.setattr(ckpt, "commit", killed)
    with pytest.raises(SystemExit):
        _trainer(run).train()
    monkeypatch.setattr(ckpt, "commit", real)
    assert (run / "checkpoints" / ".tmp-step_00000004").is_dir()
    assert ckpt.latest_checkpoint(run).name == "step_00000002"
    _trainer(run).train()
    assert _losses(run) == _losses(finished_run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]


# ---------------------------------------------------------------------------------------------------------------
# a run that finishes, exits
# ---------------------------------------------------------------------------------------------------------------
class _AtStep:
    """A callback that, at one logged step, raises (a crash in user code) or sends SIGTERM to this process."""

    def __init__(self, step: int, action: str):
        self.step, self.action = step, action

    def on_log(self, trainer, logs):
        if logs["step"] == self.step:
            if self.action == "error":
                raise RuntimeError("boom")
            os.kill(os.getpid(), signal.SIGTERM)

    def __getattr__(self, name):
        return lambda *a, **k: None


@pytest.mark.parametrize("how", ["complete", "error", "signal"])
def test_the_data_worker_is_gone_after_train_returns_or_raises(tmp_path, how):
    t = _trainer(tmp_path / "run", dataloader_num_workers=1, max_steps=3, save_steps=100)
    if how == "error":
        t.callbacks.append(_AtStep(2, "error"))
        with pytest.raises(RuntimeError, match="boom"):
            t.train()
    elif how == "signal":
        t.callbacks.append(_AtStep(1, "signal"))
        assert t.train()["stopped"]
    else:
        t.train()
    assert multiprocessing.active_children() == []  # joined, not left to the interpreter's exit handler


@pytest.mark.slow  # six launches; the default suite keeps the in-process checks and the one that used to hang
# 0 (in-process loading) and 2 (several worker processes); 1 worker takes the same multi-process DataLoader path
# as 2 and is covered by test_the_data_worker_is_gone_after_train_returns_or_raises and test_train.py's SIGTERM test
@pytest.mark.parametrize("workers", [0, 2])
def test_train_exits_within_seconds_when_done_stopped_or_resumed(tmp_path, workers):
    run = tmp_path / "run"
    args = ["--max_steps=3", "--save_steps=100", f"--dataloader_num_workers={workers}"]
    done = subprocess.run(_train_cmd(run, *args), env=_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=TIMEOUT)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    exited = time.time()
    assert exited - (run / "run_info.json").stat().st_mtime < 30  # from the last file written to the exit
    # resuming a finished run: nothing to train, and it exits too
    again = subprocess.run(_train_cmd(run, *args), env=_env(), cwd=ROOT, capture_output=True, text=True,
                           timeout=TIMEOUT)  # fmt: skip
    assert again.returncode == 0 and "resumed from" in again.stderr
    # stopped by SIGTERM to the whole process group (scancel, spot preemption): checkpoint, then exit 0
    other = tmp_path / "other"
    proc = subprocess.Popen(_train_cmd(other, "--max_steps=100000", "--save_steps=100000",
                                       f"--dataloader_num_workers={workers}"),
                            env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        _wait_for(lambda: (other / "metrics.jsonl").is_file() and (other / "metrics.jsonl").stat().st_size, proc,
                  "the first logged step")  # fmt: skip
        os.killpg(proc.pid, signal.SIGTERM)
        t0 = time.time()
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        assert time.time() - t0 < 60 and ckpt.latest_checkpoint(other) is not None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------------------------
# bad run directories: early, naming the path and the fix, nothing deleted
# ---------------------------------------------------------------------------------------------------------------
def test_a_foreign_output_dir_is_refused_and_left_as_it_was(tmp_path):
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    (foreign / "checkpoint-500").mkdir()  # a transformers Trainer run, not ours
    before = _snapshot(foreign)
    proc = subprocess.run(_train_cmd(foreign, "--max_steps=2"), env=_env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=TIMEOUT)  # fmt: skip
    assert proc.returncode == 2
    assert f"output_dir '{foreign}' holds files no gpt2_accel run wrote" in proc.stderr
    assert "new or empty directory" in proc.stderr
    assert _snapshot(foreign) == before and sorted(p.name for p in foreign.iterdir()) == ["checkpoint-500",
                                                                                           "thesis.tex"]  # fmt: skip


def test_a_checkpoint_of_another_model_shape_is_refused_naming_the_file(finished_run, tmp_path):
    run = _copy(finished_run, tmp_path / "run")
    other = tmp_path / "wide"
    _trainer(other, n_embd=64, max_steps=2).train()
    # someone copied a 64-wide run's state into this 32-wide run's checkpoint (its config still says 32)
    import shutil

    target = run / "checkpoints" / "step_00000004" / "state"
    shutil.rmtree(target)
    shutil.copytree(other / "checkpoints" / "step_00000002" / "state", target)
    ckpt.write_manifest(target.parent)
    with pytest.raises(
        ckpt.CheckpointError, match=r"model.safetensors holds a model of another shape.*recipe"
    ):
        _trainer(run, max_steps=6).train()
    assert target.is_dir()


@pytest.mark.skipif(os.geteuid() != 0, reason="chattr +i needs root (as non-root, chmod a-w shows the same)")
def test_a_read_only_checkpoint_dir_fails_at_start_not_at_the_first_save(finished_run, tmp_path):
    # Root ignores permission bits (chmod), so the read-only directory is made immutable instead, which stops root
    # too; as a normal user `chmod a-w` gives the same EACCES through the same probe.
    run = _copy(finished_run, tmp_path / "run")
    ro = run / "checkpoints"
    if subprocess.run(["chattr", "+i", str(ro)], capture_output=True).returncode != 0:
        pytest.skip("this filesystem does not support chattr +i")
    try:
        with pytest.raises(
            ckpt.CheckpointError, match=rf"cannot write to '{ro}'.*chattr -i.*another output_dir"
        ):
            _trainer(run, max_steps=6).train()
    finally:
        subprocess.run(["chattr", "-i", str(ro)], check=True)
    assert sorted(p.name for p in ro.iterdir()) == ["step_00000002", "step_00000004"]


_RAISES = """
import sys
sys.path.insert(0, sys.argv[2])
import test_reliability as T
from pathlib import Path
t = T._trainer(Path(sys.argv[1]), dataloader_num_workers=1, max_steps=3, save_steps=100)
t.callbacks.append(T._AtStep(2, "error"))
t.train()
"""


def test_a_run_that_raises_exits_instead_of_hanging_on_its_worker(tmp_path):
    # Before the fix this process never exited: the traceback kept the DataLoader iterator alive, so at exit
    # multiprocessing SIGTERMed the worker (which ignores it) and joined it for ever.
    proc = subprocess.run([sys.executable, "-c", _RAISES, str(tmp_path / "run"), str(Path(__file__).parent)],
                          env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip
    assert proc.returncode == 1 and "RuntimeError: boom" in proc.stderr


def _mount_tmpfs(path: Path, size_mb: int, remount: bool = False) -> bool:
    opts = f"remount,size={size_mb}m" if remount else f"size={size_mb}m"
    path.mkdir(parents=True, exist_ok=True)
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )


def test_a_really_full_disk_during_a_save(finished_run, tmp_path):
    """The same fault on a real filesystem: a tmpfs that holds one checkpoint but not two (root only)."""
    disk = tmp_path / "disk"
    per_checkpoint = sum(
        p.stat().st_size for p in (finished_run / "checkpoints" / "step_00000002").rglob("*")
    )
    if os.geteuid() != 0 or not _mount_tmpfs(disk, int(per_checkpoint * 1.6 / 2**20) + 1):
        pytest.skip("mounting a tmpfs needs root (the write-hook test above covers the same path)")
    try:
        run = disk / "run"
        with pytest.raises(ckpt.CheckpointError, match=r"disk is full.*step 4.*step_00000002 is intact"):
            _trainer(run).train()
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002"]
        assert ckpt.verify(run / "checkpoints" / "step_00000002").ok
        assert _mount_tmpfs(disk, 512, remount=True)  # space freed
        _trainer(run).train()
        assert _losses(run) == _losses(finished_run)
    finally:
        subprocess.run(
            ["umount", "-l", str(disk)], capture_output=True
        )  # lazy: pytest still holds the traceback
