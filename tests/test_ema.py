"""Post-hoc EMA (EDM2): the power-EMA math against float64 references, the reconstruction against an EMA computed
directly, the errors for lengths the snapshots cannot express, and the trainer + `gpt2-accel ema` end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gpt2_accel.ema import (
    EMAError,
    PowerEMA,
    _profile_dot,
    ema_beta,
    gamma_to_sigma_rel,
    list_snapshots,
    reconstruct,
    sigma_rel_to_gamma,
    solve_coefficients,
)

ROOT = Path(__file__).resolve().parents[1]


def test_sigma_rel_and_gamma_match_edm2():
    # EDM2 (sec. 3): sigma_rel 0.05 <-> gamma 16.97, sigma_rel 0.10 <-> gamma 6.94
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=5e-3)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=5e-3)
    for s in (0.01, 0.05, 0.13, 0.25):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(s)) == pytest.approx(s, rel=1e-12)
    # the definition: the relative standard deviation of the profile tau**gamma on [0, 1], by quadrature
    g = sigma_rel_to_gamma(0.08)
    tau = np.linspace(0, 1, 2_000_001)
    w = (g + 1) * tau**g
    mean = np.trapezoid(tau * w, tau)
    std = math.sqrt(np.trapezoid((tau - mean) ** 2 * w, tau))
    assert std == pytest.approx(0.08, rel=1e-6)
    for bad in (0.0, -0.1, 0.3):
        with pytest.raises(EMAError, match="outside"):
            sigma_rel_to_gamma(bad)


def test_discrete_power_ema_weights_follow_the_profile():
    """beta_t = (1 - 1/t)**(gamma + 1) gives step tau the weight (1 - beta_tau) prod_{s > tau} beta_s, which the
    profile (gamma + 1) tau**gamma / t**(gamma + 1) approximates (float64, by expanding the recursion)."""
    g, t = sigma_rel_to_gamma(0.1), 2000
    betas = np.array([ema_beta(s, g) for s in range(1, t + 1)], np.float64)
    w = (1 - betas) * np.concatenate([np.cumprod(betas[::-1])[::-1][1:], [1.0]])  # weight of each step
    assert w.sum() == pytest.approx(1.0, abs=1e-12)
    tau = np.arange(1, t + 1)
    profile = (g + 1) * tau**g / t ** (g + 1)
    assert np.abs(w - profile).sum() < 0.01  # total variation between discrete and continuous weights


def test_profile_inner_products_equal_numerical_integrals():
    steps, gammas = np.array([300.0, 1000.0, 700.0]), np.array([6.94, 16.97, 3.0])
    closed = _profile_dot(steps, gammas, steps, gammas)
    tau = np.linspace(0, 1000, 4_000_001)
    prof = [np.where(tau <= t, (g + 1) * tau**g / t ** (g + 1), 0.0) for t, g in zip(steps, gammas)]
    for i in range(3):
        for j in range(3):
            assert closed[i, j] == pytest.approx(np.trapezoid(prof[i] * prof[j], tau), rel=1e-5)


def _trajectory_run(tmp_path: Path, sigma_rels: list[float], t_end: int, every: int) -> PowerEMA:
    """A float64 'model' whose weights follow a random walk; EMAs updated every step, snapshots every `every`."""
    torch.manual_seed(0)
    model = nn.Linear(6, 5, dtype=torch.float64)
    ema = PowerEMA(model, sigma_rels)
    steps = torch.randn(t_end, 5, 7, dtype=torch.float64) * 0.05
    with torch.no_grad():
        for t in range(1, t_end + 1):
            model.weight += steps[t - 1, :, :6]
            model.bias += steps[t - 1, :, 6]
            ema.after_step(t, t_end, tmp_path, every)
    return ema


def test_reconstruction_equals_an_ema_tracked_directly(tmp_path):
    t_end = 2000
    _trajectory_run(tmp_path, [0.05, 0.10], t_end, every=50)
    assert [s for s, _ in list_snapshots(tmp_path)] == list(range(50, t_end + 1, 50))
    direct = _trajectory_run(tmp_path / "direct", [0.07, 0.15], t_end, every=t_end)  # the references
    scale = direct.averages[0]["weight"].abs().mean().item()
    for i, sigma in enumerate((0.07, 0.15)):
        weights, report = reconstruct(tmp_path, sigma)
        assert report["step"] == t_end and report["profile_error"] < 0.05
        for name in ("weight", "bias"):
            err = (weights[name] - direct.averages[i][name]).abs().max().item()
            assert err < 1e-3 * scale, (sigma, name, err, scale)  # a neighbouring length is ~0.1 * scale off
    # a tracked length is reproduced by its own snapshot (coefficient 1 on it, 0 elsewhere)
    weights, report = reconstruct(tmp_path, 0.10)
    last = _trajectory_run(tmp_path / "again", [0.05, 0.10], t_end, every=t_end)
    torch.testing.assert_close(weights["weight"], last.averages[1]["weight"], rtol=0, atol=1e-9)
    # an earlier step: the average of the run up to step 1000
    mid = _trajectory_run(tmp_path / "mid", [0.07], 1000, every=1000)
    weights, _ = reconstruct(tmp_path, 0.07, step=1000)
    assert (
        weights["weight"] - mid.averages[0]["weight"]
    ).abs().max().item() < 5e-3 * scale  # fewer snapshots before step 1000


def test_lengths_the_snapshots_cannot_express_are_refused(tmp_path):
    _trajectory_run(tmp_path, [0.05, 0.10], 400, every=100)
    with pytest.raises(
        EMAError, match=r"sigma_rel=0\.01 at step 400 cannot be reconstructed.*support sigma_rel in"
    ):
        reconstruct(tmp_path, 0.01)
    with pytest.raises(EMAError, match="outside"):
        reconstruct(tmp_path, 0.5)
    with pytest.raises(EMAError, match="step=900 is outside"):
        reconstruct(tmp_path, 0.05, step=900)
    with pytest.raises(EMAError, match=r"no EMA snapshots.*ema_sigma_rels"):
        reconstruct(tmp_path / "empty", 0.05)
    _, err = solve_coefficients(np.array([400.0]), np.array([6.94]), 400, sigma_rel_to_gamma(0.10))
    assert err < 1e-3  # sanity: the snapshot itself


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                HF_HUB_OFFLINE="1")  # fmt: skip


def test_trainer_snapshots_and_the_ema_command_builds_a_model(tmp_path):
    from gpt2_accel.trainer import Trainer

    run = tmp_path / "run"
    keys = dict(n_layer=2, n_head=2, n_embd=32, n_positions=32, per_device_train_batch_size=4, max_steps=12,
                max_eval_samples=8, per_device_eval_batch_size=8, dataloader_num_workers=0, warmup_steps=2,
                eval_steps=0, save_steps=6, logging_steps=1, output_dir=str(run), ema_sigma_rels=[0.05, 0.10],
                ema_snapshot_steps=3)  # fmt: skip
    Trainer(**keys).train()
    assert [s for s, _ in list_snapshots(run)] == [3, 6, 9, 12]
    assert (run / "checkpoints" / "step_00000012" / "ema_state.safetensors").is_file()
    out = tmp_path / "ema10"
    cmd = [sys.executable, "-m", "gpt2_accel", "ema", str(run), "--sigma_rel", "0.10", "--output", str(out)]
    proc = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sigma_rel=0.1" in proc.stdout and str(out) in proc.stdout
    # the console shows the result and the path, not transformers' loading bars or DeepSpeed's accelerator line
    assert "Loading weights" not in proc.stderr, proc.stderr[-2000:]
    assert "Setting accelerator" not in proc.stderr, proc.stderr[-2000:]
    info = json.loads((out / "ema_info.json").read_text())
    assert info["profile_error"] < 1e-6  # a tracked length
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import gpt2_accel  # noqa: F401

    # the exported model holds exactly the EMA (its snapshot at step 12), not the final weights
    snap = load_file(run / "ema" / "step_00000012.safetensors")
    model = AutoModelForCausalLM.from_pretrained(out)
    final = AutoModelForCausalLM.from_pretrained(run)
    w = model.transformer.h[0].mlp.c_fc.weight
    torch.testing.assert_close(w, snap["ema1/transformer.h.0.mlp.c_fc.weight"], rtol=0, atol=1e-6)
    assert not torch.allclose(w, final.transformer.h[0].mlp.c_fc.weight)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    # it evaluates like any model directory
    ev = subprocess.run([sys.executable, "-m", "gpt2_accel", "eval", "--help"], env=_env(), cwd=ROOT,
                        capture_output=True, text=True, timeout=240)  # fmt: skip
    assert ev.returncode == 0
    bad = subprocess.run([*cmd[:5], "--sigma_rel", "0.01", "--output", str(tmp_path / "x")], env=_env(), cwd=ROOT,
                         capture_output=True, text=True, timeout=240)  # fmt: skip
    assert (
        bad.returncode == 2
        and "cannot be reconstructed" in bad.stderr
        and "support sigma_rel in" in bad.stderr
    )
    assert not (tmp_path / "x").exists()
