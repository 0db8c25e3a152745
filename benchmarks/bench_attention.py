"""Time and peak memory of every attention variant, fast path ("sdpa") vs its naive formula ("eager").

    python benchmarks/bench_attention.py            # B=4, 6 heads, T=1024, head 64 (the figures in docs/attention.md)
    python benchmarks/bench_attention.py --quick    # a small smoke run (seconds)
    python benchmarks/bench_attention.py --variants # only the GK no-grad table (log-sum-exp kernel / sentinel / naive)

Time: the fastest of ``--repeats`` rounds after one warm-up, each round timing the fast and the naive call back
to back (the minimum, not the median: on a shared machine other processes only ever add time), forward under
``torch.no_grad()`` and forward + backward (gradients of q, k, v for an all-ones upstream gradient).
Peak memory: bytes the call itself allocates and still holds at its worst moment (the running sum of every CPU
allocator allocation/free recorded by ``torch.profiler`` with ``profile_memory=True``, kernel scratch buffers
included, inputs excluded), measured in a separate, untimed call.
GK forward without gradients (evaluation, generation) has its own table: the log-sum-exp kernel it now takes,
the sentinel path it took before (still the path with gradients), and the naive formula, interleaved round by
round, with the median and the best of ``--repeats`` rounds and the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from contextlib import contextmanager

import torch
import torch._C._profiler as _prof
from torch.profiler import ProfilerActivity, profile

from gpt2_accel import attention as attn_mod
from gpt2_accel.attention import causal_attention

IMPLS = ("sdpa", "eager")  # fast path, naive formula
VARIANTS = ["SM", "GK", "GKpoly-2", "GKpoly-4", "PA_relu", "PA_gelu", "PA_sigmoid", "PA_relu_square"]


def _make_inputs(b: int, h: int, t: int, hs: int, grad: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # Scale 0.5 keeps the GK exponent (-||q - k||^2 / (2 sqrt d) ~ -4 here) inside GKpoly-2's valid range.
    q, k, v = (0.5 * torch.randn(b, h, t, hs, generator=g) for _ in range(3))
    if grad:
        for x in (q, k, v):
            x.requires_grad_(True)
    return q, k, v


def _call(attn_type: str, impl: str, q, k, v, n_positions: int, backward: bool) -> None:
    if backward:
        y = causal_attention(q, k, v, attn_type, n_positions, implementation=impl)
        # A fixed upstream gradient (all ones scaled) reaches every output without an extra reduction graph.
        y.backward(torch.ones_like(y))
        for x in (q, k, v):
            x.grad = None
    else:
        with torch.no_grad():
            causal_attention(q, k, v, attn_type, n_positions, implementation=impl)


def time_pair(attn_type: str, shape, backward: bool, repeats: int) -> dict[str, float]:
    """Seconds per call of the fast and the naive implementation: the minimum over ``repeats`` rounds, each round
    timing both back to back so that a busy neighbour slows both rather than one of them."""
    inputs = {impl: _make_inputs(*shape, grad=backward) for impl in IMPLS}
    for impl in IMPLS:
        _call(attn_type, impl, *inputs[impl], shape[2], backward)  # warm-up
    best = dict.fromkeys(IMPLS, float("inf"))
    for _ in range(repeats):
        for impl in IMPLS:
            t0 = time.perf_counter()
            _call(attn_type, impl, *inputs[impl], shape[2], backward)
            best[impl] = min(best[impl], time.perf_counter() - t0)
    return best


@contextmanager
def _without_lse_kernel():
    """GK under no_grad as before issue 10's follow-up: the sentinel path (the fallback without the kernel)."""
    saved = attn_mod._FLASH_LSE
    attn_mod._FLASH_LSE = None
    try:
        yield
    finally:
        attn_mod._FLASH_LSE = saved


def time_gk_no_grad(shape, repeats: int) -> dict[str, list[float]]:
    """Seconds per GK forward under no_grad, per round, for the log-sum-exp kernel, the sentinel path and the
    naive formula, the three timed back to back in each round (after one warm-up round)."""
    q, k, v = _make_inputs(*shape, grad=False)
    n_pos = shape[2]

    def lse() -> None:
        causal_attention(q, k, v, "GK", n_pos)

    def sentinel() -> None:
        with _without_lse_kernel():
            causal_attention(q, k, v, "GK", n_pos)

    def naive() -> None:
        causal_attention(q, k, v, "GK", n_pos, implementation="eager")

    fns = {"lse": lse, "sentinel": sentinel, "naive": naive}
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn()  # warm-up
        for _ in range(repeats):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return times


def peak_bytes(attn_type: str, impl: str, shape, backward: bool) -> int:
    """Peak of live bytes allocated during one call (inputs excluded), from the profiler's allocation events."""
    q, k, v = _make_inputs(*shape, grad=backward)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _call(attn_type, impl, q, k, v, shape[2], backward)
    allocs = []

    def walk(node) -> None:
        if node.tag == _prof._EventType.Allocation:
            allocs.append((node.start_time_ns, node.extra_fields.alloc_size))
        for c in node.children:
            walk(c)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    live = peak = 0
    for _, size in sorted(allocs):
        live += size
        peak = max(peak, live)
    return peak


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes (B=1, 2 heads, T=128), a smoke run")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--head-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--variants", nargs="*", default=VARIANTS)
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.heads, args.seq = 1, 2, 128
    shape = (args.batch, args.heads, args.seq, args.head_size)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; B={shape[0]}, heads={shape[1]}, "
        f"T={shape[2]}, head size={shape[3]}; best of {args.repeats}; "
        f"load average {os.getloadavg()[0]:.1f} (1 min)"
    )
    if not args.variants or "GK" in args.variants:
        gk = time_gk_no_grad(shape, args.repeats)
        med = {n: statistics.median(t) for n, t in gk.items()}
        best = {n: min(t) for n, t in gk.items()}
        print(f"\nGK forward, no gradients (median / best of {args.repeats} interleaved rounds)\n")
        print("| path | median | best | speed-up over naive (median / best) |")
        print("|---|---|---|---|")
        for name, label in (("lse", "log-sum-exp kernel"), ("sentinel", "sentinel"), ("naive", "naive")):
            print(
                f"| {label} | {med[name] * 1e3:.1f} ms | {best[name] * 1e3:.1f} ms "
                f"| {med['naive'] / med[name]:.1f}x / {best['naive'] / best[name]:.1f}x |",
                flush=True,
            )
        print(f"\nload average {os.getloadavg()[0]:.1f} (1 min) after the GK table\n")
    if not args.variants:
        return 0
    print(
        "| attn_type | fwd fast | fwd naive | speed-up | fwd+bwd fast | fwd+bwd naive | speed-up "
        "| peak fwd+bwd fast | peak fwd+bwd naive |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for at in args.variants:
        tf = time_pair(at, shape, False, args.repeats)
        tb = time_pair(at, shape, True, args.repeats)
        mb = {impl: peak_bytes(at, impl, shape, True) / 2**20 for impl in IMPLS}
        print(
            f"| {at} | {tf['sdpa'] * 1e3:.1f} ms | {tf['eager'] * 1e3:.1f} ms | {tf['eager'] / tf['sdpa']:.1f}x "
            f"| {tb['sdpa'] * 1e3:.1f} ms | {tb['eager'] * 1e3:.1f} ms | {tb['eager'] / tb['sdpa']:.1f}x "
            f"| {mb['sdpa']:.1f} MiB | {mb['eager']:.1f} MiB |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
