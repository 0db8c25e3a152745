"""Third-party routine lines are demoted to DEBUG (gpt2_accel/logs.py): the console shows progress, results and
paths. The messages below are copied from real runs' consoles (accelerate 1.15 under FSDP on a GPU, a fresh
matplotlib cache)."""

from __future__ import annotations

import logging

import pytest

from gpt2_accel.logs import demote_routine_lines

SEEN = [
    ("accelerate.accelerator", "[RANK 0] Saving FSDP model"),
    (
        "accelerate.accelerator",
        "[RANK 0] FSDP Optimizer saved to output dir /tmp/r/checkpoints/.tmp-step_10/state",
    ),
    (
        "accelerate.utils.fsdp_utils",
        "[RANK 0] Saving Optimizer state to /tmp/r/checkpoints/.tmp-step_10/state/o",
    ),
    (
        "accelerate.utils.fsdp_utils",
        "[RANK 0] Model saved to /tmp/r/checkpoints/.tmp-step_10/state/pytorch_model",
    ),
    ("accelerate.accelerator", "Saving current state to /tmp/r/checkpoints/.tmp-step_10/state"),
    ("accelerate.accelerator", "[RANK 0] Loading in 0 custom states"),
    ("matplotlib.font_manager", "generated new fontManager"),
]


def _passes(name: str, msg: str, level: int = logging.INFO) -> bool:
    record = logging.getLogger(name).makeRecord(name, level, __file__, 1, msg, (), None)
    return all(f.filter(record) for f in logging.getLogger(name).filters)


@pytest.mark.parametrize("name,msg", SEEN)
def test_routine_lines_show_only_at_debug(name, msg):
    demote_routine_lines()
    ours = logging.getLogger("gpt2_accel")
    old = ours.level
    try:
        ours.setLevel(logging.INFO)
        assert not _passes(name, msg)
        ours.setLevel(logging.DEBUG)
        assert _passes(name, msg)
    finally:
        ours.setLevel(old)


def test_real_warnings_of_the_same_loggers_stay():
    demote_routine_lines()
    assert _passes("accelerate.accelerator", "Gradient accumulation steps mismatch", logging.WARNING)
