"""``gpt2-accel merge ADAPTER_DIR --output DIR``: fold a LoRA adapter into its base and write a plain model.

The output is an ordinary gpt2_accel model directory (config.json, model.safetensors, the model code, the
tokenizer): ``gpt2-accel sample``, ``gpt2-accel eval`` and ``gpt2-accel convert --to-hf`` take it like any run.
"""

from __future__ import annotations

from pathlib import Path

from ..logs import quiet_save
from .common import command_parser, fail, parse


def main(argv: list[str] | None = None) -> int:
    parser = command_parser(
        "merge",
        "Merge a LoRA adapter (a use_peft run directory or a checkpoint's model/) into its base model.",
    )
    parser.add_argument(
        "adapter_dir", help="directory holding adapter_config.json + adapter_model.safetensors"
    )
    parser.add_argument(
        "--output", "-o", required=True, metavar="DIR", help="new directory for the merged model"
    )
    parser.add_argument(
        "--base",
        default=None,
        help="base model (OpenAI name, model directory, Hub id); default: base_model_name_or_path of the adapter",
    )
    args = parse(parser, argv)
    output = Path(args.output)
    if output.exists() and any(output.iterdir()):
        fail(parser, f"{output} exists and is not empty; pick a new --output")

    from ..atomic import atomic_output
    from ..convert import _save_tokenizer
    from ..lora import merge_adapter

    try:
        with quiet_save():  # transformers' loading bars of the base and adapter are noise here
            model = merge_adapter(args.adapter_dir, args.base)
    except (OSError, ValueError) as e:
        fail(parser, e)
    # written whole, then renamed: an interrupted merge leaves no half directory behind (an empty one is replaced)
    with atomic_output(output, is_dir=True) as tmp, quiet_save():
        model.save_pretrained(tmp, safe_serialization=True)
        tok = _save_tokenizer(args.adapter_dir, tmp, model.config.vocab_size)
    n = sum(p.numel() for p in model.parameters())
    print(f"merged {args.adapter_dir} into its base: {n / 1e6:.2f}M parameters and {tok} written to {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
