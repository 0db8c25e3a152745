"""Shards: ``gpt2-accel prepare`` tokenizes text into uint16 token shards (llm.c's format) + ``index.json``,
resumable after an interruption."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_bytes, atomic_write_text
from ..recipe import DataArguments
from ..tokenization import Tokenizer, get_tokenizer
from .sources import (
    DOCS_PER_CHUNK,
    INDEX_FILE,
    INDEX_FORMAT,
    LLMC_HEADER_INTS,
    LLMC_MAGIC,
    _holdout_key,
    _make_source,
    _validate_text_source,
    resolve_source,
)
from .streaming import _tokenize_units, check_uint16

# ---------------------------------------------------------------------------------------------------------------
# `gpt2-accel prepare`: text -> uint16 token shards (llm.c's format), resumable
# ---------------------------------------------------------------------------------------------------------------
_WORKER_TOK: Tokenizer | None = None


def _pool_init(name: str) -> None:
    global _WORKER_TOK
    _WORKER_TOK = get_tokenizer(name)


def _pool_encode(job: tuple[list, list]) -> tuple[np.ndarray, np.ndarray]:
    assert _WORKER_TOK is not None
    return tuple(_tokenize_units(_WORKER_TOK, units).astype(np.uint16) for units in job)


def _split_units(units: list[tuple[str, bool]], pct: float, mirror_ends: bool) -> tuple[list, list]:
    """Train / validation units by the hold-out hash (as streaming does).

    With ``mirror_ends`` (plain text, where units are paragraphs of one document) a document end reaches both
    sides, like the streamed text source that ends a document even when its last paragraph is held out.
    """
    train, val = [], []
    for text, end in units:
        held = bool(text) and pct > 0 and _holdout_key(text) < pct
        (val if held else train).append((text, end))
        if end and mirror_ends:
            (train if held else val).append(("", True))
    return train, val


def write_shard(path: str, tokens: np.ndarray) -> None:
    """Write uint16 tokens with llm.c's 256-int32 header (magic, version 1, count), atomically."""
    header = np.zeros(LLMC_HEADER_INTS, dtype="<i4")
    header[:3] = (LLMC_MAGIC, 1, len(tokens))
    atomic_write_bytes(path, header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes())


def _write_index(out: Path, index: dict) -> None:
    atomic_write_text(out / INDEX_FILE, json.dumps(index, indent=1))


