"""Streaming: tokenize documents, pack them into ``block_size + 1`` windows, and yield training batches with
the exact state after each (text streams and memory-mapped token streams)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import torch

from ..tokenization import Tokenizer
from .sources import DOCS_PER_CHUNK, _make_source, _memmap_tokens, _Mixture, _num_tokens


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
