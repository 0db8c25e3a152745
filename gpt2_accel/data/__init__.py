"""Data: stream any dataset, tokenize and pack on the fly, shard across ranks, resume exactly; pre-tokenized shards.

Two kinds of training source:

- **text** (default, streamed): a Hub dataset, local txt/json/jsonl/parquet/arrow files or ``bundled:shakespeare``,
  or a weighted mixture of them. Documents are read in order, tokenized in a background worker, joined with
  ``<|endoftext|>`` and cut into windows. Rank ``r`` of ``w`` reads a disjoint part of the stream. The position
  (source positions + mixture RNG + the < block_size tokens carried between chunks) is saved exactly.
- **tokens** (memory-mapped): a directory written by ``gpt2-accel prepare``, nanoGPT's ``train.bin``/``val.bin`` or
  llm.c's ``.bin`` shards. Windows are drawn in a seeded random order that depends only on the seed, so the run
  resumes exactly at any world size (global sample ``k`` is always the same window).

Windows have ``block_size + 1`` tokens and consecutive windows overlap by ONE token (stride ``block_size``): the
trainer's inputs ``w[:, :-1]`` and targets ``w[:, 1:]`` then make every token of the stream a target exactly once,
as llm.c's loader does (it reads ``B*T + 1`` tokens per batch).

See docs/data.md for the user-facing description.
"""

from .._compat import moved_main
from .loader import TrainLoader, build_eval_windows, build_train_loader
from .shards import prepare, write_shard
from .sources import (
    ASSETS_DATA,
    BUNDLED,
    DOCS_PER_CHUNK,
    INDEX_FILE,
    INDEX_FORMAT,
    LLMC_HEADER_INTS,
    LLMC_MAGIC,
    TEXT_EXTS,
    SourceSpec,
    _HFSource,
    _holdout_key,
    _memmap_tokens,
    resolve_source,
)
from .streaming import _TokenStream, check_block_size, check_uint16

# The package's modules, in the order data flows: sources (what to read) -> streaming (tokenize, pack) ->
# loader (workers, rank split, resumable state; validation windows); shards is `gpt2-accel prepare`'s library.
__all__ = [
    "ASSETS_DATA",
    "BUNDLED",
    "DOCS_PER_CHUNK",
    "INDEX_FILE",
    "INDEX_FORMAT",
    "LLMC_HEADER_INTS",
    "LLMC_MAGIC",
    "TEXT_EXTS",
    "SourceSpec",
    "TrainLoader",
    "_HFSource",
    "_TokenStream",
    "_holdout_key",
    "_memmap_tokens",
    "build_eval_windows",
    "build_train_loader",
    "check_block_size",
    "check_uint16",
    "prepare",
    "resolve_source",
    "write_shard",
]


__getattr__ = moved_main(__name__, "prepare")  # `gpt2_accel.data.main` keeps working