def prepare(
    datasets_: list[str],
    output: str,
    *,
    tokenizer_name: str = "gpt2",
    text_column: str = "text",
    config: str | None = None,
    split: str = "train",
    num_proc: int | None = None,
    shard_size: int = 100_000_000,
    validation_split_percentage: float = 5.0,
    progress: bool = True,
    _stop_after_shards: int | None = None,
) -> dict:
    """Tokenize ``datasets_`` (in order) into ``output``/{train,val}_NNNNNN.bin + index.json; resumable.

    After every completed train shard the index records the read position and the few tokens already read past
    the shard (``resume_*.bin``), so re-running the same command continues exactly where it stopped.
    """
    import multiprocessing as mp

    from tqdm.auto import tqdm

    tok = get_tokenizer(tokenizer_name)
    check_uint16(tok)
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1 token, got {shard_size}")
    out = Path(output)
    data = DataArguments(dataset_name=list(datasets_), text_column=text_column, dataset_config_name=config)
    specs = [resolve_source(n, config) for n in datasets_]
    for s in specs:
        if s.kind == "tokens":
            raise ValueError(f"{s.name!r} is already tokenized; `gpt2-accel prepare` takes text sources")
        _validate_text_source(s, data, split)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"sources": list(datasets_), "tokenizer": tok.name, "text_column": text_column, "config": config,
                "split": split, "shard_size": shard_size, "validation_split_percentage": validation_split_percentage}  # fmt: skip
    index = {"format": INDEX_FORMAT, "tokenizer": tok.name, "vocab_size": tok.vocab_size,
             "eot_token_id": tok.eot_token_id, "dtype": "uint16", "settings": settings, "complete": False,
             "splits": {"train": {"shards": [], "tokens": 0}, "validation": {"shards": [], "tokens": 0}},
             "position": None}  # fmt: skip
    bufs: dict[str, list[np.ndarray]] = {"train": [], "validation": []}
    if (out / INDEX_FILE).exists():
        prev = json.loads((out / INDEX_FILE).read_text())
        if prev.get("settings") != settings:
            raise ValueError(
                f"--output {output!r} already holds data prepared with other settings ({prev.get('settings')}); "
                "use a new --output directory or the same arguments"
            )
        if prev.get("complete"):
            print(f"{output}: already complete ({prev['splits']['train']['tokens']:,} train tokens)")
            return prev
        index = prev
        for which in bufs:
            f = out / f"resume_{which}.bin"
            if index["position"] is not None and f.exists():
                bufs[which] = [np.fromfile(f, dtype="<u2")]
    pos = index["position"] or {"source": 0, "state": None}
    written = index["splits"]["train"]["tokens"] + index["splits"]["validation"]["tokens"]
    bar = tqdm(initial=written, unit="tok", unit_scale=True, disable=not progress, desc=f"prepare {output}")

    def write(which: str, final: bool) -> int:
        n_written = 0
        size = sum(len(b) for b in bufs[which])
        while size >= shard_size or (final and size):
            flat = np.concatenate(bufs[which])
            n = min(shard_size, len(flat))
            entry = index["splits"][which]
            name = f"{'train' if which == 'train' else 'val'}_{len(entry['shards']):06d}.bin"
            write_shard(str(out / name), flat[:n])
            entry["shards"].append({"file": name, "tokens": int(n)})
            entry["tokens"] += int(n)
            bufs[which] = [flat[n:]] if n < len(flat) else []
            size -= n
            n_written += 1
        return n_written

    nproc = num_proc or os.cpu_count() or 1
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    shards_now = 0
    with ctx.Pool(nproc, initializer=_pool_init, initargs=(tok.name,)) as pool:
        for si in range(pos["source"], len(specs)):
            src = _make_source(specs[si], data, split, 0, 1, None, 0, False)
            if pos["state"] is not None and pos["source"] == si:
                src.load(pos["state"])
            states: list[dict] = []

            def jobs(src=src, states=states, si=si):
                # Runs in the pool's feeder thread, in order: states[i] is the position after chunk i.
                while not src.exhausted:
                    units = src.take(DOCS_PER_CHUNK)
                    states.append(src.state())
                    yield _split_units(units, validation_split_percentage, specs[si].kind == "txt")

            for i, (t_arr, v_arr) in enumerate(pool.imap(_pool_encode, jobs(), chunksize=1)):
                bufs["train"].append(t_arr)
                bufs["validation"].append(v_arr)
                bar.update(len(t_arr) + len(v_arr))
                if write("train", False):
                    shards_now += 1
                    write("validation", False)
                    for which, b in bufs.items():  # tokens read past the position, kept for the resume
                        (np.concatenate(b) if b else np.empty(0, np.uint16)).astype("<u2").tofile(
                            out / f"resume_{which}.bin"
                        )
                    index["position"] = {"source": si, "state": states[i]}
                    _write_index(out, index)
                    if _stop_after_shards is not None and shards_now >= _stop_after_shards:
                        pool.terminate()  # a simulated interruption (tests)
                        bar.close()
                        return index
            pos = {"source": si + 1, "state": None}
    write("train", True)
    write("validation", True)
    bar.close()
    if index["splits"]["train"]["tokens"] == 0:
        raise ValueError(f"{datasets_} produced no training tokens; check the data and --text-column")
    index["complete"] = True
    index["position"] = None
    _write_index(out, index)
    for which in bufs:
        (out / f"resume_{which}.bin").unlink(missing_ok=True)
    return index
