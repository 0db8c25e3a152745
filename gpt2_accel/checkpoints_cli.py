"""``gpt2-accel checkpoints RUN_DIR``: list a run's checkpoints with step, validation loss, size and verification.

Read-only: it verifies every committed checkpoint (sizes and hashes against its manifest, see checkpoint.py) and
reports what resume would pick, but renames nothing; the next ``train`` moves damaged ones aside. Exit status 1 if a
committed checkpoint fails verification, 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from . import checkpoint as ckpt
from .run_files import read_trainer_state


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _val_loss(path: Path, step: int) -> float | None:
    """The validation loss measured at this checkpoint's step, if the run evaluated there."""
    try:
        last = read_trainer_state(path).last_eval or {}
    except (OSError, ValueError, TypeError):
        return None
    return last.get("val_loss") if last.get("step") == step else None


def list_checkpoints(run_dir: str | Path, *, hashes: bool = True) -> list[dict[str, Any]]:
    """One row per checkpoint directory (committed, damaged and renamed, or never completed), oldest first."""
    root = Path(run_dir) / ckpt.CHECKPOINTS
    rows = []
    committed = ckpt.complete_checkpoints(run_dir)
    resume = None
    for step, path in committed:
        v = ckpt.verify(path, hashes=hashes)
        rows.append({"step": step, "path": str(path), "val_loss": _val_loss(path, step), "size": _size(path),
                     "ok": v.ok, "status": v.status})  # fmt: skip
        if v.ok:
            resume = len(rows) - 1
    if resume is not None:
        rows[resume]["resume"] = True
    names = {p.name for _, p in committed}
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        if p.name in names or not p.is_dir():
            continue
        if ckpt.CORRUPT in p.name:
            status = "damaged, renamed aside by a resume (kept for inspection; delete when done)"
        elif p.name.startswith(".tmp-"):
            status = "incomplete save (no COMPLETE marker; removed by the next save)"
        else:
            status = "no COMPLETE marker: never resumed from"
        digits = "".join(c for c in p.name.split(".")[0 if not p.name.startswith(".") else 1] if c.isdigit())
        rows.append({"step": int(digits) if digits else None, "path": str(p), "val_loss": None, "size": _size(p),
                     "ok": None, "status": status})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    from .cli import accept_both_spellings

    parser = accept_both_spellings(
        argparse.ArgumentParser(prog="gpt2-accel checkpoints", description=__doc__.splitlines()[0])
    )
    parser.add_argument("run_dir", help="a training run's output_dir")
    parser.add_argument(
        "--no_hash", action="store_true", help="check sizes and layout only (fast on huge runs)"
    )
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    run = Path(args.run_dir)
    if not (run / ckpt.CHECKPOINTS).is_dir():
        print(
            f"error: {run} has no {ckpt.CHECKPOINTS}/ directory: not a training run's output_dir",
            file=sys.stderr,
        )
        return 2
    rows = list_checkpoints(run, hashes=not args.no_hash)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{'step':>9}  {'val_loss':>8}  {'size':>9}  status")
        for r in rows:
            step = "-" if r["step"] is None else str(r["step"])
            loss = "-" if r["val_loss"] is None else f"{r['val_loss']:.4f}"
            mark = "  <- resume" if r.get("resume") else ""
            print(
                f"{step:>9}  {loss:>8}  {_human(r['size']):>9}  {r['status']}{mark}  {Path(r['path']).name}"
            )
        if not rows:
            print("(no checkpoints)")
    return 1 if any(r["ok"] is False for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
