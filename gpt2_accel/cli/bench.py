"""``gpt2-accel bench``: time training steps of a recipe's model (library: :mod:`gpt2_accel.bench`)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ..bench import run_bench
from ..recipe import RecipeError, load_recipe
from .common import command_parser, error, parse_known


def main(argv: list[str] | None = None) -> int:
    parser = command_parser(
        "bench",
        "Time forward + backward + optimizer steps of a recipe's model and print ms/step, tokens/s, "
        "MFU and peak memory. Any other --key=value overrides a recipe key (e.g. --n_layer=6 --bf16=true).",
    )
    parser.add_argument(
        "recipe", help="YAML recipe (its model shape, batch, accumulation, bf16, torch_compile)"
    )
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps (default 10)")
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed steps first (compile, allocator; default 3)"
    )
    parser.add_argument(
        "--real-data", action="store_true", help="feed the recipe's data through the real pipeline"
    )
    parser.add_argument(
        "--profile", metavar="DIR", help="also profile 2 steps: DIR/trace.json (chrome trace)"
    )
    parser.add_argument("--device", help="cuda, cuda:1, cpu... (default: cuda if available)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU); default: torch's choice")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    args, overrides = parse_known(parser, argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        recipe = load_recipe(args.recipe, overrides)
        result = run_bench(
            recipe,
            steps=args.steps,
            warmup=args.warmup,
            real_data=args.real_data,
            profile_dir=args.profile,
            device=args.device,
        )
    except RecipeError as e:
        return error(e)
    print(result.summary())
    if args.json:
        Path(args.json).write_text(json.dumps(dataclasses.asdict(result), indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
