"""``python -m gpt2_accel.merge``: kept for scripts written before the command-line programs moved to
:mod:`gpt2_accel.cli.merge` (``gpt2-accel merge``)."""

from .cli.merge import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
