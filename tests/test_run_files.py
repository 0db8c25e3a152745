"""The run-directory schema (gpt2_accel/run_files.py) against the files a real run wrote, and the files of the
previous version, which every reader must keep reading."""

from __future__ import annotations

import json
import shutil

from gpt2_accel import run_files
from gpt2_accel.run_files import TrainerState


def test_the_files_a_run_writes_match_the_schema(trained_run):
    info = run_files.read_run_info(trained_run)
    assert info is not None and info.extra == {}  # every field written is declared
    assert (info.steps, info.tokens_seen, info.world_size, info.license) == (3, 192, 1, "apache-2.0")
    assert info.device_type == "cpu" and info.hardware.startswith("CPU (") and info.wall_time_s > 0
    rows = run_files.read_metrics(trained_run)
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(set(r) <= set(run_files.TrainLog.__annotations__) for r in train)
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 3]
    assert run_files.read_eval_results(trained_run) == {k: v for k, v in evals[-1].items() if k != "step"}
    states = [run_files.read_trainer_state(trained_run / "checkpoints" / f"step_{s:08d}") for s in (1, 2, 3)]
    assert [s.step for s in states] == [1, 2, 3] and [s.tokens_seen for s in states] == [64, 128, 192]
    # wall time grows with the run and ends where run_info records it (the final export comes after the save)
    assert 0 < states[0].wall_time_s < states[1].wall_time_s < states[2].wall_time_s <= info.wall_time_s


def test_files_of_the_previous_version_still_read(trained_run, tmp_path):
    ck = tmp_path / "step"
    shutil.copytree(trained_run / "checkpoints" / "step_00000002", ck)
    old = json.loads((ck / "trainer_state.json").read_text())
    del old["wall_time_s"]  # the previous version had no wall time
    (ck / "trainer_state.json").write_text(json.dumps(old))
    state = run_files.read_trainer_state(ck)
    assert state == TrainerState(**{**old, "wall_time_s": 0.0})

    run = tmp_path / "run"
    run.mkdir()
    (run / "run_info.json").write_text(json.dumps({"steps": 7, "hardware": "1x CPU", "future_field": [1]}))
    info = run_files.read_run_info(run)
    assert (info.steps, info.hardware, info.wall_time_s, info.license) == (7, "1x CPU", None, None)
    run_files.write_run_info(run, info)  # a field of a newer version survives a rewrite
    assert json.loads((run / "run_info.json").read_text())["future_field"] == [1]


def test_a_metrics_line_cut_by_a_crash_is_skipped_and_truncation_keeps_earlier_steps(trained_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(trained_run / run_files.METRICS, run / run_files.METRICS)
    with open(run / run_files.METRICS, "a") as f:
        f.write('{"step": 4, "loss": 1')  # killed mid-write
    assert [r["step"] for r in run_files.read_metrics(run)] == [1, 2, 2, 3, 3]
    last_train, last_eval = run_files.last_logs(run)
    assert last_train["step"] == 3 and last_eval["step"] == 3 and "val_loss" in last_eval
    run_files.truncate_metrics(run, 2)
    assert [r["step"] for r in run_files.read_metrics(run)] == [1, 2, 2]
