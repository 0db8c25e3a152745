"""``gpt2-accel <command>``: a thin dispatcher; each command lives in the module named for it."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "train": ("gpt2_accel.train", "train from a YAML recipe (same as accelerate launch -m gpt2_accel.train)"),
    "sample": ("gpt2_accel.sample", "generate text from a run directory, a Hub repo or vanilla gpt2"),
    "eval": ("gpt2_accel.evaluation", "validation loss/perplexity or HellaSwag of any checkpoint"),
    "prepare": ("gpt2_accel.data", "tokenize a dataset into uint16 shards for the fastest training"),
    "push": ("gpt2_accel.hub", "push a finished run to the Hugging Face Hub with a model card"),
    "convert": ("gpt2_accel.convert", "convert between OpenAI/transformers GPT-2 and gpt2_accel"),
    "export": ("gpt2_accel.export", "export to transformers GPT-2, GGUF (llama.cpp) or ONNX (onnxruntime)"),
    "merge": (
        "gpt2_accel.merge",
        "fold a LoRA adapter into its base model and write a plain model directory",
    ),
    "bench": ("gpt2_accel.bench", "time training steps of a recipe's model: ms/step, tokens/s, MFU, memory"),
    "checkpoints": (
        "gpt2_accel.checkpoints_cli",
        "list a run's checkpoints: step, val loss, size, verification",
    ),
    "ema": ("gpt2_accel.ema", "build the post-hoc EMA model of any length from a run's EMA snapshots (EDM2)"),
}


def accept_both_spellings(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Let every ``--long_option`` also be written ``--long-option`` (and the reverse).

    The recipe keys and transformers use underscores, while many CLIs use dashes; users type both.
    """
    for action in list(parser._actions):
        for opt in list(action.option_strings):
            if not opt.startswith("--"):
                continue
            body = opt[2:]
            alt = "--" + (body.replace("_", "-") if "_" in body else body.replace("-", "_"))
            if alt != opt and alt not in parser._option_string_actions:
                parser._option_string_actions[alt] = action
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: gpt2-accel <command> [args...]\n\ncommands:")
        for name, (_, doc) in COMMANDS.items():
            print(f"  {name:<11} {doc}")
        print("\n`gpt2-accel <command> --help` documents each command.")
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from . import __version__

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
