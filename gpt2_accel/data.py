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

from __future__ import annotations

import atexit
import contextlib
import glob as globlib
import hashlib
import itertools
import json
import os
import re
import sys
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import atomic_write_bytes, atomic_write_text
from .recipe import DataArguments
from .tokenization import Tokenizer, get_tokenizer

ASSETS_DATA = Path(__file__).parent / "assets" / "data"
BUNDLED = {"shakespeare": ASSETS_DATA / "shakespeare.txt"}
LLMC_MAGIC = 20240520  # llm.c's token shard header: 256 int32, [magic, version, n_tokens, ...] (dev/data/data_common.py)
LLMC_HEADER_INTS = 256
INDEX_FILE = "index.json"
INDEX_FORMAT = "gpt2_accel.tokens.v1"
TEXT_EXTS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".arrow": "arrow"}
DOCS_PER_CHUNK = 256  # documents tokenized together: enough for tiktoken's threads, small enough to stay lazy
_PARA_END = re.compile(rb"\n\n+")  # a paragraph ends after a run of >= 2 newlines (kept with it)


# ---------------------------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------------------------
def check_block_size(block_size: int, n_positions: int) -> None:
    """Raise if the training window does not fit the model's context."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if block_size > n_positions:
        raise ValueError(
            f"block_size={block_size} is longer than the model's context n_positions={n_positions}; "
            "lower block_size (or leave it null to use n_positions)"
        )


def check_uint16(tokenizer: Tokenizer) -> None:
    """Token shards store uint16: the vocabulary (and eot id) must be < 65536."""
    if tokenizer.vocab_size > 65536 or tokenizer.eot_token_id >= 65536:
        raise ValueError(
            f"tokenizer {tokenizer.name!r} has vocab_size={tokenizer.vocab_size}, which does not fit the uint16 "
            "token shards of `gpt2-accel prepare`; train from the text source with streaming instead "
            "(dataset_name=<the text>, no prepare step) or use a tokenizer with <= 65536 tokens"
        )


def _holdout_key(text: str) -> float:
    """A document's place in [0, 100): held out for validation iff below validation_split_percentage.

    A hash of the text (not its position) so the split is the same for every world size, order and shard layout,
    and duplicated documents always land on the same side.
    """
    h = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 * 100.0


# ---------------------------------------------------------------------------------------------------------------
# resolving dataset_name into a source
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class SourceSpec:
    name: str  # what the user wrote
    kind: str  # "txt", "hf" (datasets: Hub or local builder), "tokens"
    files: list[str] = field(
        default_factory=list
    )  # txt files, data files of a local builder, or train token files
    builder: str | None = None  # datasets builder/path for "hf"
    config: str | None = None
    val_files: list[str] = field(default_factory=list)  # tokens: validation token files
    token_meta: dict | None = None  # tokens: the prepare index (tokenizer, vocab) when known


def _looks_local(name: str) -> bool:
    return (
        name.startswith((".", "/", "~"))
        or any(ch in name for ch in "*?[")
        or Path(name).suffix.lower() in {*TEXT_EXTS, ".bin", ".jsonl", ".gz"}
        or os.sep + os.sep in name
    )


def _is_llmc(path: str) -> bool:
    with open(path, "rb") as f:
        head = np.frombuffer(f.read(12), dtype="<i4")
    return len(head) == 3 and int(head[0]) == LLMC_MAGIC


def _token_spec(name: str, files: list[str]) -> SourceSpec:
    """nanoGPT train.bin (raw uint16) or llm.c shards given as files; validation files found beside them."""
    train, val = [], []
    for f in sorted(files):
        base = os.path.basename(f)
        if base == "val.bin" or "_val_" in base or base.startswith("val_"):
            val.append(f)
        else:
            train.append(f)
    if not train:
        raise FileNotFoundError(
            f"dataset_name={name!r} matches only validation .bin files: {val}; add train ones"
        )
    if not val:  # train.bin -> val.bin beside it; fineweb_train_000001.bin -> fineweb_val_*.bin
        for f in train:
            d, base = os.path.dirname(f), os.path.basename(f)
            cands = [os.path.join(d, "val.bin")] if base == "train.bin" else []
            if "train" in base:
                cands += sorted(globlib.glob(os.path.join(d, base.split("train")[0] + "val*.bin")))
            val += [c for c in cands if os.path.exists(c) and c not in val]
    return SourceSpec(name, "tokens", files=train, val_files=sorted(val))


def resolve_source(name: str, config: str | None = None) -> SourceSpec:
    """Turn one ``dataset_name`` entry into a :class:`SourceSpec`, raising a clear error for missing files."""
    if name.startswith("bundled:"):
        key = name.split(":", 1)[1]
        if key not in BUNDLED:
            raise ValueError(f"dataset_name={name!r}: unknown bundled dataset; available: {sorted(BUNDLED)}")
        return SourceSpec(name, "txt", files=[str(BUNDLED[key])])
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, INDEX_FILE)):
            return _prepared_spec(name, path)
        files = sorted(
            p for p in globlib.glob(os.path.join(path, "**", "*"), recursive=True) if os.path.isfile(p)
        )
        bins = [f for f in files if f.endswith(".bin")]
        if bins:
            return _token_spec(name, bins)
        data = [f for f in files if Path(f).suffix.lower() in TEXT_EXTS]
        if not data:
            raise FileNotFoundError(
                f"dataset_name={name!r} is a directory without data files ({', '.join(sorted(TEXT_EXTS))}, .bin) "
                f"or {INDEX_FILE}; point it at the files or run `gpt2-accel prepare` into it"
            )
        return _file_spec(name, data)
    if _looks_local(name) or os.path.exists(path):
        files = sorted(globlib.glob(path, recursive=True)) if any(c in path for c in "*?[") else [path]
        files = [f for f in files if os.path.isfile(f)]
        if not files:
            raise FileNotFoundError(
                f"dataset_name={name!r}: no such file (or the glob matches nothing); check the path, or use a Hub id "
                "such as 'HuggingFaceFW/fineweb-edu' or 'bundled:shakespeare'"
            )
        if all(f.endswith(".bin") for f in files):
            return _token_spec(name, files)
        return _file_spec(name, files)
    return SourceSpec(name, "hf", builder=name, config=config)  # a Hub dataset id


def _file_spec(name: str, files: list[str]) -> SourceSpec:
    kinds = {TEXT_EXTS.get(Path(f).suffix.lower()) for f in files}
    if None in kinds:
        bad = [f for f in files if Path(f).suffix.lower() not in TEXT_EXTS][:3]
        raise ValueError(
            f"dataset_name={name!r}: unsupported file type {bad}; use {', '.join(sorted(TEXT_EXTS))} files, "
            "nanoGPT/llm.c .bin token files or a `gpt2-accel prepare` directory"
        )
    if len(kinds) > 1:
        raise ValueError(
            f"dataset_name={name!r} mixes file types {sorted(kinds)}; give each type as its own dataset_name entry "
            "(a list makes a mixture)"
        )
    kind = kinds.pop()
    if kind == "text":
        return SourceSpec(name, "txt", files=files)
    return SourceSpec(name, "hf", files=files, builder=kind)


def _prepared_spec(name: str, path: str) -> SourceSpec:
    with open(os.path.join(path, INDEX_FILE), encoding="utf-8") as f:
        index = json.load(f)
    if not index.get("complete"):
        raise ValueError(
            f"dataset_name={name!r} was not completely prepared (its {INDEX_FILE} says complete=false); "
            "re-run the same `gpt2-accel prepare` command to finish it"
        )
    splits = index["splits"]
    files = [os.path.join(path, s["file"]) for s in splits["train"]["shards"]]
    val = [os.path.join(path, s["file"]) for s in splits.get("validation", {}).get("shards", [])]
    return SourceSpec(name, "tokens", files=files, val_files=val, token_meta=index)


def _names(data: DataArguments) -> list[str]:
    return list(data.dataset_name) if isinstance(data.dataset_name, list) else [data.dataset_name]


def _weights(data: DataArguments, n: int) -> np.ndarray:
    w = np.asarray(data.dataset_weights if data.dataset_weights else [1.0] * n, dtype=np.float64)
    if len(w) != n or (w <= 0).any():
        raise ValueError(
            f"dataset_weights={data.dataset_weights} must be {n} positive numbers, one per dataset_name"
        )
    return w / w.sum()


# ---------------------------------------------------------------------------------------------------------------
# text sources: documents (units) in order, with an exact, JSON-serialisable position
# ---------------------------------------------------------------------------------------------------------------
def _open_hf(spec: SourceSpec, split: str, streaming: bool):
    """``datasets.load_dataset`` for a Hub id or a local builder, with errors that say what to do."""
    import datasets

    kwargs: dict[str, Any] = {"split": split, "streaming": streaming}
    try:
        if spec.files:
            if split != "train":
                raise ValueError(
                    f"dataset_name={spec.name!r} is local files, which only have a 'train' split, not {split!r}; "
                    "use validation_split_percentage or validation_dataset_name instead of validation_split"
                )
            kwargs["split"] = "train"
            ds = datasets.load_dataset(spec.builder, data_files=spec.files, **kwargs)
        else:
            ds = datasets.load_dataset(spec.builder, spec.config, **kwargs)
    except (FileNotFoundError, ConnectionError, OSError) as e:
        raise FileNotFoundError(
            f"dataset_name={spec.name!r} could not be loaded from the Hugging Face Hub or disk "
            f"({e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}). Check the id and "
            "dataset_config_name, your network/HF_TOKEN, or point dataset_name at local files"
        ) from e
    except StopIteration as e:  # datasets' json builder on an empty file
        raise ValueError(f"dataset_name={spec.name!r} is empty; give it documents") from e
    except ValueError as e:
        if "split" in str(e).lower() or "config" in str(e).lower():
            raise ValueError(
                f"dataset_name={spec.name!r} (config {spec.config!r}): {e}. Set dataset_config_name/train_split/"
                "validation_split to ones the dataset has"
            ) from e
        raise
    if not streaming:
        ds = ds.to_iterable_dataset()
    return ds


def _check_column(ds, spec: SourceSpec, column: str) -> None:
    feats = ds.features
    if feats is None:  # not resolved yet (some streamed Hub datasets): peek at one example
        first = next(iter(ds), None)
        if first is None:
            raise ValueError(f"dataset_name={spec.name!r} is empty; point it at data with documents")
        cols = list(first)
        ok = column in first and isinstance(first[column], str)
    else:
        cols = list(feats)
        f = feats.get(column)
        ok = f is not None and getattr(f, "dtype", None) in ("string", "large_string")
    if column not in cols:
        raise ValueError(
            f"text_column={column!r} is not a column of dataset_name={spec.name!r}; its columns are {cols}. "
            "Set text_column to the one holding the text"
        )
    if not ok:
        raise ValueError(
            f"text_column={column!r} of dataset_name={spec.name!r} is not text ({feats[column] if feats else '?'}); "
            f"its columns are {cols}. Set text_column to a string column"
        )


class _Source:
    """Documents of one source for one rank: ``take(n)`` -> n (text, eot_after) units; ``state()`` / ``load()``.

    ``holdout`` selects documents by :func:`_holdout_key`: ("train", p) drops the held-out p percent, ("val", p)
    keeps only them, None keeps all. ``wrap`` restarts at the end (counting epochs); otherwise ``take`` returns
    fewer units once the source is exhausted.
    """

    def __init__(
        self, spec, data: DataArguments, split: str, rank: int, world: int, holdout, seed: int, wrap: bool
    ):
        self.spec, self.data, self.split = spec, data, split
        self.rank, self.world, self.holdout, self.seed, self.wrap = rank, world, holdout, seed, wrap
        self.epoch = 0
        self.exhausted = False
        self._kept_in_epoch = 0

    def _keep(self, text: str) -> bool:
        if self.holdout is None:
            return True
        role, pct = self.holdout
        held = pct > 0 and _holdout_key(text) < pct
        return held if role == "val" else not held

    def take(self, n: int) -> list[tuple[str, bool]]:
        out: list[tuple[str, bool]] = []
        while len(out) < n and not self.exhausted:
            got = self._read(n - len(out))
            if got is None:  # end of the data
                if self._kept_in_epoch == 0 and self.wrap:  # training would loop forever on nothing
                    what = "" if self.holdout is None else f" after the {self.holdout[0]} hold-out"
                    raise ValueError(
                        f"dataset_name={self.spec.name!r} (split {self.split!r}, rank {self.rank} of {self.world}) "
                        f"has no documents{what}; give it data, fewer processes, or change "
                        "validation_split_percentage"
                    )
                if not self.wrap:
                    self.exhausted = True
                    break
                self.epoch += 1
                self._kept_in_epoch = 0
                self._restart()
                continue
            self._kept_in_epoch += sum(1 for t, _ in got if t)
            out.extend(got)
        return out

    def _read(self, n: int):  # -> list of units (possibly empty) or None at the end
        raise NotImplementedError

    def _restart(self) -> None:
        raise NotImplementedError


class _TextFileSource(_Source):
    """Plain text: a document is a whole file (``<|endoftext|>`` after its last paragraph only). The file is read in
    paragraphs (blank-line separated blocks, newlines kept), the unit of rank splitting, hold-out and resume:
    paragraph ``i`` (counted over all files) goes to rank ``i % world_size``."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.pos = {"file": 0, "offset": 0, "index": 0}
        self._gen = None

    def state(self) -> dict:
        return {"epoch": self.epoch, "kept": self._kept_in_epoch, "exhausted": self.exhausted, **self.pos}

    def load(self, st: dict) -> None:
        self.epoch, self._kept_in_epoch, self.exhausted = st["epoch"], st["kept"], st["exhausted"]
        self.pos = {"file": st["file"], "offset": st["offset"], "index": st["index"]}
        self._gen = None

    def _restart(self) -> None:
        self.pos = {"file": 0, "offset": 0, "index": 0}
        self._gen = None

    def _paragraphs(self):
        """Yield (text, eot_after, position after it) from self.pos on."""
        fi, offset, index = self.pos["file"], self.pos["offset"], self.pos["index"]
        while fi < len(self.spec.files):
            with open(self.spec.files[fi], "rb") as f:
                f.seek(offset)
                buf, base, pending = b"", offset, None
                while True:
                    block = f.read(1 << 20)
                    buf += block
                    start = 0
                    for m in _PARA_END.finditer(buf):
                        if m.end() == len(buf) and block:
                            break  # the newline run may go on in the next block
                        if pending is not None:
                            yield pending[0], False, pending[1]
                        index += 1
                        pending = (
                            buf[start : m.end()],
                            {"file": fi, "offset": base + m.end(), "index": index},
                        )
                        start = m.end()
                    buf, base = buf[start:], base + start
                    if not block:
                        break
                if buf.strip():
                    if pending is not None:
                        yield pending[0], False, pending[1]
                    index += 1
                    pending = (buf, {"file": fi + 1, "offset": 0, "index": index})
                if pending is not None:
                    yield pending[0], True, {"file": fi + 1, "offset": 0, "index": pending[1]["index"]}
            fi, offset = fi + 1, 0

    def _read(self, n: int):
        if self._gen is None:
            self._gen = self._paragraphs()
        out, any_read = [], False
        for raw, eot, pos in self._gen:
            any_read = True
            mine = (pos["index"] - 1) % self.world == self.rank
            self.pos = pos
            text = raw.decode("utf-8", errors="replace") if mine else ""
            if mine and self._keep(text):
                out.append((text, eot))
            elif eot:
                out.append(("", True))  # every rank ends the document, even without its last paragraph
            if len(out) >= n:
                return out
        self._gen = None
        return out if any_read else None


