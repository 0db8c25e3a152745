"""Checkpoints that survive kills: write under a temporary name, mark complete, rename; prune only after that.

Layout of ``<output_dir>/checkpoints/step_00000100/``:

- ``state/``: Accelerate's ``save_state`` (model, optimizer, per-process RNG); sharded for FSDP/DeepSpeed.
- ``model/``: a Hugging Face model directory (consolidated safetensors, config, tokenizer, modeling code).
- ``trainer_state.json``: step, tokens seen, best validation loss, skipped steps, world size.
- ``data_state.json``: every rank's data position.
- ``recipe.yaml``: the resolved recipe of the run that wrote it.
- ``COMPLETE``: written last, after everything else is on disk; a directory without it is never resumed from.

Multi-node runs need ``output_dir`` on a filesystem every node sees (each process writes its own state files).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
_STEP_RE = re.compile(r"^step_(\d{8})$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def complete_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Committed checkpoints of a run, oldest first. Half-written ones (no COMPLETE marker) are ignored."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / COMPLETE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    ckpts = complete_checkpoints(output_dir)
    return ckpts[-1][1] if ckpts else None


def staging_dir(output_dir: str | os.PathLike, step: int) -> Path:
    """A fresh temporary directory for the checkpoint of ``step`` (main process only)."""
    root = Path(output_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a save that was killed; never a committed checkpoint
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-{checkpoint_name(step)}"
    tmp.mkdir()
    return tmp


def commit(tmp: Path, step: int) -> Path:
    """Mark ``tmp`` complete and rename it to its final name (main process only, after all ranks wrote)."""
    final = tmp.parent / checkpoint_name(step)
    write_json(tmp / COMPLETE, {"step": step})
    _fsync_dir(tmp)
    if final.exists():
        # Same step saved again (e.g. preempted right after a resume): the committed one is equivalent; keep it.
        shutil.rmtree(tmp, ignore_errors=True)
        return final
    os.rename(tmp, final)  # atomic on POSIX: the checkpoint appears complete or not at all
    _fsync_dir(final.parent)
    return final


def prune(
    output_dir: str | os.PathLike, keep_last: int | None, keep_steps: set[int] = frozenset()
) -> list[Path]:
    """Delete committed checkpoints beyond the newest ``keep_last``, never those in ``keep_steps`` (the best).

    Called only after a new checkpoint is committed, so the newest good one always survives.
    """
    if keep_last is None:
        return []
    ckpts = complete_checkpoints(output_dir)
    removed = []
    for step, path in ckpts[:-keep_last] if keep_last > 0 else ckpts:
        if step in keep_steps:
            continue
        # Remove the marker first: a kill in the middle of rmtree leaves a directory resume will ignore.
        (path / COMPLETE).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


# Keys that must match to resume: they change what the model is or what data it sees.
RESUME_MUST_MATCH = (
    "n_layer",
    "n_head",
    "n_embd",
    "n_positions",
    "vocab_size",
    "pad_vocab_size_multiple",
    "bias",
    "attn_type",
    "dataset_name",
    "dataset_config_name",
    "dataset_weights",
    "text_column",
    "train_split",
    "validation_split",
    "validation_dataset_name",
    "validation_split_percentage",
    "tokenizer_name",
    "block_size",
    "shuffle_buffer_size",
    "seed",
)


def recipe_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable list of the must-match keys whose values differ between two flat recipes."""
    diffs = []
    for key in RESUME_MUST_MATCH:
        if key in saved and saved.get(key) != current.get(key):
            diffs.append(f"{key}: checkpoint {saved.get(key)!r} != recipe {current.get(key)!r}")
    return diffs
