"""Compatibility with earlier layouts: ``gpt2_accel.<module>.main`` (before the commands moved to :mod:`gpt2_accel.cli`) keeps working."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def moved_main(module: str, command: str) -> Callable[[str], Any]:
    """A module ``__getattr__`` that resolves ``<module>.main`` to ``gpt2_accel.cli.<command>.main`` on first use
    (lazily: the library module never imports the command-line program at import time)."""

    def __getattr__(name: str) -> Any:
        if name == "main":
            return importlib.import_module(f"gpt2_accel.cli.{command}").main
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
