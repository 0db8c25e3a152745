"""DDP throughput on this machine: 2 processes (gloo, accelerate_configs/cpu.yaml) against 1 process.

    python benchmarks/bench_ddp.py                 # 4 layers x 128 wide, 128 context, 40 steps per run
    python benchmarks/bench_ddp.py --steps 20 --n_embd 64 --quick

Both runs train the same model on the same pre-tokenized data (the bundled Shakespeare as byte tokens) with the
same per-process batch, through the real entry point (`accelerate launch ... -m gpt2_accel.train`). Variants:
1 process with all cores as threads, 1 process with 1 thread (the per-core baseline), 2 processes with
cores / 2 threads each. Each runs ``--rounds`` times in a rotating order, so slow phases of a shared machine hit
all variants alike; the figure is the median over rounds of the median tokens/s the trainer logs (its own timing;
evaluation and checkpoints excluded) after a warm-up of 5 steps.
Weak scaling: the 2-process run processes twice the tokens per step. On CPU the all-reduce goes through gloo
(shared memory is not used), so expect well under 2x; on GPUs with NCCL, DDP overlaps it with backward.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(n: int, threads: int, data: Path, out: Path, args: argparse.Namespace) -> float:
    """Train with ``n`` processes of ``threads`` threads; returns the median tokens/s after warm-up."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_configs" / "cpu.yaml"),
           "--num_processes", str(n), "--main_process_port", str(_free_port()), "-m", "gpt2_accel.train",
           str(ROOT / "recipes" / "demo.yaml"), f"--dataset_name={data}", "--tokenizer_name=char",
           f"--n_layer={args.n_layer}", f"--n_head={args.n_head}", f"--n_embd={args.n_embd}",
           f"--n_positions={args.block_size}", f"--per_device_train_batch_size={args.batch_size}",
           f"--max_steps={args.steps}", "--logging_steps=1", "--eval_steps=0", "--save_steps=0",
           "--max_eval_samples=4", "--dataloader_num_workers=0", f"--output_dir={out}"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{n}-process run failed:\n{proc.stderr[-4000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median([r["tokens_per_sec"] for r in rows if "tokens_per_sec" in r][5:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=128)
    p.add_argument("--block_size", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=8, help="per process")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="2 layers x 64, 16 steps, 1 round: a smoke run")
    args = p.parse_args()
    if args.quick:
        args.n_layer, args.n_embd, args.n_head, args.steps, args.rounds = 2, 64, 2, 16, 1
    with tempfile.TemporaryDirectory() as tmp:
        text = (ROOT / "gpt2_accel" / "assets" / "data" / "shakespeare.txt").read_bytes()
        data = Path(tmp) / "train.bin"
        np.frombuffer(text, dtype=np.uint8).astype(np.uint16).tofile(data)
        print(f"model: {args.n_layer} layers x {args.n_embd} wide, context {args.block_size}, batch {args.batch_size} "
              f"per process, {args.steps} steps; {os.cpu_count()} CPU cores")  # fmt: skip
        cores = os.cpu_count() or 1
        variants = {  # name: (processes, threads per process)
            f"1 process x {cores} threads": (1, cores),
            "1 process x 1 thread": (1, 1),
            f"2 processes x {max(1, cores // 2)} threads": (2, max(1, cores // 2)),
        }
        names = list(variants)
        results: dict[str, list[float]] = {k: [] for k in names}
        for r in range(args.rounds):
            for k in names[r % len(names) :] + names[: r % len(names)]:  # rotate the order each round
                n, threads = variants[k]
                results[k].append(run(n, threads, data, Path(tmp) / f"{r}-{n}-{threads}", args))
    med = {k: statistics.median(v) for k, v in results.items()}
    two, one = med[names[2]], med[names[0]]
    for k in names:
        n = variants[k][0]
        tokens = n * args.batch_size * args.block_size
        print(f"{k:26s}: {med[k]:9,.0f} tokens/s ({tokens} tokens/step, {1000 * tokens / med[k]:.0f} ms/step), "
              f"rounds: {', '.join(f'{x:,.0f}' for x in results[k])}")  # fmt: skip
    print(f"2 processes vs 1 process on the same cores: {two / one:.2f}x; vs 1 process x 1 thread: "
          f"{two / med[names[1]]:.2f}x (ideal 2.00x)")  # fmt: skip


if __name__ == "__main__":
    main()
