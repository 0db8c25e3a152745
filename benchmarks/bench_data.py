"""Data pipeline figures: streaming tokens/s, peak RSS vs dataset size, `prepare` and shard-reading throughput.

    .venv/bin/python benchmarks/bench_data.py            # full run (~1.25 GB of jsonl written to /tmp)
    .venv/bin/python benchmarks/bench_data.py --quick    # smoke run (a few MB)

The data are the bundled Shakespeare repeated into "web documents" of ~4 KB (several paragraphs each) as jsonl.
Every figure is measured on whatever CPU runs it; compare runs on the same machine only.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAKESPEARE = ROOT / "gpt2_accel" / "assets" / "data" / "shakespeare.txt"


def make_jsonl(path: Path, size_bytes: int, doc_chars: int = 4000) -> Path:
    """Write ~size_bytes of jsonl documents cut from Shakespeare (repeated), once per size."""
    if path.exists() and path.stat().st_size >= size_bytes:
        return path
    text = SHAKESPEARE.read_text()
    paras = text.split("\n\n")
    docs, cur = [], []
    for p in paras:
        cur.append(p)
        if sum(len(c) for c in cur) >= doc_chars:
            docs.append("\n\n".join(cur))
            cur = []
    lines = [json.dumps({"text": d, "source": "shakespeare"}) + "\n" for d in docs]
    block = "".join(lines).encode()
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        written = 0
        while written < size_bytes:
            f.write(block)
            written += len(block)
    tmp.replace(path)
    return path


def _peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM). Not ru_maxrss: Linux carries that over exec from the parent."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_tiktoken(texts: list[str]) -> float:
    """The tokenizer alone: the ceiling for the pipeline (tokens/s)."""
    from gpt2_accel.tokenization import get_tokenizer

    tok = get_tokenizer("gpt2")
    tok.encode_batch(texts[:16])
    t0 = time.perf_counter()
    n = sum(len(t) for t in tok.encode_batch(texts))
    return n / (time.perf_counter() - t0)


def bench_stream(path: Path, tokens: int, workers: int, block_size: int = 1024, batch_size: int = 16) -> dict:
    """Pull batches from the training loader as a trainer would; tokens/s of windows delivered."""
    from gpt2_accel.data import build_train_loader
    from gpt2_accel.recipe import DataArguments
    from gpt2_accel.tokenization import get_tokenizer

    tok = get_tokenizer("gpt2")
    args = DataArguments(dataset_name=str(path), dataloader_num_workers=workers)
    loader = build_train_loader(
        args, tok, block_size=block_size, batch_size=batch_size, rank=0, world_size=1, seed=0
    )
    it = iter(loader)
    next(it)  # start-up (worker fork, dataset open) is not throughput
    t0 = time.perf_counter()
    n = 0
    while n < tokens:
        n += next(it)[:, :-1].numel()
    dt = time.perf_counter() - t0
    return {"tokens": n, "seconds": dt, "tokens_per_s": n / dt}


def rss_child(path: str, tokens: int) -> None:
    """In a fresh process: (a) read every document of the file through the streaming source, (b) run the full
    pipeline for a fixed token budget. Prints JSON with the peak RSS after each."""
    from gpt2_accel.data import _HFSource, resolve_source
    from gpt2_accel.recipe import DataArguments

    base = _peak_rss_mb()
    args = DataArguments(dataset_name=path)
    src = _HFSource(resolve_source(path), args, "train", 0, 1, None, 0, False)
    t0 = time.perf_counter()
    docs = chars = 0
    while True:
        units = src.take(4096)
        if not units:
            break
        docs += len(units)
        chars += sum(len(t) for t, _ in units)
    read_s = time.perf_counter() - t0
    rss_read = _peak_rss_mb()
    r = bench_stream(Path(path), tokens, workers=0)
    print(json.dumps({"docs": docs, "chars": chars, "read_s": read_s, "rss_import_mb": base,
                      "rss_after_full_read_mb": rss_read, "rss_after_pipeline_mb": _peak_rss_mb(), **r}))  # fmt: skip


def bench_shards(
    path: Path, out: Path, block_size: int = 1024, batch_size: int = 16, batches: int = 2000
) -> dict:
    from gpt2_accel.data import _TokenStream, prepare

    shutil.rmtree(out, ignore_errors=True)  # time a fresh prepare, not a resume
    t0 = time.perf_counter()
    index = prepare([str(path)], str(out), shard_size=10_000_000, progress=False)
    prep_s = time.perf_counter() - t0
    ntok = index["splits"]["train"]["tokens"] + index["splits"]["validation"]["tokens"]
    files = [str(out / s["file"]) for s in index["splits"]["train"]["shards"]]
    stream = iter(_TokenStream(files, block_size, batch_size, 0, 1, 0, 0))
    next(stream)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(stream)
    dt = time.perf_counter() - t0
    return {"prepare_tokens": ntok, "prepare_s": prep_s, "prepare_tokens_per_s": ntok / prep_s,
            "read_tokens_per_s": batches * batch_size * block_size / dt, "read_batches_per_s": batches / dt}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a short smoke run")
    p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "gpt2_accel_bench_data"))
    p.add_argument("--_rss_child", nargs=2, metavar=("PATH", "TOKENS"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._rss_child:
        rss_child(a._rss_child[0], int(a._rss_child[1]))
        return 0
    d = Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    gb = 1 << 30
    sizes = [4 << 20, 16 << 20] if a.quick else [gb // 4, gb]
    budget = 2_000_000 if a.quick else 30_000_000
    print(f"cpus: {os.cpu_count()}  python {sys.version.split()[0]}  quick={a.quick}")

    small = make_jsonl(d / f"docs_{sizes[0] >> 20}MB.jsonl", sizes[0])
    with open(small) as f:
        texts = [json.loads(line)["text"] for line, _ in zip(f, range(400 if a.quick else 2000))]
    print(f"tiktoken encode_ordinary_batch alone: {bench_tiktoken(texts) / 1e6:.2f} M tokens/s")
    for workers in (0, 1):
        r = bench_stream(small, budget, workers)
        print(f"streaming pipeline (jsonl -> windows of 1025, batch 16), dataloader_num_workers={workers}: "
              f"{r['tokens_per_s'] / 1e6:.2f} M tokens/s over {r['tokens'] / 1e6:.1f} M tokens")  # fmt: skip

    print("peak RSS while streaming (fresh process per size; full read of every document, then the pipeline "
          f"for {budget / 1e6:.0f} M tokens):")  # fmt: skip
    for size in sizes:
        path = make_jsonl(d / f"docs_{size >> 20}MB.jsonl", size)
        out = subprocess.run([sys.executable, __file__, "--_rss_child", str(path), str(budget)],
                             capture_output=True, text=True, check=True)  # fmt: skip
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"  {path.stat().st_size / 2**20:,.0f} MB: {r['docs']:,} docs read in {r['read_s']:.0f} s "
              f"({r['chars'] / r['read_s'] / 1e6:.0f} M chars/s); peak RSS after import {r['rss_import_mb']:.0f} MB, "
              f"after the full read {r['rss_after_full_read_mb']:.0f} MB, after the pipeline "
              f"{r['rss_after_pipeline_mb']:.0f} MB ({r['tokens_per_s'] / 1e6:.2f} M tokens/s)")  # fmt: skip

    prep_src = small if a.quick else make_jsonl(d / "docs_64MB.jsonl", 64 << 20)
    r = bench_shards(prep_src, d / f"prepared_{prep_src.stem}", batches=200 if a.quick else 2000)
    print(f"prepare ({os.cpu_count()} procs): {r['prepare_tokens'] / 1e6:.1f} M tokens in {r['prepare_s']:.1f} s "
          f"= {r['prepare_tokens_per_s'] / 1e6:.2f} M tokens/s")  # fmt: skip
    print(f"shard reading (memmap, random windows of 1025, batch 16): {r['read_tokens_per_s'] / 1e6:.1f} M tokens/s "
          f"({r['read_batches_per_s']:.0f} batches/s)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
