"""The loader: the resumable training loader (background workers, rank split, saved state) and the validation
windows, built from a recipe's data section."""

from __future__ import annotations

import atexit
import contextlib
import warnings
import weakref
from collections.abc import Iterator

import numpy as np
import torch

from ..recipe import DataArguments
from ..tokenization import Tokenizer
from .sources import (
    DOCS_PER_CHUNK,
    SourceSpec,
    _make_source,
    _memmap_tokens,
    _Mixture,
    _names,
    _validate_text_source,
    _weights,
    resolve_source,
)
from .streaming import _TextStream, _tokenize_units, _TokenStream, _windows


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
