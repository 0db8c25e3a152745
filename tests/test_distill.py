"""Distillation: the loss against a float64 hand computation, the teacher frozen and outside the optimizer, and the
teacher errors reported before training."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from gpt2_accel.distill import distillation_loss
from gpt2_accel.recipe import RecipeError, load_recipe

TINY = dict(
    n_layer=2, n_head=2, n_embd=32, n_positions=32, block_size=32, per_device_train_batch_size=2,
    per_device_eval_batch_size=4, max_eval_samples=4, dataloader_num_workers=0, warmup_steps=1, logging_steps=1,
    eval_steps=0, save_steps=0, max_steps=3, report_to=["none"],
)  # fmt: skip


def _trainer(**keys):
    from gpt2_accel.trainer import Trainer

    return Trainer(**{**TINY, **keys})


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher") / "run"
    _trainer(output_dir=str(out), max_steps=2).train()
    return out


def test_loss_matches_a_float64_hand_computation():
    g = torch.Generator().manual_seed(0)
    B, T, V, temp, alpha = 2, 3, 5, 2.5, 0.3
    s = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 3
    t = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, V, (B, T), generator=g)
    y[1, 2] = -100  # an ignored position counts in neither term
    loss, ce, kl = distillation_loss(s, t, y, temperature=temp, alpha=alpha)

    ce_ref, kl_ref, n = 0.0, 0.0, 0
    for b in range(B):
        for i in range(T):
            if y[b, i] == -100:
                continue
            n += 1
            zs, zt = s[b, i].tolist(), t[b, i].tolist()
            ce_ref += -zs[y[b, i]] + math.log(sum(math.exp(z) for z in zs))
            ps = [math.exp(z / temp) for z in zs]
            pt = [math.exp(z / temp) for z in zt]
            ps = [p / sum(ps) for p in ps]
            pt = [p / sum(pt) for p in pt]
            kl_ref += sum(q * math.log(q / p) for q, p in zip(pt, ps, strict=True))  # KL(teacher || student)
    ce_ref, kl_ref = ce_ref / n, kl_ref / n
    assert ce.item() == pytest.approx(ce_ref, rel=1e-12)
    assert kl.item() == pytest.approx(kl_ref, rel=1e-12)
    # Hinton et al. 2015: the soft term is scaled by T^2
    assert loss.item() == pytest.approx((1 - alpha) * ce_ref + alpha * temp**2 * kl_ref, rel=1e-12)


def test_identical_models_have_zero_kl_and_gradients_flow_to_the_student_only():
    student, teacher = tiny_model(0), tiny_model(0)
    ids = torch.randint(0, 128, (2, 8))
    with torch.no_grad():
        t_logits = teacher(ids).logits
    s_logits = student(ids).logits
    loss, _, kl = distillation_loss(s_logits, t_logits, ids.roll(-1, 1), temperature=2.0, alpha=1.0)
    assert kl.item() == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())


def test_distillation_run_keeps_the_teacher_frozen_and_out_of_the_optimizer(teacher, tmp_path):
    from safetensors.torch import load_file

    before = load_file(teacher / "model.safetensors")
    t = _trainer(output_dir=str(tmp_path / "kd"), attn_type="GK", init_from=str(teacher),
                 teacher_model_name_or_path=str(teacher), distillation_alpha=0.7, temperature=2.0)  # fmt: skip
    final = t.train()
    assert final["step"] == 3 and math.isfinite(final["val_loss"])
    assert not t.teacher.training and not any(p.requires_grad for p in t.teacher.parameters())
    in_optimizer = {id(p) for g in t.optimizer.param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in t.teacher.parameters()}
    assert t.teacher.config.attn_type == "SM" and t.model.config.attn_type == "GK"  # they may differ
    after = {k: v for k, v in t.teacher.state_dict().items() if k in before}
    assert all(torch.equal(before[k], after[k]) for k in after)


def test_alpha_zero_is_plain_cross_entropy(teacher, tmp_path):
    """distillation_alpha=0 must train exactly as without a teacher (to float rounding: full vs chunked CE)."""
    import json

    def losses(run):
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r]

    _trainer(output_dir=str(tmp_path / "ce"), init_from=str(teacher)).train()
    _trainer(output_dir=str(tmp_path / "kd0"), init_from=str(teacher), teacher_model_name_or_path=str(teacher),
             distillation_alpha=0.0).train()  # fmt: skip
    assert losses(tmp_path / "kd0") == pytest.approx(losses(tmp_path / "ce"), abs=1e-5)


def test_teacher_with_another_vocabulary_is_refused(tmp_path):
    other = tmp_path / "char-teacher"
    tiny_model(0, vocab_size=257).save_pretrained(other)
    with pytest.raises(RecipeError, match=r"has vocab_size 257 but the student has 50257.*same tokenizer"):
        _trainer(output_dir=str(tmp_path / "r"), teacher_model_name_or_path=str(other)).setup()


def test_teacher_that_does_not_load_is_refused(tmp_path):
    with pytest.raises(RecipeError, match=r"teacher_model_name_or_path='.*nowhere' does not load"):
        _trainer(output_dir=str(tmp_path / "r"), teacher_model_name_or_path=str(tmp_path / "nowhere")).setup()
    assert not (tmp_path / "r" / "checkpoints").exists()


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"temperature": 0}, r"temperature must be > 0"),
        ({"distillation_alpha": 1.5}, r"distillation_alpha must"),
    ],
)
def test_bad_mix_or_temperature(keys, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(None, keys)
