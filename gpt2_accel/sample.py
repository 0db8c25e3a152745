"""Sample text from a model (``gpt2-accel sample``): nanoGPT's sample.py plus nucleus (top-p) sampling.

Works for this toolkit's run directories and checkpoints (loaded with ``trust_remote_code=True`` from the code
saved next to the weights), for any transformers causal LM directory such as a ``GPT2LMHeadModel``, and for Hub
ids. Tokens are streamed to the terminal as they are generated; generation uses the KV cache.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def resolve_model_path(model: str) -> str:
    """A run directory without a final model resolves to its newest committed checkpoint's ``model/``."""
    from .locate import find_model_dir

    return str(find_model_dir(model)) if Path(model).is_dir() else model  # else a Hub id


def load_model_and_tokenizer(model: str, device: str = "cpu", dtype: torch.dtype | None = None):
    """Load the causal LM at ``model`` (directory or Hub id) and its tokenizer (else the bundled GPT-2 one)."""
    from transformers import AutoModelForCausalLM

    # Importing this module imported gpt2_accel, which registered our Auto classes; trust_remote_code=True lets
    # other custom-code checkpoints load too.
    path = resolve_model_path(model)
    lm = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=dtype)
    lm.to(device).eval()
    tok = load_tokenizer(path)
    if tok is None:
        tok = _bundled_gpt2(f"{path} has no tokenizer files")
    return lm, tok


def load_tokenizer(path: str):
    """The tokenizer saved with the model at ``path`` (directory or Hub id); None when a directory has none."""
    from transformers import AutoTokenizer

    local = Path(path)
    if local.is_dir() and not any((local / f).is_file() for f in _TOKENIZER_FILES):
        return None
    try:
        # As for the model: transformers reads config.json (whose auto_map names custom code) before the
        # tokenizer files, and would otherwise stop to ask.
        return AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    except (OSError, ValueError) as e:
        return _bundled_gpt2(f"could not load the tokenizer of {path} ({e.__class__.__name__})")


def _bundled_gpt2(why: str):
    from .tokenization import get_tokenizer

    logger.warning("%s: using the bundled GPT-2 tokenizer", why)
    return get_tokenizer("gpt2").hf


def read_prompt(prompt: str) -> str:
    """``FILE:path`` reads the prompt from a file (nanoGPT's convention); anything else is the prompt itself."""
    if prompt.startswith("FILE:"):
        return Path(prompt[5:]).read_text(encoding="utf-8")
    return prompt


def generate_samples(
    model,
    tokenizer,
    prompt: str = "\n",
    *,
    num_samples: int = 1,
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int | None = 200,
    top_p: float | None = None,
    seed: int = 1337,
    stream: bool = False,
    compile: bool = False,
) -> list[str]:
    """Generate ``num_samples`` continuations of ``prompt``; return the full texts (prompt + continuation).

    The RNG is seeded once with ``seed`` before the first sample, as nanoGPT does, so a seed fixes all samples.
    ``temperature`` 0 is greedy decoding. With ``stream`` the text is printed token by token. ``compile`` (CUDA)
    compiles our model's decoding step with CUDA graphs (see gpt2_accel.decode).
    """
    from transformers import TextStreamer

    device = next(model.parameters()).device
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    eos = tokenizer.eos_token_id
    if not ids:  # nothing to condition on: start from <|endoftext|>, the document separator in training
        ids = [eos if eos is not None else 0]
    n_ctx = getattr(model.config, "n_positions", None) or getattr(
        model.config, "max_position_embeddings", None
    )
    if n_ctx is not None:
        # Learned position embeddings stop at n_ctx and the KV cache cannot slide, so the prompt is cut to its
        # last tokens and the continuation to what fits.
        if len(ids) >= n_ctx:
            logger.warning(
                "prompt has %d tokens, the model's context is %d: keeping the last %d",
                len(ids),
                n_ctx,
                n_ctx - 1,
            )
            ids = ids[-(n_ctx - 1) :]
        if len(ids) + max_new_tokens > n_ctx:
            logger.warning(
                "max_new_tokens cut from %d to %d to fit the context of %d",
                max_new_tokens,
                n_ctx - len(ids),
                n_ctx,
            )
            max_new_tokens = n_ctx - len(ids)
    input_ids = torch.tensor([ids], device=device)  # (1, T)
    do_sample = temperature > 0
    gen_kwargs = dict(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        use_cache=True,
        pad_token_id=eos if eos is not None else 0,
        eos_token_id=None,  # like nanoGPT, keep going through <|endoftext|> (it separates documents)
    )
    if do_sample:
        gen_kwargs.update(
            temperature=temperature, top_k=top_k or 0, top_p=top_p if top_p is not None else 1.0
        )
    else:
        gen_kwargs.update(temperature=None, top_k=None, top_p=None)
    from .decode import Decoder, supports_fast_decoding

    # Our model decodes with a static KV cache and no per-token generate() machinery (gpt2_accel.decode);
    # other transformers models go through generate().
    decoder = Decoder(model, compile=compile) if supports_fast_decoding(model) else None
    torch.manual_seed(seed)
    texts = []
    for i in range(num_samples):
        streamer = TextStreamer(tokenizer, skip_prompt=False) if stream else None
        if decoder is not None:
            out = decoder.generate(
                input_ids,
                max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                streamer=streamer,
            )
        else:
            with torch.no_grad():
                out = model.generate(
                    input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer, **gen_kwargs
                )
        texts.append(tokenizer.decode(out[0].tolist()))
        if stream and i < num_samples - 1:
            print("---------------", flush=True)
    return texts


def main(argv: list[str] | None = None) -> int:
    """``gpt2-accel sample --model PATH_OR_HUB_ID [--prompt TEXT|FILE:path] ...``."""
    p = argparse.ArgumentParser(
        prog="gpt2-accel sample",
        description="Sample text from a trained model (run directory, checkpoint, HF model directory or Hub id).",
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
        "--no-stream",
        "--no_stream",
        dest="stream",
        action="store_false",
        help="print each sample when done instead of token by token",
    )
    from .cli import accept_both_spellings

    accept_both_spellings(p)
    args = p.parse_args(argv)
    if not 0 < args.top_p <= 1:
        p.error(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.temperature < 0:
        p.error(f"--temperature must be >= 0, got {args.temperature}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        model, tokenizer = load_model_and_tokenizer(args.model, device, getattr(torch, args.dtype))
    except (OSError, ValueError) as e:
        print(f"error: could not load model {args.model!r}: {e}", file=sys.stderr)
        return 1
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
        stream=args.stream,
        compile=args.compile,
    )
    if not args.stream:
        for text in texts:
            print(text)
            print("---------------")
    return 0


if __name__ == "__main__":
    sys.exit(main())
