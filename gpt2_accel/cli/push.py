"""``gpt2-accel push``: push a run directory to the Hugging Face Hub (library: :mod:`gpt2_accel.hub`)."""

from __future__ import annotations

import logging

from ..hub import HubPushError, push_run, write_model_card
from .common import command_parser, console_logging, error, parse


def main(argv: list[str] | None = None) -> int:
    """``gpt2-accel push RUN_DIR --repo-id ID [--private] [--token T] [--include-checkpoints]``."""
    p = command_parser(
        "push",
        "Push a run directory (model, tokenizer, code, model card, loss curve) to the Hugging Face Hub.",
    )
    p.add_argument(
        "run_dir", help="run directory written by `gpt2-accel train` (or any save_pretrained directory)"
    )
    p.add_argument(
        "--repo-id", "--repo_id", required=True, help="Hub repo 'namespace/name' (created if missing)"
    )
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument(
        "--token", default=None, help="Hub token with write access (default: HF_TOKEN or `hf auth login`)"
    )
    p.add_argument(
        "--include-checkpoints",
        "--include_checkpoints",
        action="store_true",
        help="also upload the newest resumable checkpoint under checkpoints/",
    )
    p.add_argument("--revision", default=None, help="branch to push to (created if missing; default main)")
    p.add_argument("--commit-message", "--commit_message", default="Upload model trained with gpt2_accel")
    p.add_argument(
        "--card-only",
        "--card_only",
        action="store_true",
        help="only write RUN_DIR/README.md (the model card) and print its path; push nothing",
    )
    args = parse(p, argv)
    console_logging(logging.INFO)
    try:
        if args.card_only:
            print(write_model_card(args.run_dir, args.repo_id))
            return 0
        url = push_run(
            args.run_dir,
            args.repo_id,
            token=args.token,
            private=args.private,
            commit_message=args.commit_message,
            include_checkpoints=args.include_checkpoints,
            revision=args.revision,
        )
    except HubPushError as e:
        return error(e, 1)
    print(url)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