class _HFSource(_Source):
    """A ``datasets`` IterableDataset (Hub or local json/parquet/arrow): one row = one document.

    The position is the dataset's own ``state_dict()`` taken before the current Arrow batch, plus how many of that
    batch's kept documents were consumed (datasets restores the shard and row exactly)."""

    BATCH = 512

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.ds_state = None  # datasets state before self.buf was read
        self.used = 0
        self.buf: list[str] = []
        self._ended = False
        self._ds = None
        self._it = None

    def open(self):
        from datasets.distributed import split_dataset_by_node

        ds = _open_hf(self.spec, self.split, self.data.streaming)
        _check_column(ds, self.spec, self.data.text_column)
        ds = ds.select_columns([self.data.text_column])
        if self.world > 1:
            ds = split_dataset_by_node(ds, rank=self.rank, world_size=self.world)
        if self.data.shuffle_buffer_size > 0:  # the buffer's contents are not saved: resume is approximate
            ds = ds.shuffle(seed=self.seed, buffer_size=self.data.shuffle_buffer_size)
        return ds.with_format("arrow")

    def state(self) -> dict:
        return {"epoch": self.epoch, "kept": self._kept_in_epoch, "exhausted": self.exhausted, "ds": self.ds_state,
                "used": self.used, "ended": self._ended}  # fmt: skip

    def load(self, st: dict) -> None:
        self.epoch, self._kept_in_epoch, self.exhausted = st["epoch"], st["kept"], st["exhausted"]
        self.ds_state, self.used, self._ended = st["ds"], st["used"], st["ended"]
        self._it, self.buf = None, []
        self._pending_skip = st["used"]

    def _restart(self) -> None:
        self.ds_state, self.used, self._it, self.buf, self._ended = None, 0, None, [], False
        self._pending_skip = 0

    def _start(self) -> None:
        # A fresh IterableDataset per pass: datasets keeps a loaded state as its starting point for every iter().
        self._ds = self.open()
        self._ds.set_epoch(self.epoch)
        if self.ds_state is not None:
            self._ds.load_state_dict(self.ds_state)
        self._it = self._ds.iter(batch_size=self.BATCH)
        # Keep the loaded state for this first batch: before the first next() datasets still reports its
        # initial state (the live one is attached lazily when iteration starts).
        self._fill(first=True)
        skip = getattr(self, "_pending_skip", 0)
        self.used = min(skip, len(self.buf))
        self._pending_skip = 0

    def _fill(self, first: bool = False) -> bool:
        if not first:
            self.ds_state = self._ds.state_dict()
        table = next(self._it, None)
        if table is None:
            self.buf, self.used = [], 0
            return False
        texts = table.column(self.data.text_column).to_pylist()
        self.buf = [t for t in texts if t and self._keep(t)]
        self.used = 0
        return True

    def _read(self, n: int):
        if self._ended:  # the previous call returned the last documents: report the end now
            self._ended = False
            return None
        if self._it is None:
            self._start()
        out: list[tuple[str, bool]] = []
        while len(out) < n:
            if self.used >= len(self.buf) and not self._fill():
                self._it, self.ds_state, self.used = None, None, 0
                self._ended = bool(out)
                return out or None
            take = self.buf[self.used : self.used + n - len(out)]
            self.used += len(take)
            out.extend((t, True) for t in take)
        return out


