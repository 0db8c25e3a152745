"""``gpt2-accel export``: export to transformers GPT-2, GGUF or ONNX (library: :mod:`gpt2_accel.export`)."""

from __future__ import annotations

from ..export import OUTTYPES, export
from ..logs import quiet_save
from .common import command_parser, fail, parse


def main(argv: list[str] | None = None) -> int:
    """``gpt2-accel export RUN --format {hf,gguf,onnx} --output PATH [--outtype ...] [--overwrite]``."""
    p = command_parser(
        "export",
        "Export a gpt2_accel model to transformers (GPT2LMHeadModel), GGUF (llama.cpp) or ONNX.",
    )
    p.add_argument("model", help="run directory, save_pretrained directory, checkpoint or Hub id")
    p.add_argument("--format", required=True, choices=list(OUTTYPES), help="target runtime format")
    p.add_argument("--output", "-o", required=True, help="directory (hf, onnx) or file (gguf) to write")
    p.add_argument(
        "--outtype",
        help="weight type: "
        + "; ".join(f"{f}: {', '.join(t)} (default {t[0]})" for f, t in OUTTYPES.items()),
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = parse(p, argv)
    try:
        with quiet_save():  # transformers' loading/writing bars of the intermediate model are noise here
            out = export(args.model, args.format, args.output, outtype=args.outtype, overwrite=args.overwrite)
    except (OSError, ValueError, TypeError) as e:
        fail(p, e)
    what = {"hf": "transformers directory", "gguf": "GGUF file", "onnx": "ONNX directory"}
    print(f"wrote {what[args.format]} ({args.outtype or OUTTYPES[args.format][0]}) to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
