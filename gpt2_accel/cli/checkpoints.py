"""``gpt2-accel checkpoints RUN_DIR``: list a run's checkpoints with step, validation loss, size and verification.

Read-only: it verifies every committed checkpoint (sizes and hashes against its manifest, see checkpoint.py) and
reports what resume would pick, but renames nothing; the next ``train`` moves damaged ones aside. Exit status 1 if a
committed checkpoint fails verification, 0 otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import checkpoint as ckpt
from .common import command_parser, error, parse


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("checkpoints", __doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a training run's output_dir")
    parser.add_argument(
        "--no_hash", action="store_true", help="check sizes and layout only (fast on huge runs)"
    )
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parse(parser, argv)
    run = Path(args.run_dir)
    if not (run / ckpt.CHECKPOINTS).is_dir():
        return error(f"{run} has no {ckpt.CHECKPOINTS}/ directory: not a training run's output_dir")
    rows = ckpt.list_checkpoints(run, hashes=not args.no_hash)
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
