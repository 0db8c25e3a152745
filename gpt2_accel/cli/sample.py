"""``gpt2-accel sample``: sample text from a model (library: :mod:`gpt2_accel.sample`)."""

from __future__ import annotations

import logging

import torch

from ..sample import generate_samples, load_model_and_tokenizer, read_prompt
from .common import command_parser, console_logging, error, parse


def main(argv: list[str] | None = None) -> int:
    """``gpt2-accel sample --model PATH_OR_HUB_ID [--prompt TEXT|FILE:path] ...``."""
    p = command_parser(
        "sample",
        "Sample text from a trained model (run directory, checkpoint, HF model directory or Hub id).",
    )
    p.add_argument("--model", required=True, help="run directory, save_pretrained directory, or Hub id")
    p.add_argument(
        "--prompt", "--start", default="\n", help="prompt text, or FILE:path to read it (default: newline)"
    )
    p.add_argument(
        "--num_samples", "--num-samples", type=int, default=10, help="number of samples (default 10)"
    )
    p.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=500, help="tokens per sample")
    p.add_argument(
        "--temperature", type=float, default=0.8, help="softmax temperature; 0 = greedy (default 0.8)"
    )
    p.add_argument("--top_k", "--top-k", type=int, default=200, help="keep the k likeliest tokens; 0 = off")
    p.add_argument("--top_p", "--top-p", type=float, default=1.0, help="nucleus sampling mass; 1.0 = off")
    p.add_argument("--seed", type=int, default=1337, help="RNG seed (same seed, same samples)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps... (default: cuda if available)")
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights dtype"
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="CUDA: compile the decoding step with a static cache and CUDA graphs (first sample pays compilation)",
    )
    p.add_argument(
        "--batch_size",
        "--batch-size",
        type=int,
        default=1,
        help="samples decoded together (faster per token; implies --no-stream when > 1; default 1)",
    )
    p.add_argument(
        "--quantize",
        choices=["none", "int8"],
        default="none",
        help="CPU, our fp32 models: decode with weight-only int8 matrices (a quarter of the bytes per token; "
        "tokens close to fp32's, not equal; docs/performance.md). Default none",
    )
    p.add_argument(
        "--no-stream",
        "--no_stream",
        dest="stream",
        action="store_false",
        help="print each sample when done instead of token by token",
    )
    args = parse(p, argv)
    if not 0 < args.top_p <= 1:
        p.error(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.temperature < 0:
        p.error(f"--temperature must be >= 0, got {args.temperature}")
    if args.batch_size < 1:
        p.error(f"--batch_size must be >= 1, got {args.batch_size}")
    stream = args.stream and args.batch_size == 1
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    console_logging(logging.WARNING)
    try:
        model, tokenizer = load_model_and_tokenizer(args.model, device, getattr(torch, args.dtype))
    except (OSError, ValueError) as e:
        return error(f"could not load model {args.model!r}: {e}", 1)
    quantize = None if args.quantize == "none" else args.quantize
    try:
        texts = generate_samples(
            model,
            tokenizer,
            read_prompt(args.prompt),
            num_samples=args.num_samples,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            stream=stream,
            compile=args.compile,
            batch_size=args.batch_size,
            quantize=quantize,
        )
    except ValueError as e:  # the arguments were checked above: a --quantize that cannot apply to this model
        return error(e)
    if not stream:
        for text in texts:
            print(text)
            print("---------------")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
