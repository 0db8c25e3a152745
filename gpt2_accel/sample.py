"""Sample text from a model (``gpt2-accel sample``): nanoGPT's sample.py plus nucleus (top-p) sampling.

Works for this toolkit's run directories and checkpoints (loaded with ``trust_remote_code=True`` from the code
saved next to the weights), for any transformers causal LM directory such as a ``GPT2LMHeadModel``, and for Hub
ids. Tokens are streamed to the terminal as they are generated; generation uses the KV cache.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ._compat import moved_main
from .locate import resolve_model

logger = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


# A run directory without a final model resolves to its newest committed checkpoint's ``model/`` (locate.py).
resolve_model_path = resolve_model


def load_model_and_tokenizer(model: str, device: str = "cpu", dtype: torch.dtype | None = None):
    """Load the causal LM at ``model`` (directory or Hub id) and its tokenizer (else the bundled GPT-2 one)."""
    from transformers import AutoModelForCausalLM

    # Importing this module imported gpt2_accel, which registered our Auto classes; trust_remote_code=True lets
    # other custom-code checkpoints load too.
    from .logs import quiet_save

    path = resolve_model_path(model)
    with quiet_save():  # transformers' "Loading weights" bar is noise before the samples
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
    batch_size: int = 1,
    quantize: str | None = None,
) -> list[str]:
    """Generate ``num_samples`` continuations of ``prompt``; return the full texts (prompt + continuation).

    The RNG is seeded once with ``seed`` before the first sample, as nanoGPT does, so a seed fixes all samples.
    ``temperature`` 0 is greedy decoding. With ``stream`` the text is printed token by token. ``compile`` (CUDA)
    compiles our model's decoding step with CUDA graphs (see gpt2_accel.decode). ``batch_size`` samples are decoded
    together (one forward per token for all of them: more tokens/s, benchmarks/bench_generate.py); greedy rows are
    the same as one at a time, sampled ones are other draws of the same distribution (the seed still fixes them).
    Streaming prints one sample at a time, so it needs ``batch_size`` 1. ``quantize="int8"`` decodes our model
    on the CPU with weight-only int8 matrices (gpt2_accel.decode; close to fp32, not equal).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if stream and batch_size > 1:
        raise ValueError("streaming prints one sample at a time: use batch_size 1, or turn streaming off")
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

    # Our model decodes with a static KV cache and no per-token generate() machinery (gpt2_accel.decode), a batch
    # of equal-length prompts as well as one; other transformers models go through generate().
    fast = supports_fast_decoding(model)
    if quantize and not fast:
        raise ValueError(
            f"quantize={quantize!r} applies to gpt2_accel's GPT-2-block models, which gpt2_accel.decode decodes; "
            f"{type(model).__name__} ({model.config.model_type}) samples through transformers' generate(): "
            "leave quantization off for it"
        )
    decoder = Decoder(model, compile=compile, quantize=quantize) if fast else None
    torch.manual_seed(seed)
    texts = []
    for i in range(0, num_samples, batch_size):
        batch = input_ids.repeat(min(batch_size, num_samples - i), 1)  # (b, T): the same prompt per row
        streamer = TextStreamer(tokenizer, skip_prompt=False) if stream else None
        if decoder is not None:
            out = decoder.generate(
                batch,
                max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                streamer=streamer,
            )
        else:
            with torch.no_grad():
                out = model.generate(
                    batch, attention_mask=torch.ones_like(batch), streamer=streamer, **gen_kwargs
                )
        texts += [tokenizer.decode(row.tolist()) for row in out]
        if stream and i < num_samples - 1:
            print("---------------", flush=True)
    return texts


__getattr__ = moved_main(__name__, "sample")  # `gpt2_accel.sample.main` keeps working


if __name__ == "__main__":  # `python -m gpt2_accel.sample` runs the command, which lives in gpt2_accel/cli/
    from .cli.sample import main

    raise SystemExit(main())
