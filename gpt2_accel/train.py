"""``accelerate launch [--config_file ...] -m gpt2_accel.train RECIPE.yaml [--key=value ...]``.

The launch target users and the README name; the command itself is :mod:`gpt2_accel.cli.train`
(also ``gpt2-accel train``).
"""

from __future__ import annotations

from .cli.train import configure_process, main

__all__ = ["configure_process", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
