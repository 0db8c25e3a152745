"""``python -m gpt2_accel.data`` = ``gpt2-accel prepare`` (the command lives in gpt2_accel/cli/prepare.py)."""

from ..cli.prepare import main

raise SystemExit(main())