def _make_source(spec, data, split, rank, world, holdout, seed, wrap) -> _Source:
    if spec.kind == "txt" and split != "train":
        raise ValueError(
            f"dataset_name={spec.name!r} is plain text, which has only a 'train' split, not {split!r}; use "
            "validation_split_percentage or validation_dataset_name instead of validation_split/train_split"
        )
    cls = _TextFileSource if spec.kind == "txt" else _HFSource
    src = cls(spec, data, split, rank, world, holdout, seed, wrap)
    return src


class _Mixture:
    """Documents drawn from several sources with given weights, by a seeded RNG whose state is saved."""

    def __init__(self, sources: list[_Source], weights: np.ndarray, seed: int):
        self.sources, self.weights = sources, weights
        self.rng = np.random.default_rng(seed)

    def state(self) -> dict:
        return {"sources": [s.state() for s in self.sources], "rng": self.rng.bit_generator.state}

    def load(self, st: dict) -> None:
        for s, ss in zip(self.sources, st["sources"], strict=True):
            s.load(ss)
        self.rng.bit_generator.state = st["rng"]

    def take(self, n: int) -> list[tuple[str, bool]]:
        if len(self.sources) == 1:
            return self.sources[0].take(n)
        out: list[tuple[str, bool]] = []
        while len(out) < n:
            live = [i for i, s in enumerate(self.sources) if not s.exhausted]
            if not live:
                break
            w = self.weights[live] / self.weights[live].sum()
            picks = self.rng.choice(len(live), size=n - len(out), p=w)
            counts = np.bincount(picks, minlength=len(live))
            got = [iter(self.sources[live[j]].take(int(c))) for j, c in enumerate(counts)]
            out.extend(u for u in (next(got[j], None) for j in picks) if u is not None)
            if all(self.sources[i].exhausted for i in live) or (
                len(live) == 1 and self.sources[live[0]].exhausted
            ):
                break
        return out


