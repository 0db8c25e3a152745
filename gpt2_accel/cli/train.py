"""``gpt2-accel train RECIPE.yaml [--key=value ...]``, also run as ``accelerate launch -m gpt2_accel.train ...``.
``--help`` lists every recipe key with its doc.
"""

from __future__ import annotations

import sys

from ..recipe import Recipe, RecipeError, help_text, load_recipe
from .common import error

USAGE = "usage: gpt2-accel train RECIPE.yaml [--key=value | --key value ...]\n       accelerate launch [--config_file CFG] -m gpt2_accel.train RECIPE.yaml [--key=value ...]"


def configure_process(recipe: Recipe) -> None:
    """The process-wide settings of a training program (a library never sets them): console logging at the recipe's
    log_level (warnings only on the ranks other than 0) and TF32 matmuls on CUDA. Call it before ``Trainer`` in a
    script of your own to get the same console and speed."""
    import os

    import torch

    from ..logs import setup_logging

    setup_logging(recipe.training.log_level, main_process=int(os.environ.get("RANK", "0")) == 0)
    if torch.cuda.is_available():
        # fp32 matmuls on tensor cores (tf32), as nanoGPT does; bf16/fp16 runs are unaffected
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        print(help_text())
        return 0 if argv else 2
    path, overrides = (argv[0], argv[1:]) if not argv[0].startswith("--") else (None, argv)
    try:
        recipe = load_recipe(path, overrides)  # validated before anything heavy is imported or built
    except RecipeError as e:
        return error(e)
    configure_process(recipe)
    from ..checkpoint import CheckpointError
    from ..runlock import RunLockedError
    from ..trainer import Trainer

    trainer = Trainer(recipe)
    try:
        # Set-up errors are the user's to fix (a missing file, a bad column, an unreachable model, a busy or damaged
        # run directory): one clear line, no traceback. Errors once training runs keep their traceback.
        trainer.setup()
    except (RecipeError, OSError, ValueError, CheckpointError, RunLockedError) as e:
        return error(e)
    try:
        trainer.train()
    except (
        CheckpointError
    ) as e:  # e.g. the disk filled during a save: the message says what is intact and what to do
        return error(e, 1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
