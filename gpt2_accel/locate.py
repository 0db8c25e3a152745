"""Where a model is: OpenAI's GPT-2 names, and the directory of a run that holds its model.

``hub``, ``sample``, ``evaluation``, ``export`` and the trainer all resolve a user's model argument here, so a run
directory means the same model to every command.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger("gpt2_accel")

# OpenAI's four GPT-2 sizes (Radford et al. 2019), as named on the Hub; each also lives under openai-community/.
OPENAI_GPT2_SIZES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
OPENAI_GPT2 = OPENAI_GPT2_SIZES + tuple(f"openai-community/{name}" for name in OPENAI_GPT2_SIZES)


def _has_model(directory: Path, adapters: bool) -> bool:
    """A full model (config.json) or, with ``adapters``, a LoRA adapter (adapter_config.json: PEFT's format)."""
    return (directory / "config.json").is_file() or (
        adapters and (directory / "adapter_config.json").is_file()
    )


def find_model_dir(path: str | os.PathLike, *, adapters: bool = False, what: str = "model") -> Path:
    """The directory holding the model in ``path``: ``path`` itself when it holds one (a run after training, a
    ``save_pretrained`` directory, a checkpoint's ``model/``), else the newest committed checkpoint's ``model/``
    (a run still training). ``FileNotFoundError`` otherwise, naming the sub-directories that do hold a model."""
    from .checkpoint import latest_checkpoint

    path = Path(path)
    if _has_model(path, adapters):
        return path
    ckpt = latest_checkpoint(path) if path.is_dir() else None
    if ckpt is not None and _has_model(ckpt / "model", adapters):
        logger.info("no final model in %s yet: using checkpoint %s", path, ckpt.name)
        return ckpt / "model"
    candidates = sorted(p.parent for p in path.glob("*/config.json")) if path.is_dir() else []
    hint = f" Sub-directories with a model: {[str(c) for c in candidates]}." if candidates else ""
    raise FileNotFoundError(
        f"{path} holds no {what}: it has no config.json at its root and no committed checkpoint (checkpoints/step_*/model "
        f"with a COMPLETE marker).{hint} Pass a run directory written by `gpt2-accel train`, a checkpoint's model/ "
        "or a directory written by save_pretrained"
    )


def resolve_model(name_or_path: str) -> str:
    """What to hand ``from_pretrained``: for a local directory, the directory holding its model
    (:func:`find_model_dir`); anything else (a Hub id, an OpenAI name) unchanged."""
    return str(find_model_dir(name_or_path)) if Path(name_or_path).is_dir() else name_or_path
