"""Sources: resolve ``dataset_name`` into text files, a Hub dataset or token files, and read a text source's
documents in order, split by rank and held-out hash, with an exact, JSON-serialisable position."""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..recipe import DataArguments

ASSETS_DATA = Path(__file__).parent.parent / "assets" / "data"
BUNDLED = {"shakespeare": ASSETS_DATA / "shakespeare.txt"}
LLMC_MAGIC = 20240520  # llm.c's token shard header: 256 int32, [magic, version, n_tokens, ...] (dev/data/data_common.py)
LLMC_HEADER_INTS = 256
INDEX_FILE = "index.json"
INDEX_FORMAT = "gpt2_accel.tokens.v1"
TEXT_EXTS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".arrow": "arrow"}
DOCS_PER_CHUNK = 256  # documents tokenized together: enough for tiktoken's threads, small enough to stay lazy
_PARA_END = re.compile(rb"\n\n+")  # a paragraph ends after a run of >= 2 newlines (kept with it)


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
# token files (prepared shards, nanoGPT's .bin, llm.c's shards)
# ---------------------------------------------------------------------------------------------------------------
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
