"""``python -m gpt2_accel.checkpoints_cli``: kept for scripts written before the command-line programs moved to
:mod:`gpt2_accel.cli.checkpoints` (``gpt2-accel checkpoints``)."""

from .cli.checkpoints import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
