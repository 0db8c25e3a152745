"""What verifying a checkpoint costs next to loading it, on the GPT-2 124M shape (docs/reliability.md).

    .venv/bin/python benchmarks/bench_checkpoint_verify.py            # 124M: ~1.5 GB checkpoint in /tmp
    .venv/bin/python benchmarks/bench_checkpoint_verify.py --quick    # a 2-layer model (smoke run)

It writes a resumable state the way the trainer does (Accelerate's ``save_state`` of GPT-2 124M and its AdamW moments,
single process, fp32), then times, best of ``--repeat`` runs with the files in the page cache (a relaunch on the
same node; a cold read from a network filesystem costs both the load and the hash the same extra read):

- ``load_state``: what resume does with the files;
- ``verify``: checkpoint.verify (sizes + xxh3-64 of every file), and the pickle check resume runs before loading;
- the same cold (pages evicted with ``posix_fadvise``): verification reads the files into the page cache, so the
  load that follows reads them from memory, and a relaunch pays only the hashing on top;
- the throughput of candidate hashes over the same bytes: xxh3-64 (the one used), zlib.crc32, blake2b, sha256.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def hash_blobs(blobs: list[bytes], make) -> None:
    for b in blobs:
        make().update(b)


class _Crc32:
    def __init__(self):
        self.v = 0

    def update(self, b: bytes) -> None:
        self.v = zlib.crc32(b, self.v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a 2-layer, 128-wide model instead of 124M")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    import torch
    import xxhash
    from accelerate import Accelerator

    from gpt2_accel import checkpoint as ckpt
    from gpt2_accel.configuration_gpt2_accel import GPT2AccelConfig
    from gpt2_accel.modeling_gpt2_accel import GPT2AccelForCausalLM

    shape = dict(n_layer=2, n_embd=128, n_head=2) if args.quick else dict(n_layer=12, n_embd=768, n_head=12)
    config = GPT2AccelConfig(vocab_size=50257, n_positions=1024, pad_vocab_size_multiple=64, **shape)
    torch.manual_seed(0)
    model = GPT2AccelForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=False)
    acc = Accelerator(cpu=True)
    model, opt = acc.prepare(model, opt)
    for p in model.parameters():  # one step fills AdamW's two moments, as in every real checkpoint
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()

    tmp = Path(tempfile.mkdtemp(prefix="bench-ckpt-"))
    try:
        c = tmp / "checkpoints" / "step_00000001"
        t0 = time.perf_counter()
        acc.save_state(str(c / "state"))
        save_s = time.perf_counter() - t0
        for rel in ckpt.REQUIRED:
            (c / rel).parent.mkdir(parents=True, exist_ok=True)
            (c / rel).write_text("{}")
        t0 = time.perf_counter()
        ckpt.write_manifest(c)
        manifest_s = time.perf_counter() - t0
        ckpt.write_json(c / ckpt.COMPLETE, {"step": 1})
        files = [p for p in c.rglob("*") if p.is_file()]
        size = sum(p.stat().st_size for p in files)
        ckpt.verify(c)  # warm the page cache before any timing

        load_s = best_of(lambda: acc.load_state(str(c / "state")), args.repeat)
        verify_s = best_of(lambda: ckpt.verify(c), args.repeat)

        def evict() -> (
            None
        ):  # drop the files' pages from the page cache: a relaunch on another node reads them cold
            for p in files:
                fd = os.open(p, os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)

        def cold(fn):
            evict()
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0

        cold_load_s = min(cold(lambda: acc.load_state(str(c / "state"))) for _ in range(args.repeat))
        cold_both_s = min(
            cold(lambda: (ckpt.verify(c), ckpt.check_pickles(c / "state"), acc.load_state(str(c / "state"))))
            for _ in range(args.repeat)
        )
        pickles_s = best_of(lambda: ckpt.check_pickles(c / "state"), args.repeat)
        hashes = {
            "xxh3_64 (used)": xxhash.xxh3_64,
            "zlib.crc32": _Crc32,
            "blake2b": hashlib.blake2b,
            "sha256": hashlib.sha256,
        }
        blobs = [p.read_bytes() for p in files]  # hash speed alone, from memory (no I/O in the figure)
        rates = {
            name: size / best_of(lambda m=make: hash_blobs(blobs, m), args.repeat)
            for name, make in hashes.items()
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(
        f"model: {n_params / 1e6:.1f}M parameters ({shape}); checkpoint state {size / 1e9:.2f} GB in {len(files)} files"
    )
    print(f"save_state            {save_s:8.2f} s")
    print(f"write_manifest        {manifest_s:8.2f} s  ({manifest_s / save_s:.0%} of the save)")
    print(f"load_state            {load_s:8.2f} s  (best of {args.repeat}, warm page cache)")
    print(f"verify (xxh3_64)      {verify_s:8.2f} s  ({verify_s / load_s:.0%} of the load)")
    print(f"check_pickles         {pickles_s:8.3f} s  ({pickles_s / load_s:.1%} of the load)")
    print(f"cold load_state       {cold_load_s:8.2f} s  (pages evicted with posix_fadvise first)")
    print(
        f"cold verify+load      {cold_both_s:8.2f} s  ({cold_both_s / cold_load_s:.2f}x the cold load: what a relaunch pays)"
    )
    for name, rate in rates.items():
        print(f"hash {name:<16} {rate / 1e9:8.2f} GB/s  (from memory)")


if __name__ == "__main__":
    main()