# ---------------------------------------------------------------------------------------------------------------
# packing
# ---------------------------------------------------------------------------------------------------------------
def _tokenize_units(tokenizer: Tokenizer, units: list[tuple[str, bool]]) -> np.ndarray:
    """Concatenate the units' tokens, ``<|endoftext|>`` after each unit that ends a document. (N,) int64."""
    texts = [t for t, _ in units]
    toks = tokenizer.encode_batch(texts) if texts else []
    eot = tokenizer.eot_token_id
    for ids, (_, end) in zip(toks, units):
        if end:
            ids.append(eot)  # fresh lists from the tokenizer: appending is cheaper than concatenating
    total = sum(len(t) for t in toks)
    return np.fromiter(itertools.chain.from_iterable(toks), dtype=np.int64, count=total)


def _windows(stream: np.ndarray, start: int, block_size: int) -> np.ndarray:
    """(n, block_size + 1) windows starting at start, start + block_size, ... (overlapping by one token)."""
    if len(stream) - start < block_size + 1:
        return np.empty((0, block_size + 1), dtype=np.int64)
    view = np.lib.stride_tricks.sliding_window_view(stream[start:], block_size + 1)
    return view[::block_size]


# ---------------------------------------------------------------------------------------------------------------
# the training streams: yield (batch, state after it)
# ---------------------------------------------------------------------------------------------------------------
class _TextStream(torch.utils.data.IterableDataset):
    """Packed windows of a (mixture of) text source(s) for one rank. Yields ((B, T+1) int64, state after it)."""

    def __init__(self, specs, weights, data, tokenizer, block_size, batch_size, rank, world, seed, state):
        super().__init__()
        self.specs, self.weights, self.data, self.tok = specs, weights, data, tokenizer
        self.T, self.B, self.seed, self.state = block_size, batch_size, seed, state
        self.rank, self.world = rank, world

    def _mixture(self) -> _Mixture:
        holdout = None
        if self.data.validation_dataset_name is None and self.data.validation_split is None:
            holdout = ("train", self.data.validation_split_percentage)
        srcs = [
            _make_source(s, self.data, self.data.train_split, self.rank, self.world, holdout, self.seed, True)
            for s in self.specs
        ]
        return _Mixture(srcs, self.weights, self.seed)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, dict]]:
        mix = self._mixture()
        st = self.state
        if st is not None:
            mix.load(st["chunk"])
            carry = np.asarray(st["carry"], dtype=np.int64)
            pos, batches = st["offset"], st["batches"]
        else:
            carry, pos, batches = np.empty(0, dtype=np.int64), 0, 0
        pending: list[np.ndarray] = []
        n_pending = 0
        while True:
            chunk_state, carry0 = mix.state(), carry
            units = mix.take(DOCS_PER_CHUNK)
            stream = np.concatenate([carry0, _tokenize_units(self.tok, units)])
            wins = _windows(stream, pos, self.T)
            i = 0
            while i < len(wins):
                take = min(self.B - n_pending, len(wins) - i)
                pending.append(wins[i : i + take])
                n_pending += take
                i += take
                if n_pending == self.B:
                    batches += 1
                    state = {
                        "kind": "stream",
                        "chunk": chunk_state,
                        "carry": carry0.tolist(),
                        "offset": pos + i * self.T,
                        "batches": batches,
                        "rank": self.rank,
                        "world_size": self.world,
                        "sources": [s.name for s in self.specs],
                        "block_size": self.T,
                        "epoch": max(s["epoch"] for s in chunk_state["sources"]),
                    }
                    yield torch.from_numpy(np.concatenate(pending)), state
                    pending, n_pending = [], 0
            pos = pos + len(wins) * self.T
            carry, pos = stream[pos:], 0


