"""``gpt2-accel convert``: import a standard transformers model or export to one (library: :mod:`gpt2_accel.convert`)."""

from __future__ import annotations

from pathlib import Path

from ..convert import _load_ours, _save_tokenizer, from_hf, to_hf
from .common import command_parser, fail, parse


def main(argv: list[str] | None = None) -> int:
    """``gpt2-accel convert``: import a standard model (``--from-hf``) or export to one (``--to-hf``)."""
    parser = command_parser(
        "convert",
        "Convert between gpt2_accel checkpoints and the transformers class that computes the same "
        "function: GPT2LMHeadModel, LlamaForCausalLM, Qwen3ForCausalLM or NanoChatForCausalLM.",
    )
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument(
        "--from-hf",
        metavar="SRC",
        help="GPT-2 directory or Hub id (gpt2, gpt2-xl...), or a Llama / Qwen3 / NanoChat directory",
    )
    direction.add_argument("--to-hf", metavar="SRC", help="gpt2_accel model directory or Hub id")
    parser.add_argument("--output", "-o", required=True, metavar="DIR", help="directory to write")
    parser.add_argument("--attn-type", help="--from-hf only: attention variant of the new model (default SM)")
    parser.add_argument("--dropout", type=float, help="--from-hf only: dropout of the new model")
    parser.add_argument(
        "--pad-vocab-size-multiple",
        type=int,
        help="--from-hf only: pad the embedding rows (64 -> 50304 for GPT-2)",
    )
    args = parse(parser, argv)

    output = Path(args.output)
    try:
        if args.from_hf:
            overrides = {
                k: v
                for k, v in dict(
                    attn_type=args.attn_type,
                    dropout=args.dropout,
                    pad_vocab_size_multiple=args.pad_vocab_size_multiple,
                ).items()
                if v is not None
            }
            source = args.from_hf
            model = from_hf(source, **overrides)
        else:
            if args.attn_type or args.dropout is not None or args.pad_vocab_size_multiple:
                parser.error("--attn-type/--dropout/--pad-vocab-size-multiple apply to --from-hf only")
            source = args.to_hf
            model = to_hf(_load_ours(source))
        model.save_pretrained(output)
        tok = _save_tokenizer(source, output, model.config.vocab_size)
    except (OSError, ValueError, TypeError) as e:
        fail(parser, e)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {type(model).__name__} ({n / 1e6:.1f}M parameters) and {tok} to {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
