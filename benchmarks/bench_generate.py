"""Generation speed: our ``generate()`` with the KV cache vs full recomputation of the sequence at every token.

    python benchmarks/bench_generate.py                  # 6 layers, 384 wide, 16-token prompt, 256 new tokens
    python benchmarks/bench_generate.py --quick          # tiny smoke run

Full recomputation is nanoGPT's sampler style: each new token re-runs the whole (cropped) sequence through the
model and keeps the last position's logits (already only the last position through the LM head, as nanoGPT does,
so the comparison isolates the cache). Both decode greedily from the same prompt, so the tokens must match; the
script checks it. The two run interleaved (cache, recompute, cache, ...) and the median per round is reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from gpt2_accel.configuration_gpt2_accel import GPT2AccelConfig
from gpt2_accel.modeling_gpt2_accel import GPT2AccelForCausalLM


@torch.no_grad()
def generate_cached(model: GPT2AccelForCausalLM, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """transformers' generate() on our model: the prompt once, then one token per forward with the KV cache."""
    return model.generate(
        prompt,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        use_cache=True,
        pad_token_id=0,
    )


@torch.no_grad()
def generate_recompute(model: GPT2AccelForCausalLM, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Re-run the whole sequence (cropped to the context) for every new token; no cache."""
    ids = prompt  # (B, T)
    ctx = model.config.n_positions
    for _ in range(new_tokens):
        logits = model(ids[:, -ctx:], use_cache=False, logits_to_keep=1).logits  # (B, 1, V)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)  # (B, T + 1)
    return ids


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n_layer", type=int, default=6)
    p.add_argument("--n_head", type=int, default=6)
    p.add_argument("--n_embd", type=int, default=384)
    p.add_argument("--n_positions", type=int, default=512)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--prompt", type=int, default=16, help="prompt length in tokens")
    p.add_argument("--new", type=int, default=256, help="new tokens to generate")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    if a.quick:
        a.n_layer, a.n_head, a.n_embd, a.n_positions, a.vocab, a.new, a.rounds = 2, 2, 64, 64, 512, 32, 2
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    config = GPT2AccelConfig(
        vocab_size=a.vocab,
        n_positions=a.n_positions,
        n_embd=a.n_embd,
        n_layer=a.n_layer,
        n_head=a.n_head,
        dropout=0.0,
        bos_token_id=None,
        eos_token_id=None,
    )
    config._attn_implementation = "sdpa"
    model = GPT2AccelForCausalLM(config).eval()
    prompt = torch.randint(0, a.vocab, (a.batch, a.prompt), generator=torch.Generator().manual_seed(0))

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}; model "
        f"{a.n_layer}L/{a.n_head}H/{a.n_embd}d ctx {a.n_positions}, vocab {a.vocab}; batch {a.batch}, "
        f"prompt {a.prompt}, {a.new} new tokens, greedy"
    )
    out_c = generate_cached(model, prompt, 4)  # warm-up (allocator, BLAS threads)
    out_r = generate_recompute(model, prompt, 4)
    times: dict[str, list[float]] = {"kv-cache": [], "recompute": []}
    cpu: dict[str, list[float]] = {
        "kv-cache": [],
        "recompute": [],
    }  # process CPU time: steadier on a busy host
    fns = {"kv-cache": generate_cached, "recompute": generate_recompute}
    for r in range(a.rounds):
        for name in list(fns) if r % 2 == 0 else list(fns)[::-1]:
            t0, c0 = time.perf_counter(), time.process_time()
            out = fns[name](model, prompt, a.new)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            if name == "kv-cache":
                out_c = out
            else:
                out_r = out
        print(
            f"round {r + 1}/{a.rounds} (load {os.getloadavg()[0]:.2f}): "
            + "  ".join(f"{n} {t[-1]:.2f} s (cpu {cpu[n][-1]:.2f} s)" for n, t in times.items())
        )
    same = torch.equal(out_c, out_r)
    n_tok = a.new * a.batch
    med = {n: statistics.median(t) for n, t in times.items()}
    ratios = [r_ / c_ for c_, r_ in zip(times["kv-cache"], times["recompute"], strict=True)]
    for n, t in times.items():
        print(
            f"{n:<10} {n_tok / med[n]:8.1f} tokens/s  (median {med[n]:.2f} s, min {min(t):.2f}, max {max(t):.2f})"
        )
    print(
        f"speed-up of the KV cache: {statistics.median(ratios):.1f}x (per-round {', '.join(f'{x:.1f}' for x in ratios)})"
    )
    print(f"greedy tokens identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
