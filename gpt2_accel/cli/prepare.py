"""``gpt2-accel prepare``: pre-tokenize datasets into uint16 shards (library: :func:`gpt2_accel.data.prepare`)."""

from __future__ import annotations

from ..data import prepare
from .common import command_parser, parse


def main(argv: list[str] | None = None) -> int:
    """`gpt2-accel prepare DATASET... --output DIR`: pre-tokenize into uint16 shards."""
    p = command_parser(
        "prepare",
        "Stream and tokenize datasets into uint16 token shards (llm.c format) + index.json. "
        "Re-running the same command resumes an interrupted run (completed shards are kept).",
    )
    p.add_argument(
        "datasets", nargs="+", help="Hub ids, local files/globs or bundled:shakespeare (concatenated)"
    )
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument(
        "--tokenizer", default="gpt2", help="'gpt2' (bundled), 'char', or a Hub id / tokenizer dir"
    )
    p.add_argument("--text-column", default="text")
    p.add_argument("--config", default=None, help="Hub dataset configuration, e.g. sample-10BT")
    p.add_argument("--split", default="train")
    p.add_argument("--num-proc", type=int, default=None, help="tokenizer processes (default: all cores)")
    p.add_argument("--shard-size", type=int, default=100_000_000, help="tokens per shard (llm.c uses 1e8)")
    p.add_argument("--validation-split-percentage", type=float, default=5.0,
                   help="percent of documents held out (same hash rule as training) into val_*.bin")  # fmt: skip
    args = parse(p, argv)
    index = prepare(
        args.datasets,
        args.output,
        tokenizer_name=args.tokenizer,
        text_column=args.text_column,
        config=args.config,
        split=args.split,
        num_proc=args.num_proc,
        shard_size=args.shard_size,
        validation_split_percentage=args.validation_split_percentage,
    )
    sp = index["splits"]
    print(f"wrote {args.output}: {sp['train']['tokens']:,} train tokens in {len(sp['train']['shards'])} shard(s), "
          f"{sp['validation']['tokens']:,} validation tokens")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
