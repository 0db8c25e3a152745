"""``gpt2-accel <command>``: a thin dispatcher; each command is a module of this package, named for it.

The library (``gpt2_accel.*``) never imports this package: a command parses its arguments, calls library
functions and prints. The shared parser helpers are in :mod:`gpt2_accel.cli.common`.
"""

from __future__ import annotations

import importlib
import sys

from .common import accept_both_spellings

__all__ = ["COMMANDS", "accept_both_spellings", "main"]

COMMANDS = {
    "train": (
        "gpt2_accel.cli.train",
        "train from a YAML recipe (same as accelerate launch -m gpt2_accel.train)",
    ),
    "sample": ("gpt2_accel.cli.sample", "generate text from a run directory, a Hub repo or vanilla gpt2"),
    "eval": ("gpt2_accel.cli.eval", "validation loss/perplexity or HellaSwag of any checkpoint"),
    "prepare": ("gpt2_accel.cli.prepare", "tokenize a dataset into uint16 shards for the fastest training"),
    "push": ("gpt2_accel.cli.push", "push a finished run to the Hugging Face Hub with a model card"),
    "convert": ("gpt2_accel.cli.convert", "convert between OpenAI/transformers GPT-2 and gpt2_accel"),
    "export": (
        "gpt2_accel.cli.export",
        "export to transformers GPT-2, GGUF (llama.cpp) or ONNX (onnxruntime)",
    ),
    "merge": (
        "gpt2_accel.cli.merge",
        "fold a LoRA adapter into its base model and write a plain model directory",
    ),
    "bench": (
        "gpt2_accel.cli.bench",
        "time training steps of a recipe's model: ms/step, tokens/s, MFU, memory",
    ),
    "checkpoints": (
        "gpt2_accel.cli.checkpoints",
        "list a run's checkpoints: step, val loss, size, verification",
    ),
    "ema": (
        "gpt2_accel.cli.ema",
        "build the post-hoc EMA model of any length from a run's EMA snapshots (EDM2)",
    ),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: gpt2-accel <command> [args...]\n\ncommands:")
        for name, (_, doc) in COMMANDS.items():
            print(f"  {name:<11} {doc}")
        print("\n`gpt2-accel <command> --help` documents each command.")
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from .. import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"error: unknown command {name!r}{hint}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
