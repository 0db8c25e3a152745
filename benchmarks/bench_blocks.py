"""Modern block options vs the GPT-2 block: training-step tokens/s at equal parameter count, and cached
generation tokens/s with grouped-query / multi-query attention vs multi-head.

    python benchmarks/bench_blocks.py                   # every option, 3 interleaved rounds, then generation
    python benchmarks/bench_blocks.py --threads 1       # steadiest on a busy host
    python benchmarks/bench_blocks.py --only gpt2 swiglu llama --rounds 5
    python benchmarks/bench_blocks.py --quick           # tiny smoke run (seconds)

Training: each variant is the default shape (4 layers, 4 heads, 256 wide, 256 context, batch 8, vocabulary 50257
padded to 50304, fp32, skip_logits as the trainer) with ``n_inner`` chosen so the block has the GPT-2 block's
parameter count (SwiGLU's 3 matrices get 8/3 of the width; GQA's smaller c_attn gives its weights to the MLP).
One step = forward + loss + backward + clip + fused AdamW + zero_grad. Variants run in a rotating order each round,
so slow phases of a shared machine hit all alike; the figure is the best (minimum) step time over all rounds.

Generation: a 6-layer, 384-wide, 6-head model, prompt 256, then ``--new`` tokens one at a time through the KV
cache (a minimal greedy loop: the model's forward, no generate() overhead); n_kv_head 6 (MHA), 2 (GQA), 1 (MQA).
The KV cache holds n_kv_head heads, so its size shrinks by n_head / n_kv_head; the printed size is measured.
"""

from __future__ import annotations

import argparse
import time

import torch

from gpt2_accel.configuration_gpt2_accel import GPT2AccelConfig
from gpt2_accel.modeling_gpt2_accel import CACHE_FIELD, GPT2AccelForCausalLM
from gpt2_accel.optim import param_groups

VARIANTS = {
    "gpt2": {},
    "rope": dict(position_embedding_type="rope"),
    "rmsnorm": dict(norm_type="rmsnorm"),
    "swiglu": dict(mlp_type="swiglu"),
    "relu2": dict(mlp_type="relu2"),
    "gqa(kv=1)": dict(n_kv_head=1),
    "qk_norm": dict(qk_norm=True),
    "sliding(64)": dict(sliding_window=64),
    "sinks": dict(attention_sinks=True),
    "softcap": dict(final_logit_softcapping=15.0),
    "no_bias": dict(bias=False),
    "llama": dict(position_embedding_type="rope", norm_type="rmsnorm", mlp_type="swiglu", bias=False, n_kv_head=2),
    "nanochat": dict(
        position_embedding_type="rope", norm_type="rmsnorm", norm_elementwise_affine=False,
        norm_after_embedding=True, mlp_type="relu2", qk_norm=True, bias=False, tie_word_embeddings=False,
        final_logit_softcapping=15.0,
    ),
    "gpt-oss-like": dict(
        position_embedding_type="rope", norm_type="rmsnorm", mlp_type="swiglu", n_kv_head=2, sliding_window=64,
        layer_types=None, attention_sinks=True,
    ),
}  # fmt: skip