class _TokenStream(torch.utils.data.IterableDataset):
    """Windows of memory-mapped token files in a seeded order that depends only on the seed and the sample index.

    Global sample ``k`` is window ``perm_e[k % W]`` of epoch ``e = k // W`` (``perm_e`` a permutation seeded by
    (seed, e)). Micro-batch ``m`` covers samples ``[m*M, (m+1)*M)`` with ``M = batch_size * world_size``; rank ``r``
    takes ``[m*M + r*batch_size, ... + batch_size)``. A global batch (grad_accum micro-batches) is therefore the same
    set of windows for any split of it into processes, and ``next_sample`` is all a resume needs.
    """

    def __init__(self, files, block_size, batch_size, rank, world, seed, next_sample):
        super().__init__()
        self.files, self.T, self.B, self.rank, self.world = files, block_size, batch_size, rank, world
        self.seed, self.next_sample = seed, next_sample
        self.counts = np.array([max((_num_tokens(f) - 1) // block_size, 0) for f in files], dtype=np.int64)
        self.cum = np.concatenate([[0], np.cumsum(self.counts)])
        self.W = int(self.cum[-1])

    def window(self, w: int, maps: dict) -> np.ndarray:
        s = int(np.searchsorted(self.cum, w, side="right") - 1)
        k = w - int(self.cum[s])
        if s not in maps:
            maps[s] = _memmap_tokens(self.files[s])
        return np.asarray(maps[s][k * self.T : k * self.T + self.T + 1], dtype=np.int64)

    def perm(self, epoch: int) -> np.ndarray:
        dtype = np.int32 if self.W < 2**31 else np.int64
        return np.random.default_rng([self.seed, epoch]).permutation(self.W).astype(dtype)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, dict]]:
        maps: dict = {}
        M = self.B * self.world
        k = self.next_sample
        cached = (-1, None)
        while True:
            rows = []
            for j in range(k + self.rank * self.B, k + (self.rank + 1) * self.B):
                e = j // self.W
                if cached[0] != e:
                    cached = (e, self.perm(e))
                rows.append(self.window(int(cached[1][j % self.W]), maps))
            k += M
            state = {"kind": "tokens", "next_sample": k, "num_windows": self.W, "block_size": self.T,
                     "epoch": k // self.W, "world_size": self.world, "micro_batch": M}  # fmt: skip
            yield torch.from_numpy(np.stack(rows)), state


def _num_tokens(path: str) -> int:
    if _is_llmc(path):
        with open(path, "rb") as f:
            header = np.frombuffer(f.read(LLMC_HEADER_INTS * 4), dtype="<i4")
        return int(header[2])
    return os.path.getsize(path) // 2


def _memmap_tokens(path: str) -> np.ndarray:
    """A uint16 view of a token file: llm.c shard (1024-byte header) or raw nanoGPT .bin."""
    if _is_llmc(path):
        n = _num_tokens(path)
        return np.memmap(path, dtype="<u2", mode="r", offset=LLMC_HEADER_INTS * 4, shape=(n,))
    return np.memmap(path, dtype="<u2", mode="r")


# ---------------------------------------------------------------------------------------------------------------
# the public loader
# ---------------------------------------------------------------------------------------------------------------
def _ignore_stop_signals(worker_id: int) -> None:
    """Preemption (SIGTERM/SIGINT to the whole process group) is the training process's to handle: it finishes the
    step and checkpoints. A worker killed by the same signal would crash the run before it could save.

    Such a worker also ignores the SIGTERM that multiprocessing's exit handler sends before it joins its daemonic
    children, so the process would hang at exit: :meth:`TrainLoader.close` (and :func:`_close_all_at_exit`) stop the
    workers through their queue first and SIGKILL any that did not leave (issue 15)."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _as_is(x):
    return x


# Loaders with live workers, closed at interpreter exit before multiprocessing's own exit handler runs: atexit
# handlers run last-registered first, and this one is registered after torch/multiprocessing import theirs. torch's
# own clean-up is a no-op by then (it checks its python_exit_status flag), which is how a run could print 100% and
# never exit.
_OPEN_LOADERS: weakref.WeakSet = weakref.WeakSet()
_WORKER_EXIT_S = 5.0  # a worker that has not left after this long is killed


def _close_all_at_exit() -> None:
    for loader in list(_OPEN_LOADERS):
        loader.close()


class TrainLoader:
    """Infinite iterator of (batch_size, block_size + 1) int64 CPU batches with an exact, per-rank state."""

    def __init__(self, make_stream, data: DataArguments, kind: str, meta: dict):
        self._make_stream = make_stream
        self.data, self.kind, self.meta = data, kind, meta
        self._state: dict | None = None
        self._started = False
        self.epoch = 0
        self._workers_iter = None  # the DataLoader iterator that owns the background worker, if any

    def __iter__(self) -> Iterator[torch.Tensor]:
        self._started = True
        stream = self._make_stream(self._state)
        workers = min(self.data.dataloader_num_workers, 1)
        if workers == 0:
            it = iter(stream)
        else:
            # One background process per rank keeps a single ordered stream (so the order and the state do not
            # depend on the worker count); tiktoken / tokenizers use several threads inside it.
            it = iter(
                torch.utils.data.DataLoader(
                    stream,
                    batch_size=None,
                    num_workers=workers,
                    prefetch_factor=4,
                    collate_fn=_as_is,  # the default would walk every int of the state dict
                    worker_init_fn=_ignore_stop_signals,
                )
            )
            self._workers_iter = it
            if not _OPEN_LOADERS:
                atexit.register(_close_all_at_exit)  # once per process: registered late, so it runs early
            _OPEN_LOADERS.add(self)
        for batch, state in it:
            # The state travels WITH its batch, so prefetched batches never advance the saved position.
            self._state = state
            self.epoch = state["epoch"]
            yield batch

    def close(self) -> None:
        """Stop the background worker now and wait for it (at most a few seconds; then SIGKILL). Idempotent.

        Uses the DataLoader iterator's own shutdown (a sentinel on the index queue), then kills what is left:
        ``terminate()`` sends SIGTERM, which our workers ignore (see :func:`_ignore_stop_signals`)."""
        it, self._workers_iter = self._workers_iter, None
        _OPEN_LOADERS.discard(self)
        if it is None:
            return
        workers = list(getattr(it, "_workers", []))
        with contextlib.suppress(Exception):
            it._shutdown_workers()  # private, but the only way to stop workers without dropping every reference
        for w in workers:
            w.join(timeout=_WORKER_EXIT_S)
            if w.is_alive():
                w.kill()
                w.join(timeout=_WORKER_EXIT_S)

    def state_dict(self) -> dict:
        """This rank's position after the batches consumed so far (JSON-serialisable)."""
        if self._state is None:
            return {"kind": self.kind, "start": True, **self.meta}
        return {**self._state, **self.meta}

    def load_state_dict(self, states: list[dict]) -> None:
        """Restore from the list of ALL ranks' states saved by the run (index = rank). Call before iterating."""
        if self._started:
            raise RuntimeError("load_state_dict must be called before iterating the TrainLoader")
        if not isinstance(states, list) or not states:
            raise ValueError("load_state_dict expects the list of every rank's state_dict() (index = rank)")
        if any(s.get("start") for s in states):
            if not all(s.get("start") for s in states):
                raise ValueError(
                    "data states mix started and unstarted ranks; the checkpoint is inconsistent"
                )
            self._state = None
            return
        kinds = {s["kind"] for s in states}
        if kinds != {self.kind}:
            raise ValueError(
                f"the checkpoint's data position is for a {sorted(kinds)} source but this run reads {self.kind!r} "
                "data; resume with the same dataset_name (or start a new run)"
            )
        if self.kind == "tokens":
            self._load_tokens(states)
        else:
            self._load_stream(states)

    def _load_tokens(self, states: list[dict]) -> None:
        nxt = {s["next_sample"] for s in states}
        if len(nxt) != 1:
            raise ValueError(
                f"ranks saved different data positions {sorted(nxt)}; the checkpoint is inconsistent"
            )
        (k,) = nxt
        if (
            states[0]["num_windows"] != self.meta["num_windows"]
            or states[0]["block_size"] != self.meta["block_size"]
        ):
            raise ValueError(
                f"the token files or block_size changed since the checkpoint (windows {states[0]['num_windows']} -> "
                f"{self.meta['num_windows']}, block_size {states[0]['block_size']} -> {self.meta['block_size']}); "
                "resume with the same data and block_size"
            )
        if k % self.meta["micro_batch"]:
            raise ValueError(
                f"the checkpoint stopped at sample {k}, which is not a multiple of this run's micro-batch "
                f"(batch_size * world_size = {self.meta['micro_batch']}); keep the global batch "
                "(batch_size * world_size * gradient_accumulation_steps) equal to the original run's"
            )
        self._state = dict(states[0], next_sample=k)

    def _load_stream(self, states: list[dict]) -> None:
        world, rank = self.meta["world_size"], self.meta["rank"]
        if len(states) != world or states[0]["world_size"] != world:
            raise ValueError(
                f"the streamed data position was saved by {states[0]['world_size']} process(es) but this run has "
                f"{world}: each rank streams its own part of the data, so it can only resume with the same number of "
                "processes. Relaunch with that many, or pre-tokenize with `gpt2-accel prepare` (token shards resume "
                "exactly at any world size)"
            )
        st = states[rank]
        if st["sources"] != self.meta["sources"] or st["block_size"] != self.meta["block_size"]:
            raise ValueError(
                f"dataset_name/block_size changed since the checkpoint ({st['sources']}, {st['block_size']} -> "
                f"{self.meta['sources']}, {self.meta['block_size']}); resume with the same data settings"
            )
        self._state = st


def _split_specs(data: DataArguments) -> tuple[list[SourceSpec], np.ndarray]:
    names = _names(data)
    specs = [resolve_source(n, data.dataset_config_name) for n in names]
    weights = _weights(data, len(specs))
    if len(specs) > 1 and any(s.kind == "tokens" for s in specs):
        raise ValueError(
            f"dataset_name={names} mixes token files with other sources; a mixture must be text sources "
            "(prepare them together with `gpt2-accel prepare A B --output DIR` instead)"
        )
    return specs, weights


def _check_tokens_match(spec: SourceSpec, tokenizer: Tokenizer) -> None:
    meta = spec.token_meta
    if meta and (
        meta["vocab_size"] != tokenizer.vocab_size or meta["eot_token_id"] != tokenizer.eot_token_id
    ):
        raise ValueError(
            f"dataset_name={spec.name!r} was prepared with tokenizer {meta['tokenizer']!r} (vocab {meta['vocab_size']}) "
            f"but tokenizer_name={tokenizer.name!r} has vocab {tokenizer.vocab_size}; set tokenizer_name to "
            f"{meta['tokenizer']!r} or prepare the data again"
        )
    if not spec.token_meta and tokenizer.vocab_size > 65536:
        raise ValueError(f"dataset_name={spec.name!r} holds uint16 tokens but tokenizer_name={tokenizer.name!r} "
                         f"has {tokenizer.vocab_size} tokens; use the tokenizer the .bin files were made with")  # fmt: skip


def build_train_loader(
    data: DataArguments,
    tokenizer: Tokenizer,
    *,
    block_size: int,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    grad_accum: int = 1,
) -> TrainLoader:
    """The training batches of ``rank`` of ``world_size``; bad settings raise here, before training starts."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    if block_size < 1 or batch_size < 1:
        raise ValueError(f"block_size={block_size} and batch_size={batch_size} must be >= 1")
    specs, weights = _split_specs(data)
    if specs[0].kind == "tokens":
        spec = specs[0]
        _check_tokens_match(spec, tokenizer)
        probe = _TokenStream(spec.files, block_size, batch_size, rank, world_size, seed, 0)
        if probe.W == 0:
            raise ValueError(
                f"dataset_name={spec.name!r} has no window of block_size+1={block_size + 1} tokens; "
                "lower block_size or add data"
            )

        def make(state):
            nxt = 0 if state is None else state["next_sample"]
            return _TokenStream(spec.files, block_size, batch_size, rank, world_size, seed, nxt)

        meta = {"num_windows": probe.W, "block_size": block_size, "micro_batch": batch_size * world_size,
                "global_batch": batch_size * world_size * grad_accum}  # fmt: skip
        return TrainLoader(make, data, "tokens", meta)

    # Open every source now so missing files / columns / empty data fail before training.
    for s in specs:
        _validate_text_source(s, data, data.train_split)

    def make(state):
        return _TextStream(
            specs, weights, data, tokenizer, block_size, batch_size, rank, world_size, seed, state
        )

    meta = {
        "rank": rank,
        "world_size": world_size,
        "sources": [s.name for s in specs],
        "block_size": block_size,
    }
    return TrainLoader(make, data, "stream", meta)


def _validate_text_source(spec: SourceSpec, data: DataArguments, split: str) -> None:
    for f in spec.files:
        if not os.path.exists(f):
            raise FileNotFoundError(f"dataset_name={spec.name!r}: file {f!r} does not exist")
    if spec.files and not any(os.path.getsize(f) for f in spec.files):
        raise ValueError(f"dataset_name={spec.name!r} is empty (0 bytes); give it documents")
    if spec.kind == "txt":
        return
    src = _HFSource(spec, data, split, 0, 1, None, 0, False)
    ds = src.open()
    if next(iter(ds.iter(batch_size=1)), None) is None:
        raise ValueError(f"dataset_name={spec.name!r} (split {split!r}) is empty; give it documents")


# ---------------------------------------------------------------------------------------------------------------
# validation windows
# ---------------------------------------------------------------------------------------------------------------
def build_eval_windows(
    data: DataArguments,
    tokenizer: Tokenizer,
    *,
    block_size: int,
    max_samples: int,
    rank: int,
    world_size: int,
) -> torch.LongTensor:
    """This rank's share (window i -> rank i % world_size) of the first ``max_samples`` validation windows.

    The validation data is, in order of precedence: ``validation_dataset_name``; ``validation_split`` of the
    training source(s); the token files' validation files; the documents held out by ``validation_split_percentage``
    (a hash of each document, so identical across runs, orders and world sizes). Returns (n_r, block_size + 1);
    (0, block_size + 1) when validation_split_percentage is 0 and there is no other validation data.
    """
    empty = torch.empty((0, block_size + 1), dtype=torch.long)
    if data.validation_dataset_name is not None:
        specs, weights, split, holdout = [resolve_source(data.validation_dataset_name, data.dataset_config_name)], \
            np.ones(1), data.validation_split or data.train_split, None  # fmt: skip
        if specs[0].kind == "tokens" and specs[0].val_files:
            specs[0].files = specs[
                0
            ].val_files  # a prepared dir / .bin pair as validation: use its validation files
    else:
        specs, weights = _split_specs(data)
        split = data.validation_split or data.train_split
        holdout = None if data.validation_split else ("val", data.validation_split_percentage)
        if specs[0].kind == "tokens":
            if not specs[0].val_files:
                warnings.warn(f"dataset_name={specs[0].name!r} has no validation token files; no validation",
                              stacklevel=2)  # fmt: skip
                return empty
            specs[0].files = specs[0].val_files
    if specs[0].kind == "tokens":
        rows, need = [], max_samples
        for f in specs[0].files:
            head = _memmap_tokens(f)[
                : need * block_size + 1
            ]  # only what the windows need, not the whole file
            wins = _windows(np.asarray(head, dtype=np.int64), 0, block_size)
            rows.append(wins)
            need -= len(wins)
            if need <= 0:
                break
        allw = np.concatenate(rows) if rows else np.empty((0, block_size + 1), np.int64)
    else:
        if holdout is not None and holdout[1] <= 0:
            return empty
        srcs = [_make_source(s, data, split, 0, 1, holdout, 0, False) for s in specs]
        mix = _Mixture(srcs, weights, 0)
        stream, got = np.empty(0, dtype=np.int64), []
        n = 0
        while n < max_samples:
            units = mix.take(DOCS_PER_CHUNK)
            if not units:
                break
            stream = np.concatenate([stream, _tokenize_units(tokenizer, units)])
            wins = _windows(stream, 0, block_size)
            got.append(wins.copy())
            n += len(wins)
            stream = stream[len(wins) * block_size :]
        allw = np.concatenate(got)[:max_samples] if got else np.empty((0, block_size + 1), np.int64)
    if len(allw) == 0:
        raise ValueError(
            f"the validation data has no window of block_size+1={block_size + 1} tokens; lower block_size, raise "
            "validation_split_percentage or set validation_dataset_name"
        )
    return torch.from_numpy(np.ascontiguousarray(allw[rank::world_size]))


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


def __getattr__(name: str):
    # `from gpt2_accel.data import main` keeps working: the command moved to gpt2_accel/cli/prepare.py (issue 14).
    if name == "main":
        from .cli.prepare import main

        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":  # `python -m gpt2_accel.data`, as before
    from .cli.prepare import main

    raise SystemExit(main())
