"""Console logging of the programs: progress, results and paths; third-party routine lines only at debug level.

``setup_logging(level)`` is the one place that configures logging (the training entry point,
``gpt2_accel.train.configure_process``, calls it with the recipe's ``log_level``, a TrainingArguments name). Routine lines that other libraries print on every save are demoted to
DEBUG, so ``log_level: debug`` still shows them and nothing is dropped for users who ask for verbosity. Real
warnings of those libraries are untouched.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator

LEVELS = ("passive", "debug", "info", "warning", "error", "critical")

# (logger name, pattern of the routine message). Each was seen on every checkpoint of a CPU run.
ROUTINE: tuple[tuple[str, str], ...] = (
    # DeepSpeed's import (transformers' save_pretrained probes for ZeRO-3) announces the accelerator it picked,
    # as a WARNING, even in runs that do not use DeepSpeed.
    ("DeepSpeed", r"Setting (ds_)?accelerator to"),
    # The LM head shares the embedding's storage (tied weights): safetensors stores it once, by design.
    ("accelerate.utils.other", r"Removed shared tensor"),
    # One INFO line per file that save_state/load_state writes or reads.
    ("accelerate.checkpointing", r""),
    (
        "accelerate.accelerator",
        r"(Saving current state|Loading states) (to|from)|Loading in \d+ custom states",
    ),
    # Under FSDP (seen on a GPU run, accelerate 1.15): a line per model/optimizer shard saved or loaded.
    (
        "accelerate.accelerator",
        r"(?i)(saving|loading) FSDP (model|optimizer)|FSDP (model|optimizer) (saved|loaded)",
    ),
    (
        "accelerate.utils.fsdp_utils",
        r"(?i)(saving|loading) (optimizer|model)|(optimizer|model)( state)? (saved|loaded)",
    ),
    # matplotlib's first import on a fresh machine (the loss plot) builds its font cache, at INFO.
    ("matplotlib.font_manager", r"generated new fontManager"),
)


class _DemoteRoutine(logging.Filter):
    """Relabel matching records as DEBUG; let them through only when ``gpt2_accel`` logs at DEBUG."""

    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.pattern.search(record.getMessage()):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger("gpt2_accel").isEnabledFor(logging.DEBUG)


def setup_logging(level: str = "info", main_process: bool = True) -> None:
    """Console format and level for ``gpt2_accel`` (``passive`` = info); other processes log warnings only."""
    if level not in LEVELS:
        raise ValueError(f"log_level must be one of {', '.join(LEVELS)}; got {level!r}")
    numeric = logging.INFO if level == "passive" else getattr(logging, level.upper())
    if not main_process:
        numeric = max(numeric, logging.WARNING)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logging.getLogger("gpt2_accel").setLevel(numeric)
    demote_routine_lines()


def demote_routine_lines() -> None:
    """Install the ROUTINE filters (idempotent). Every command does, before it loads a model: transformers'
    loading code imports DeepSpeed when it is installed, and DeepSpeed's import prints its accelerator line."""
    for name, pattern in ROUTINE:
        log = logging.getLogger(name)
        if not any(isinstance(f, _DemoteRoutine) and f.pattern.pattern == pattern for f in log.filters):
            log.addFilter(_DemoteRoutine(pattern))


@contextlib.contextmanager
def quiet_save() -> Iterator[None]:
    """Hide transformers' progress bar of a routine save or load ("Writing model shards", "Loading weights"); shown
    at debug level."""
    from transformers.utils import logging as hf_logging

    if (
        logging.getLogger("gpt2_accel").isEnabledFor(logging.DEBUG)
        or not hf_logging.is_progress_bar_enabled()
    ):
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()