def build(shape: dict, options: dict, n_inner: int | None = None) -> GPT2AccelForCausalLM:
    options = dict(options)
    if options.get("layer_types", 0) is None:  # gpt-oss: alternate sliding / full
        options["layer_types"] = ["sliding_attention", "full_attention"] * (shape["L"] // 2)
    config = GPT2AccelConfig(
        vocab_size=shape.get("V", 50257), pad_vocab_size_multiple=64, n_positions=shape["T"], n_embd=shape["d"],
        n_layer=shape["L"], n_head=shape["H"], dropout=0.0, n_inner=n_inner, **options,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    config.use_cache = False
    return GPT2AccelForCausalLM(config)


def block_params(model: GPT2AccelForCausalLM) -> int:
    return sum(p.numel() for p in model.transformer.h.parameters())


def equal_param_model(shape: dict, options: dict) -> GPT2AccelForCausalLM:
    """The variant with n_inner chosen so its blocks have the GPT-2 blocks' parameter count (block params are
    linear in n_inner: solve from two probes on the meta device)."""
    with torch.device("meta"):
        target = block_params(build(shape, {}))
        a, b = 4 * shape["d"], 4 * shape["d"] + 64
        pa, pb = block_params(build(shape, options, a)), block_params(build(shape, options, b))
    n_inner = round(a + (target - pa) * (b - a) / (pb - pa))
    return build(shape, options, n_inner)


def train_step_fn(model, shape: dict):
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, fused=True)
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, shape.get("V", 50257), (shape["B"], shape["T"] + 1), generator=g)
    x, y = batch[:, :-1], batch[:, 1:]
    model.train()

    def step() -> None:
        loss = model(input_ids=x, shift_labels=y, skip_logits=True).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def bench_training(names: list[str], shape: dict, rounds: int, steps: int) -> None:
    models = {n: equal_param_model(shape, VARIANTS[n]) for n in names}
    fns = {n: train_step_fn(m, shape) for n, m in models.items()}
    for fn in fns.values():
        fn()  # warm-up: allocator, BLAS threads
    best = {n: float("inf") for n in names}
    print(f"training: {len(names)} variants built, timing", flush=True)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            for _ in range(steps):
                t0 = time.perf_counter()
                fns[n]()
                best[n] = min(best[n], time.perf_counter() - t0)
        print(f"round {r + 1}/{rounds} done", flush=True)
    tokens = shape["B"] * shape["T"]
    base = best[names[0]]
    print(f"\ntraining step, {shape}, best of {rounds} rounds x {steps} steps (interleaved)")
    print(
        f"{'variant':<14} {'n_inner':>7} {'block params':>13} {'total params':>13} {'ms/step':>9} {'tokens/s':>9} {'vs ' + names[0]:>8}"
    )
    for n in names:
        m = models[n]
        total = sum(p.numel() for p in m.parameters())
        print(
            f"{n:<14} {m.config.mlp_hidden_size:>7} {block_params(m):>13,} {total:>13,} {best[n] * 1e3:>9.1f} "
            f"{tokens / best[n]:>9.0f} {base / best[n]:>7.2f}x"
        )


@torch.no_grad()
def bench_generation(shape: dict, kv_heads: list[int], prompt: int, new: int, rounds: int) -> None:
    results = {}
    for kv in kv_heads:
        cfg = dict(shape, T=prompt + new)
        torch.manual_seed(0)
        model = build(cfg, dict(n_kv_head=kv)).eval()
        model.config.use_cache = True
        x = torch.randint(0, 50257, (shape["B"], prompt))
        best = float("inf")
        cache_bytes = 0
        for _ in range(rounds):
            out = model(x, use_cache=True)
            cache = getattr(out, CACHE_FIELD)
            nxt = out.logits[:, -1:].argmax(-1)
            t0 = time.perf_counter()
            for _ in range(new):
                out = model(nxt, use_cache=True, cache=cache)
                nxt = out.logits[:, -1:].argmax(-1)
            best = min(best, time.perf_counter() - t0)
            cache_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
        results[kv] = (best, cache_bytes, sum(p.numel() for p in model.parameters()))
    base = results[kv_heads[0]][0]
    print(f"\ncached generation: {shape['L']} layers, {shape['d']} wide, {shape['H']} heads, batch {shape['B']}, "
          f"prompt {prompt}, {new} new tokens, best of {rounds}")  # fmt: skip
    print(f"{'n_kv_head':>9} {'params':>12} {'KV cache':>10} {'tokens/s':>9} {'vs MHA':>7}")
    for kv, (t, nbytes, n) in results.items():
        print(f"{kv:>9} {n:>12,} {nbytes / 2**20:>8.1f}MB {shape['B'] * new / t:>9.1f} {base / t:>6.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--only", nargs="+", choices=list(VARIANTS), help="variants to time (gpt2 first as the base)"
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--new", type=int, default=64, help="generated tokens")
    ap.add_argument("--skip-generation", action="store_true")
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 1 round: a smoke run")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=50257, help="a smaller vocabulary weighs the blocks more")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.only or list(VARIANTS)
    if "gpt2" in names:
        names = ["gpt2"] + [n for n in names if n != "gpt2"]
    train_shape = dict(
        L=args.layers, H=args.width // 64, d=args.width, T=args.context, B=args.batch, V=args.vocab
    )
    gen_shape = dict(L=6, H=6, d=384, B=4)
    prompt = 256
    if args.quick:
        train_shape, gen_shape, prompt = dict(L=2, H=2, d=64, T=64, B=2), dict(L=2, H=2, d=64, B=2), 16
        args.rounds, args.steps, args.new = 1, 1, 4
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if not args.skip_training:
        bench_training(names, train_shape, args.rounds, args.steps)
    if not args.skip_generation:
        kv = [gen_shape["H"], 2, 1] if gen_shape["H"] % 2 == 0 else [gen_shape["H"], 1]
        bench_generation(gen_shape, sorted(set(kv), reverse=True), prompt, args.new, args.rounds)


if __name__ == "__main__":
    main()
