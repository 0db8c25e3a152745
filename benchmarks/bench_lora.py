"""Full finetuning vs LoRA (the base frozen): optimizer state, gradient memory and step time.

Both models are the same GPT-2 (default: 4 layers, 256 wide, GPT-2's 50257-token vocabulary, as `init_from: gpt2`
runs would have, scaled down for a CPU) with our AdamW (gpt2_accel.optim.build_optimizer); LoRA wraps every block
Linear layer (gpt2_accel.lora.wrap_model, rank --lora-r). Steps alternate between the two so a noisy machine slows
both alike; each figure is the best of --repeats.

    python benchmarks/bench_lora.py
    python benchmarks/bench_lora.py --n-layer 12 --n-embd 768 --block-size 256   # GPT-2 124M shapes
"""

from __future__ import annotations

import argparse
import time

import torch


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t)
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's); 1 on a shared box"
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from gpt2_accel import GPT2AccelConfig, GPT2AccelForCausalLM
    from gpt2_accel.lora import wrap_model
    from gpt2_accel.optim import build_optimizer
    from gpt2_accel.recipe import PeftArguments, TrainingArguments

    cfg = GPT2AccelConfig(
        vocab_size=50257,
        n_positions=args.block_size,
        n_embd=args.n_embd,
        n_layer=args.n_layer,
        n_head=args.n_head,
    )
    torch.manual_seed(0)
    models = {"full": GPT2AccelForCausalLM(cfg).train()}
    models["lora"] = wrap_model(
        GPT2AccelForCausalLM(cfg).train(), PeftArguments(use_peft=True, lora_r=args.lora_r), "bench"
    )
    opts = {k: build_optimizer(m, TrainingArguments(), "cpu") for k, m in models.items()}
    ids = torch.randint(0, 50257, (args.batch_size, args.block_size + 1))

    def step(name: str) -> float:
        m, opt = models[name], opts[name]
        t0 = time.perf_counter()
        out = m(input_ids=ids[:, :-1], shift_labels=ids[:, 1:], use_cache=False, skip_logits=True)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for name in models:  # warm-up; creates the optimizer states
        step(name)
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(args.repeats):
        for name in models:  # interleaved
            times[name].append(step(name))

    print(f"GPT-2 {args.n_layer}x{args.n_embd}, vocab 50257, batch {args.batch_size} x {args.block_size} tokens, "
          f"LoRA r={args.lora_r} on c_attn/c_proj/c_fc; fp32 AdamW; best of {args.repeats} interleaved steps "
          f"on {torch.get_num_threads()} threads\n")  # fmt: skip
    print("| | trainable params | optimizer state | gradients | step time (best) | step time (median) |")
    print("|---|---|---|---|---|---|")
    rows = {}
    for name, m in models.items():
        trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
        grads = sum(p.numel() * p.element_size() for p in m.parameters() if p.requires_grad)
        best, median = min(times[name]), sorted(times[name])[len(times[name]) // 2]
        rows[name] = (_state_bytes(opts[name]), best)
        print(f"| {name} | {trainable / 1e6:.3f} M | {_state_bytes(opts[name]) / 2**20:.1f} MiB | "
              f"{grads / 2**20:.1f} MiB | {best * 1e3:.0f} ms | {median * 1e3:.0f} ms |")  # fmt: skip
    print(f"\nLoRA / full: optimizer state x{rows['lora'][0] / rows['full'][0]:.4f}, "
          f"step time x{rows['lora'][1] / rows['full'][1]:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
