"""Our training step vs transformers' GPT2LMHeadModel on the same config, interleaved in one process.

    python benchmarks/bench_train_step.py                       # ours, ours-logits vs HF GPT-2 (sdpa), 5 rounds
    python benchmarks/bench_train_step.py --threads 1           # steadiest comparison on a busy host
    python benchmarks/bench_train_step.py --compile             # + ours under torch.compile (cold compile ~1 min)
    python benchmarks/bench_train_step.py --components          # single pieces (LM head + loss, chunk rows, GELU)
    python benchmarks/bench_train_step.py --ablate              # + variants that isolate one choice each
    python benchmarks/bench_train_step.py --trainer             # + the full Trainer loop on the same config
    python benchmarks/bench_train_step.py --quick               # tiny smoke run (seconds)

Default config (the reference of issue 9 on a 2-core CPU): 6 layers, 6 heads, 384 wide, 256 context, batch 8,
fp32, dropout 0; HF GPT-2 at vocabulary 50304, ours at GPT-2's 50257 padded to 50304. ``ours`` calls the model with
``skip_logits=True`` (chunked LM head + loss, as the trainer does), ``ours-logits`` without. One step = forward + loss + backward + clip_grad_norm(1.0) + fused AdamW +
zero_grad, i.e. what the trainer does per optimizer step. Every variant runs ``--steps`` steps per round, in a
rotating order each round (A B C, B C A, ...), so slow phases of a shared machine hit all of them alike; the
figure per variant is the median over rounds of its per-round median, and ratios are medians of per-round ratios.
MFU uses nanoGPT's/PaLM's FLOP count (6N + 12 L d T, N without position embeddings) against an fp32 matmul
ceiling measured here before and after the rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
from torch import nn

from gpt2_accel.configuration_gpt2_accel import GPT2AccelConfig
from gpt2_accel.metrics import flops_per_token
from gpt2_accel.modeling_gpt2_accel import GPT2AccelForCausalLM
from gpt2_accel.optim import param_groups


def matmul_ceiling(n: int = 1024, seconds: float = 1.0) -> float:
    """FLOP/s of a square fp32 matmul, best of a few 1/5-second windows (the least-disturbed one on a busy host)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = 0.0
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        iters, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 5:
            a @ b
            iters += 1
        best = max(best, 2 * n**3 * iters / (time.perf_counter() - t0))
    return best


def ours(cfg: dict, vocab_size: int | None = None, pad_multiple: int = 64) -> nn.Module:
    config = GPT2AccelConfig(
        vocab_size=vocab_size or cfg["our_vocab"],
        n_positions=cfg["T"],
        n_embd=cfg["d"],
        n_layer=cfg["L"],
        n_head=cfg["H"],
        dropout=0.0,
        pad_vocab_size_multiple=pad_multiple,
    )
    config._attn_implementation = "sdpa"
    config.use_cache = False
    return GPT2AccelForCausalLM(config)


def hf(cfg: dict) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=cfg["vocab"],
        n_positions=cfg["T"],
        n_embd=cfg["d"],
        n_layer=cfg["L"],
        n_head=cfg["H"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        use_cache=False,
    )
    return GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")


