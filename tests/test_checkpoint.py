"""Atomic checkpoint commit, discovery of the newest complete one, and retention."""

from __future__ import annotations

from gpt2_accel import checkpoint as ckpt


def _make(output_dir, step, complete=True):
    """The layout save_checkpoint writes (files resume reads), with stand-in contents; the trainer tests use real ones."""
    tmp = ckpt.staging_dir(output_dir, step)
    for rel in (*ckpt.REQUIRED, ckpt.MODEL_EXPORT[0], "state/model.safetensors"):
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_text(f'{{"step": {step}}}')
    return ckpt.commit(tmp, step) if complete else tmp


def test_half_written_checkpoint_is_never_picked(tmp_path):
    _make(tmp_path, 100)
    tmp = _make(tmp_path, 200, complete=False)  # killed during the save of step 200
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000100"
    # a directory with the final name but no COMPLETE marker (killed during a prune) is ignored too
    broken = tmp_path / "checkpoints" / "step_00000300"
    broken.mkdir()
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000100"
    # the next save cleans the stale temporary directory up
    _make(tmp_path, 400)
    assert not tmp.exists()
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000400"


def test_retention_keeps_newest_and_best(tmp_path):
    for s in (100, 200, 300, 400):
        _make(tmp_path, s)
    removed = ckpt.prune(tmp_path, keep_last=2, keep_steps={100})
    assert [p.name for p in removed] == ["step_00000200"]
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path)] == [100, 300, 400]
    assert ckpt.prune(tmp_path, keep_last=None) == []


def test_recommit_same_step_keeps_the_committed_one(tmp_path):
    first = _make(tmp_path, 100)
    (first / "marker").write_text("original")
    again = _make(tmp_path, 100)
    assert again == first and (first / "marker").read_text() == "original"


def test_recipe_differences_lists_fields():
    saved = {"n_layer": 2, "dataset_name": "a.txt", "max_steps": 10}
    now = {"n_layer": 4, "dataset_name": "a.txt", "max_steps": 20}
    diffs = ckpt.recipe_differences(saved, now)
    assert diffs == ["n_layer: checkpoint 2 != recipe 4"]  # max_steps may change (extend a run)


def test_atomic_write_replaces_whole_file(tmp_path):
    p = tmp_path / "x.json"
    ckpt.write_json(p, {"a": 1})
    ckpt.write_json(p, {"a": 2})
    assert ckpt.read_json(p) == {"a": 2}
    assert not list(tmp_path.glob(".x.json.tmp-*"))


def test_clock_jumps_do_not_reorder_or_overwrite(tmp_path):
    import os

    old, new = _make(tmp_path, 100), _make(tmp_path, 200)
    os.utime(new, (0, 0))  # the clock jumped back before the newer save...
    os.utime(old, (4e9, 4e9))  # ...or forward before the older one
    assert ckpt.latest_checkpoint(tmp_path) == new  # ordered by step, never by time
    (new / "marker").write_text("first")
    assert _make(tmp_path, 200) == new and (new / "marker").read_text() == "first"  # same step: no overwrite


def test_recommit_over_a_damaged_checkpoint_keeps_it_aside(tmp_path):
    first = _make(tmp_path, 100)
    (first / "data_state.json").write_text(
        "{}x"
    )  # damaged after its commit (same size + 1: the manifest sees it)
    again = _make(tmp_path, 100)
    assert again == first and ckpt.verify(again).ok
    aside = tmp_path / "checkpoints" / "step_00000100.corrupt"
    assert aside.is_dir() and (aside / "data_state.json").read_text() == "{}x"  # kept, not deleted
