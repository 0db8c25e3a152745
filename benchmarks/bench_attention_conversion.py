"""Does distillation help convert a softmax GPT-2 to another attention? Prints the table in docs/attention.md.

1. Train a demo-sized softmax (SM) teacher on the bundled Shakespeare (character level, so a run takes minutes
   on a CPU).
2. Switch its attention to each ``--attn-types`` entry (the weights stay; only attn_type changes) and measure the
   validation loss right after the switch.
3. Recover for ``--steps`` steps four ways: {LoRA, full finetuning} x {cross-entropy only, distillation from the SM
   teacher}, everything else equal (data order, seed, schedule), and measure the validation loss again.

    python benchmarks/bench_attention_conversion.py                       # the docs' table (a few minutes)
    python benchmarks/bench_attention_conversion.py --attn-types GK,PA_relu --steps 200

Validation loss is the data's cross-entropy (nats/char) on the same held-out windows for every row.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

COMMON = dict(
    tokenizer_name="char", dataset_name="bundled:shakespeare", validation_split_percentage=10, block_size=64,
    max_eval_samples=64, per_device_eval_batch_size=64, dataloader_num_workers=0, logging_steps=50,
    eval_steps=0, save_steps=0, report_to=["none"], seed=1337, dropout=0.0, weight_decay=0.1,
)  # fmt: skip
TEACHER = dict(
    n_layer=2, n_head=2, n_embd=64, n_positions=64, bias=False, per_device_train_batch_size=16,
    learning_rate=2e-3, min_lr=2e-4, warmup_steps=20,
)  # fmt: skip


def _trainer(**keys):
    from gpt2_accel.trainer import Trainer

    return Trainer(**{**COMMON, **keys})


def _val_loss(**keys) -> float:
    """Train (or resume: an interrupted benchmark continues where it stopped) and read the final val loss."""
    _trainer(**keys, resume_from_checkpoint="auto").train()
    return json.loads((Path(keys["output_dir"]) / "eval_results.json").read_text())["val_loss"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher-steps", type=int, default=200)
    p.add_argument("--steps", type=int, default=60, help="recovery steps per row")
    p.add_argument("--attn-types", default="GK", help="comma-separated attn_type values to convert to")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.5, help="distillation_alpha")
    p.add_argument("--lr-full", type=float, default=1e-3)
    p.add_argument("--lr-lora", type=float, default=5e-3)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument(
        "--workdir", default=None, help="runs go here; rerunning with it resumes (default: a temp dir)"
    )
    args = p.parse_args(argv)
    logging.getLogger("gpt2_accel").setLevel(logging.WARNING)
    logging.getLogger("accelerate").setLevel(logging.WARNING)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-conversion-"))
    t0 = time.perf_counter()
    teacher_dir = work / "teacher_sm"
    teacher_val = _val_loss(output_dir=str(teacher_dir), max_steps=args.teacher_steps, **TEACHER)
    print(
        f"teacher (SM, {args.teacher_steps} steps): val loss {teacher_val:.4f}  [{time.perf_counter() - t0:.0f} s]"
    )

    rows = []
    for attn in args.attn_types.split(","):
        recover = dict(init_from=str(teacher_dir), attn_type=attn, max_steps=args.steps, warmup_steps=10,
                       per_device_train_batch_size=16)  # fmt: skip
        switched = _trainer(output_dir=str(work / f"{attn}_switch"), **recover)
        after_switch = switched.evaluate()["val_loss"]  # the converted weights, before any training
        print(f"{attn}: val loss right after the switch {after_switch:.4f}")
        for mode in ("lora", "full"):
            tune = (
                dict(use_peft=True, lora_r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                     learning_rate=args.lr_lora, min_lr=args.lr_lora / 10)
                if mode == "lora" else dict(learning_rate=args.lr_full, min_lr=args.lr_full / 10)
            )  # fmt: skip
            result = {}
            for loss in ("ce", "kd"):
                kd = (
                    dict(teacher_model_name_or_path=str(teacher_dir), temperature=args.temperature,
                         distillation_alpha=args.alpha)
                    if loss == "kd" else {}
                )  # fmt: skip
                t1 = time.perf_counter()
                result[loss] = _val_loss(
                    output_dir=str(work / f"{attn}_{mode}_{loss}"), **recover, **tune, **kd
                )
                print(f"  {mode:4} {loss}: {result[loss]:.4f}  [{time.perf_counter() - t1:.0f} s]")
            rows.append((attn, mode, after_switch, result["ce"], result["kd"]))

    print(f"\nteacher: SM {TEACHER['n_layer']}x{TEACHER['n_embd']}, {args.teacher_steps} steps, val loss "
          f"{teacher_val:.4f}; recovery: {args.steps} steps, batch 16 x 64 chars, T={args.temperature}, "
          f"alpha={args.alpha}, LoRA r={args.lora_r} (lr {args.lr_lora}) / full (lr {args.lr_full})\n")  # fmt: skip
    print("| attn_type | tuning | val loss after switch | + CE only | + distillation | distillation - CE |")
    print("|---|---|---|---|---|---|")
    for attn, mode, sw, ce, kd in rows:
        label = "LoRA" if mode == "lora" else "full"
        print(f"| {attn} | {label} | {sw:.4f} | {ce:.4f} | {kd:.4f} | {kd - ce:+.4f} |")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; runs in {work}")


if __name__ == "__main__":
    main()