def make_step(
    model: nn.Module,
    kind: str,
    *,
    fused: bool = True,
    clip: bool = True,
    compile_: bool = False,
    skip_logits: bool = True,
) -> Callable:
    """One optimizer step on a (B, T + 1) batch: forward, loss, backward, clip, AdamW, zero_grad. Ours passes
    ``skip_logits`` (the chunked LM head + loss, what the trainer passes) unless told not to."""
    model.train()
    opt_kw = {"fused": True} if fused else {"foreach": True}
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.95), **opt_kw)
    params = [p for p in model.parameters() if p.requires_grad]
    fwd = torch.compile(model) if compile_ else model

    def step(batch: torch.Tensor) -> float:
        x = batch[:, :-1]  # (B, T)
        if kind == "hf":
            loss = fwd(input_ids=x, labels=x).loss  # transformers shifts labels itself (T - 1 targets)
        else:
            loss = fwd(  # T aligned targets
                input_ids=x, shift_labels=batch[:, 1:], use_cache=False, skip_logits=skip_logits
            ).loss
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def trainer_tokens_per_sec(cfg: dict, steps: int, threads: int) -> float:
    """Steps of the full Trainer (bundled data, logging, clipping, accumulation=1) on the same config: tokens/s
    over the logged interval after the first log (which includes warm-up), as the trainer itself reports it."""
    from gpt2_accel.metrics import read_metrics
    from gpt2_accel.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="bench_trainer_") as out:  # checkpoints and the model are deleted
        log_every = max(1, steps // 3)
        tr = Trainer(
            n_layer=cfg["L"],
            n_head=cfg["H"],
            n_embd=cfg["d"],
            n_positions=cfg["T"],
            vocab_size=cfg["vocab"],
            dropout=0.0,
            per_device_train_batch_size=cfg["B"],
            dataset_name="bundled:shakespeare",
            # char: 256 byte ids, for the --quick vocabulary of 512
            tokenizer_name="gpt2" if cfg["vocab"] >= 50257 else "char",
            dataloader_num_workers=1,
            max_steps=steps,
            logging_steps=log_every,
            eval_steps=0,
            save_steps=0,
            max_eval_samples=1,
            warmup_steps=0,
            output_dir=out,
            report_to=["none"],
        )
        tr.train()
        torch.set_num_threads(threads)  # in case the launch machinery changed it
        rows = [r for r in read_metrics(os.path.join(out, "metrics.jsonl")) if "tokens_per_sec" in r]
    return statistics.median(r["tokens_per_sec"] for r in rows[1:] or rows)


def components(cfg: dict, rounds: int) -> None:
    """Forward + backward of single pieces at the config's shapes, interleaved pairs (ours vs an alternative):
    the candidates for the differences between whole steps. Process CPU time per call, median over rounds."""
    import torch.nn.functional as F
    from transformers.activations import NewGELUActivation

    from gpt2_accel.modeling_gpt2_accel import chunked_linear_cross_entropy

    B, T, d, V = cfg["B"], cfg["T"], cfg["d"], 50304  # the padded GPT-2 vocabulary even with --quick
    g = torch.Generator().manual_seed(0)
    h = torch.randn(B * T, 4 * d, generator=g, requires_grad=True)  # MLP hidden (B*T, 4C)
    logits_pad = torch.randn(B * T, V, generator=g, requires_grad=True)  # (B*T, 50304)
    tgt = torch.randint(0, 50257, (B * T,), generator=g)
    hf_gelu = NewGELUActivation()
    x = torch.randn(B * T, d, generator=g, requires_grad=True)  # final hidden states (B*T, C)
    w = (0.02 * torch.randn(V, d, generator=g)).requires_grad_()  # tied LM head / wte (V_pad, C)

    def run(fn) -> float:
        x.grad = w.grad = h.grad = logits_pad.grad = None
        c0 = time.process_time()
        fn().sum().backward()
        return time.process_time() - c0

    def fused(rows: int) -> Callable:
        return lambda: chunked_linear_cross_entropy(x, w, tgt, 50257, rows)

    pairs = {
        "LM head + loss, vocab 50257 padded: skip_logits chunked, 512 rows (ours) | logits, slice, cross_entropy": (
            fused(512),
            lambda: F.cross_entropy(F.linear(x, w)[:, :50257].reshape(-1, 50257), tgt),
        ),
        "skip_logits chunk rows: 512 | 1024": (fused(512), fused(1024)),
        "skip_logits chunk rows: 512 | 2048": (fused(512), fused(2048)),
        "skip_logits chunk rows: 512 | 256": (fused(512), fused(256)),
        "GELU tanh: F.gelu (ours) | transformers NewGELUActivation (HF GPT-2)": (
            lambda: F.gelu(h, approximate="tanh"),
            lambda: hf_gelu(h),
        ),
        "loss at 50257 of 50304 padded logits: slice+reshape (ours) | mask pad columns to -inf": (
            lambda: F.cross_entropy(logits_pad[:, :50257].reshape(-1, 50257), tgt),
            lambda: F.cross_entropy(logits_pad.masked_fill(_pad_mask(V, 50257), float("-inf")), tgt),
        ),
        "LM head + loss at vocab 50257: 50304-row matmul, slice (ours) | matmul with the first 50257 rows": (
            lambda: F.cross_entropy(F.linear(x, w)[:, :50257].reshape(-1, 50257), tgt),
            lambda: F.cross_entropy(F.linear(x, w[:50257]), tgt),
        ),
        "loss: contiguous (B*T, 50304) logits | sliced (B*T, 50257) view": (
            lambda: F.cross_entropy(logits_pad, tgt),
            lambda: F.cross_entropy(logits_pad[:, :50257].reshape(-1, 50257), tgt),
        ),
    }
    for name, (fa, fb) in pairs.items():
        ta, tb = [], []
        for _ in range(rounds):
            ta.append(run(fa))
            tb.append(run(fb))
        ma, mb = statistics.median(ta), statistics.median(tb)
        print(
            f"{name}: {1e3 * ma:.1f} ms | {1e3 * mb:.1f} ms (cpu, fwd+bwd) -> first is {mb / ma:.2f}x faster"
        )


def _pad_mask(v_pad: int, v: int) -> torch.Tensor:
    return torch.arange(v_pad) >= v  # (V_pad,) True on the padding columns


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--compile", action="store_true", help="add ours + torch.compile (compiled once, then timed)"
    )
    p.add_argument(
        "--ablate", action="store_true", help="add variants: foreach AdamW, vocab 50257, no clipping"
    )
    p.add_argument(
        "--trainer", type=int, default=0, metavar="STEPS", help="also time the Trainer for STEPS steps"
    )
    p.add_argument("--only", help="comma-separated variant names to run (e.g. ours,hf)")
    p.add_argument("--components", action="store_true", help="only time single pieces (GELU, loss variants)")
    p.add_argument("--quick", action="store_true", help="tiny config, 2 rounds (a smoke test)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    # HF GPT-2 gets vocab 50304; ours gets GPT-2's 50257 padded to 50304 (pad_vocab_size_multiple 64), as the
    # GPT-2 BPE recipes train it: the same matmul shapes, plus our cut back to the 50257 real ids.
    cfg = {"L": 6, "H": 6, "d": 384, "T": 256, "B": 8, "vocab": 50304, "our_vocab": 50257}
    if a.quick:
        cfg, a.rounds = {"L": 2, "H": 2, "d": 64, "T": 64, "B": 2, "vocab": 512, "our_vocab": 500}, 2

    if a.components:
        components(cfg, max(a.rounds, 5))
        return 0
    torch.manual_seed(0)
    variants: dict[str, Callable] = {
        "hf": make_step(hf(cfg), "hf"),
        "ours": make_step(ours(cfg), "ours"),  # vocab 50257 padded to 50304, skip_logits (the trainer's call)
        "ours-logits": make_step(ours(cfg), "ours", skip_logits=False),  # full logits, sliced, then the loss
    }
    if a.ablate:
        variants["ours-foreach"] = make_step(ours(cfg), "ours", fused=False)
        variants["hf-foreach"] = make_step(hf(cfg), "hf", fused=False)
        variants["ours-noclip"] = make_step(ours(cfg), "ours", clip=False)
        # vocab 50304 itself (nothing cut off), and 50257 unpadded, both through the full-logits path.
        variants["ours-v50304-logits"] = make_step(
            ours(cfg, vocab_size=cfg["vocab"]), "ours", skip_logits=False
        )
        variants["ours-nopad-logits"] = make_step(ours(cfg, pad_multiple=1), "ours", skip_logits=False)
    if a.compile:
        variants["ours-compile"] = make_step(ours(cfg), "ours", compile_=True)
        variants["ours-logits-compile"] = make_step(ours(cfg), "ours", compile_=True, skip_logits=False)
    if a.only:
        keep = a.only.split(",")
        variants = {k: v for k, v in variants.items() if k in keep}

    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, cfg["our_vocab"], (cfg["B"], cfg["T"] + 1), generator=g)
    n_params = sum(p.numel() for p in ours(cfg).parameters()) - cfg["T"] * cfg["d"]  # minus wpe
    fpt = flops_per_token(n_params, cfg["L"], cfg["d"], cfg["T"])
    tokens = cfg["B"] * cfg["T"]

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}, config {cfg}"
    )
    print(f"N = {n_params / 1e6:.2f}M (no wpe), {fpt / 1e6:.1f} MFLOP/token, {tokens} tokens/step")
    ceiling = [matmul_ceiling()]
    for name, step in variants.items():  # warm-up: allocator, BLAS threads, and the one cold compile
        t0 = time.perf_counter()
        step(batch)
        step(batch)
        print(
            f"warm-up {name}: {time.perf_counter() - t0:.1f} s (2 steps{', incl. compile' if 'compile' in name else ''})"
        )

    names = list(variants)
    per_round: dict[str, list[float]] = {n: [] for n in names}
    cpu_round: dict[str, list[float]] = {n: [] for n in names}
    for r in range(a.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            ts, cs = [], []
            for _ in range(a.steps):
                t0, c0 = time.perf_counter(), time.process_time()
                variants[name](batch)
                ts.append(time.perf_counter() - t0)
                cs.append(time.process_time() - c0)
            per_round[name].append(statistics.median(ts))
            cpu_round[name].append(statistics.median(cs))
        line = "  ".join(
            f"{n} {1e3 * per_round[n][-1]:.0f} (cpu {1e3 * cpu_round[n][-1]:.0f})" for n in names
        )
        print(f"round {r + 1}/{a.rounds} (load {os.getloadavg()[0]:.2f}) ms: {line}")
    ceiling.append(matmul_ceiling())
    peak = max(ceiling)

    print(
        f"\nfp32 matmul ceiling (1024^3, best window): {peak / 1e9:.1f} GFLOP/s (before/after: "
        f"{ceiling[0] / 1e9:.1f}/{ceiling[1] / 1e9:.1f})"
    )
    print(
        f"{'variant':<20}{'ms/step med':>12}{'min':>8}{'max':>8}{'tokens/s':>10}{'MFU':>7}{'vs hf':>8}{'vs ours':>9}"
    )
    for n in names:
        t = per_round[n]
        med = statistics.median(t)
        vs = {
            ref: statistics.median(a_ / b_ for a_, b_ in zip(per_round[ref], t, strict=True))
            if ref in per_round
            else float("nan")
            for ref in ("hf", "ours")
        }
        print(
            f"{n:<20}{1e3 * med:>12.0f}{1e3 * min(t):>8.0f}{1e3 * max(t):>8.0f}{tokens / med:>10.0f}"
            f"{100 * tokens * fpt / med / peak:>6.0f}%{vs['hf']:>7.2f}x{vs['ours']:>8.2f}x"
        )
    print("(vs X = median over rounds of X's time / this variant's time: > 1 means this variant is faster)")
    # On a shared host the wall clock includes time other processes held the cores; the process CPU time (all our
    # threads) does not, so its ratios are the steadier estimate of the work each variant does.
    print(
        f"\nprocess CPU time per step (all threads), same rounds:\n{'variant':<20}{'cpu ms med':>12}{'vs hf':>8}{'vs ours':>9}"
    )
    for n in names:
        c = cpu_round[n]
        vs = {
            ref: statistics.median(a_ / b_ for a_, b_ in zip(cpu_round[ref], c, strict=True))
            if ref in cpu_round
            else float("nan")
            for ref in ("hf", "ours")
        }
        print(f"{n:<20}{1e3 * statistics.median(c):>12.0f}{vs['hf']:>7.2f}x{vs['ours']:>8.2f}x")

    if a.trainer:
        bare = statistics.median(per_round["ours"]) if "ours" in per_round else float("nan")
        tps = trainer_tokens_per_sec(cfg, a.trainer, a.threads)
        t0 = time.perf_counter()
        for _ in range(a.steps):
            variants["ours"](batch)
        bare_after = (time.perf_counter() - t0) / a.steps
        bare_tps = tokens / statistics.median([bare, bare_after])
        print(
            f"\nTrainer: {tps:.0f} tokens/s vs bare step {bare_tps:.0f} tokens/s "
            f"(before/after {tokens / bare:.0f}/{tokens / bare_after:.0f}): ratio {tps / bare_tps:.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
