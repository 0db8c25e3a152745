"""Optimizer parameter groups and learning-rate schedules (pure functions of the step)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .recipe import TrainingArguments


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay every >= 2-D tensor (matmul weights, embeddings), not biases or LayerNorm gains.

    This is GPT-3/nanoGPT's split; tied weights appear once because ``named_parameters`` de-duplicates them.
    """
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            # DeepSpeed ZeRO-3 partitions parameters into 1-D placeholders; ds_shape keeps the real shape
            ndim = len(getattr(p, "ds_shape", p.shape))
            (decay if ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, args: TrainingArguments, device_type: str) -> torch.optim.Optimizer:
    """AdamW with the recipe's betas/eps; the fused kernel where torch has one for the device (CUDA, CPU)."""
    kwargs = {}
    if device_type in ("cuda", "cpu", "xpu", "mps"):
        kwargs["fused"] = True  # one kernel for all parameters instead of a loop of small ops
    return torch.optim.AdamW(
        param_groups(model, args.weight_decay),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        **kwargs,
    )


def lr_at(step: int, args: TrainingArguments, max_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then the chosen decay to ``min_lr``.

    A pure function of the step, so a resumed run needs only the step to continue the schedule exactly.
    """
    peak, floor, warm = args.learning_rate, args.min_lr, args.warmup_steps
    if step < warm:
        return peak * (step + 1) / warm  # (step + 1): the first step already trains with a non-zero lr
    kind = args.lr_scheduler_type
    if kind == "constant":
        return peak
    if kind == "warmup_stable_decay":
        # WSD (Hu et al. 2024, MiniCPM): constant after warmup, then a linear decay over the last decay_ratio.
        decay_steps = max(1, round(args.decay_ratio * max_steps))
        start = max(warm, max_steps - decay_steps)
        if step < start:
            return peak
        frac = min(1.0, (step - start + 1) / max(1, max_steps - start))
        return peak + frac * (floor - peak)
    span = max(1, max_steps - warm)
    frac = min(1.0, (step - warm) / span)
    if kind == "linear":
        return peak + frac * (floor - peak)
    # cosine (Loshchilov & Hutter 2017), as GPT-3 and nanoGPT use, ending at min_lr on the last step
    return floor + 0.5 * (1.0 + math.cos(math.pi * frac)) * (peak - floor)
