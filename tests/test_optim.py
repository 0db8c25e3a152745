"""Parameter groups and learning-rate schedules against their closed forms."""

from __future__ import annotations

import math

import pytest
from conftest import tiny_model

from gpt2_accel.optim import build_optimizer, lr_at, param_groups
from gpt2_accel.recipe import TrainingArguments


def test_decay_groups_follow_gpt3_split():
    model = tiny_model()
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert any(names[id(p)].endswith("ln_1.weight") for p in no_decay["params"])
    assert any(names[id(p)].endswith("c_attn.bias") for p in no_decay["params"])
    # the tied embedding / LM head appears exactly once
    total = len(decay["params"]) + len(no_decay["params"])
    assert total == len(list(model.parameters()))
    opt = build_optimizer(model, TrainingArguments(weight_decay=0.1), "cpu")
    assert opt.defaults["betas"] == (0.9, 0.95)


def _args(**kw):
    base = dict(learning_rate=1.0, min_lr=0.1, warmup_steps=10)
    base.update(kw)
    return TrainingArguments(**base)


def test_warmup_then_cosine_reaches_min_lr():
    a = _args()
    assert lr_at(0, a, 110) == pytest.approx(0.1)  # (0 + 1) / 10
    assert lr_at(9, a, 110) == pytest.approx(1.0)
    assert lr_at(10, a, 110) == pytest.approx(1.0)
    mid = 10 + 50
    assert lr_at(mid, a, 110) == pytest.approx(0.1 + 0.5 * (1 + math.cos(math.pi * 0.5)) * 0.9)
    assert lr_at(110, a, 110) == pytest.approx(0.1)
    assert lr_at(500, a, 110) == pytest.approx(0.1)  # past the end: stays at min_lr


def test_linear_constant_and_wsd():
    assert lr_at(60, _args(lr_scheduler_type="linear"), 110) == pytest.approx(1.0 + 0.5 * (0.1 - 1.0))
    assert lr_at(99, _args(lr_scheduler_type="constant"), 110) == 1.0
    wsd = _args(lr_scheduler_type="warmup_stable_decay", decay_ratio=0.2)
    assert lr_at(50, wsd, 100) == 1.0  # stable phase
    assert lr_at(79, wsd, 100) == 1.0
    assert lr_at(99, wsd, 100) == pytest.approx(0.1)  # decayed to min_lr on the last step
    assert 0.1 < lr_at(90, wsd, 100) < 1.0
