"""optim=muon under DeepSpeed ZeRO-1/2: DeepSpeed's own Muon over our parameter split (gpt2_accel/optim.py,
``deepspeed_muon_with_adamw``) trains like one process with accumulation, resumes bitwise, and every mode that
cannot run it is refused before any step (ZeRO-0/3, optimizer offload, clipping).

The launched runs reuse tests/test_distributed.py's tiny character-level model, data and launch helpers.
"""

from __future__ import annotations

import shutil
import subprocess
import types
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file
from test_distributed import MUON, ROOT, TIMEOUT, _env, _launch, _losses, _run, tokens  # noqa: F401

from gpt2_accel.optim import (
    MuonWithAdamW,
    build_optimizer,
    check_deepspeed_runs_muon,
    check_optimizer_mode,
    muon_param_split,
)
from gpt2_accel.recipe import RecipeError, TrainingArguments

# DeepSpeed clips over the norm of Muon's orthogonalised update, not the gradient's: Muon runs there unclipped
MUON_DS = [*MUON, "--max_grad_norm=0"]
# Measured (10 steps, 2 ranks vs 1 rank with accumulation 2, ZeRO-1 and ZeRO-2 alike): losses identical, Muon
# matrices within 1.1e-6 and AdamW parameters within 3.3e-6 (the attention key bias, whose gradient is exactly zero:
# AdamW normalises rounding noise there), while Muon moves the block matrices by ~3e-2. The differences are fp32
# rounding: the all-reduce sums in another order than accumulation, and DeepSpeed's Newton-Schulz is the Gram form
# of the same polynomial (torch.compile'd, eps added to the norm rather than clamped). An optimizer other than Muon
# misses by ~1e-2, so 2e-5 keeps three orders of magnitude between the two.
WEIGHT_TOL = 2e-5
LOSS_TOL = 2e-5


def _ds_env(config: str) -> dict[str, str]:
    """The launch environment: DeepSpeed 0.19 torch.compile's its Muon update, a cold compile of ~60 s per launch
    on CPU. Only the ZeRO-2 launches of the 2-rank test run it compiled (DeepSpeed has had compile-only bugs
    there); the others run the same update eager (TORCHDYNAMO_DISABLE), since what they test is not the compiled
    path (test_deepspeeds_muon_update_equals_torch_muon_in_float32 checks the eager update against torch.optim.Muon)."""
    return _env() if config == "deepspeed_zero2.yaml" else _env(TORCHDYNAMO_DISABLE="1")


def _weights(run: Path) -> dict[str, torch.Tensor]:
    """The exported weights, the tied LM head once (DeepSpeed's export also writes ``lm_head.weight``)."""
    sd = load_file(run / "model.safetensors")
    head = sd.pop("lm_head.weight", None)
    assert head is None or torch.equal(head, sd["transformer.wte.weight"])
    return sd


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


# ---------------------------------------------------------------------------------------------------------------
# in one process: the refusals, the optimizer DeepSpeed gets, DeepSpeed's Muon update against torch's
# ---------------------------------------------------------------------------------------------------------------
def test_deepspeed_muon_runs_on_zero_1_and_2_unclipped_and_every_other_mode_is_refused():
    unclipped = TrainingArguments(optim="muon", max_grad_norm=0.0)
    for stage in (1, 2):
        check_optimizer_mode(unclipped, "deepspeed", zero_stage=stage)
    with pytest.raises(
        RecipeError, match=r"\(ZeRO stage 3\): ZeRO-3.*deepspeed_zero1\.yaml.*optim=adamw_torch"
    ):
        check_optimizer_mode(unclipped, "deepspeed", " (ZeRO stage 3)", zero_stage=3)
    with pytest.raises(RecipeError, match=r"stage 0 shards nothing.*SGD.*ddp\.yaml"):
        check_optimizer_mode(unclipped, "deepspeed", zero_stage=0)
    with pytest.raises(RecipeError, match=r"DeepSpeedCPUAdam.*offload_optimizer_device: none"):
        check_optimizer_mode(unclipped, "deepspeed", zero_stage=2, offload_optimizer=True)
    clipped = TrainingArguments(optim="muon", max_grad_norm=1.0)
    with pytest.raises(
        RecipeError, match=r"max_grad_norm=1\.0.*orthogonalising.*Set max_grad_norm=0.*ddp\.yaml"
    ):
        check_optimizer_mode(clipped, "deepspeed", zero_stage=1)
    check_optimizer_mode(TrainingArguments(), "deepspeed", zero_stage=3)  # AdamW runs everywhere


def test_deepspeed_gets_our_split_with_the_recipes_adamw_settings():
    pytest.importorskip("deepspeed")
    model = tiny_model()
    args = TrainingArguments(
        optim="muon", learning_rate=3e-3, adam_beta2=0.99, adam_epsilon=1e-7, muon_learning_rate=0.05
    )
    opt = build_optimizer(model, args, "cpu", deepspeed=True)
    assert type(opt).__name__ == "MuonWithAuxAdam"  # DeepSpeed's: ZeRO orthogonalises only for it
    muon, rest = muon_param_split(model)
    muon_groups = [g for g in opt.param_groups if g["use_muon"]]
    assert len(muon_groups) == 1 and {id(p) for p in muon_groups[0]["params"]} == {id(p) for p in muon}
    assert muon_groups[0]["lr"] == 0.05 and muon_groups[0]["momentum"] == args.muon_momentum
    adamw_groups = [g for g in opt.param_groups if not g["use_muon"]]
    assert {id(p) for g in adamw_groups for p in g["params"]} == {id(p) for p in rest}
    for g in adamw_groups:  # not MuonWithAuxAdam's own defaults (0.9, 0.95) / 1e-10
        assert g["betas"] == (0.9, 0.99) and g["eps"] == 1e-7 and g["lr"] == 3e-3
    # ZeRO reads the tag per parameter: embeddings (wte, wpe) stay on AdamW, unlike DeepSpeed's name heuristic
    names = dict(model.named_parameters())
    assert (
        names["transformer.wte.weight"].use_muon is False
        and names["transformer.wpe.weight"].use_muon is False
    )
    assert names["transformer.h.0.attn.c_attn.weight"].use_muon is True


def test_deepspeeds_muon_update_equals_torch_muon_in_float32():
    """Two steps of DeepSpeed's MuonWithAuxAdam on whole matrices (the same ``muon_update`` ZeRO-1/2 applies to
    each reduced gradient) against our MuonWithAdamW (torch.optim.Muon, float32 Newton-Schulz on CPU)."""
    pytest.importorskip("deepspeed")
    args = TrainingArguments(optim="muon", muon_learning_rate=0.02, muon_weight_decay=0.01)
    ours, theirs = tiny_model(3).train(), tiny_model(3).train()
    opt_ours = build_optimizer(ours, args, "cpu")
    opt_theirs = build_optimizer(theirs, args, "cpu", deepspeed=True)
    assert isinstance(opt_ours, MuonWithAdamW)
    start = {n: p.detach().clone() for n, p in ours.named_parameters()}
    for seed in (0, 1):
        batch = torch.randint(0, 128, (4, 17), generator=torch.Generator().manual_seed(seed))  # (B, T + 1)
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss.backward()
            with torch.compiler.set_stance("force_eager"):  # DeepSpeed compiles muon_update; same math eager
                opt.step()
            opt.zero_grad(set_to_none=True)
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        moved = (p - start[name]).abs().max().item()
        assert moved > 1e-4, name  # both steps changed every parameter
        # The Muon matrices agree to 3e-7 after moving ~1e-2 (measured). The AdamW parameters follow within 2e-6:
        # the attention key bias has an exactly-zero gradient (softmax ignores a per-query constant), so AdamW
        # normalises rounding noise there, the only place a 1e-7 difference in the matrices shows up at 1e-6.
        atol = 1e-6 if p.dim() == 2 and ".h." in name else 1e-5
        torch.testing.assert_close(q, p, rtol=0, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


def test_a_deepspeed_that_would_not_orthogonalise_is_refused():
    """The guard run right after accelerator.prepare: an optimizer DeepSpeed swapped in (Accelerate's CPU Adam
    under offload, a plain engine without ZeRO) is an error, not a silent change of optimizer."""
    model = tiny_model()
    swapped = types.SimpleNamespace(optimizer=torch.optim.AdamW(model.parameters()))  # no ZeRO around it
    with pytest.raises(RuntimeError, match=r"optim=muon: DeepSpeed built AdamW.*would not orthogonalise"):
        check_deepspeed_runs_muon(swapped)


# ---------------------------------------------------------------------------------------------------------------
# launched: 2 ranks under deepspeed_zero1/2.yaml == 1 rank with accumulation 2; resume; refusals
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def muon_reference(tokens, tmp_path_factory):  # noqa: F811
    """``muon_reference(accumulation)``: one process (no DeepSpeed), per-device batch 2, that accumulation:
    torch.optim.Muon + AdamW, unclipped. Each run once per module."""
    runs: dict[int, Path] = {}

    def run(accumulation: int) -> Path:
        if accumulation not in runs:
            out = tmp_path_factory.mktemp(f"muon_ref_ga{accumulation}") / "run"
            _run(
                _launch("cpu.yaml", 1, tokens, out, f"--gradient_accumulation_steps={accumulation}", *MUON_DS)
            )
            runs[accumulation] = out
        return runs[accumulation]

    return run


def _assert_trains_like(run: Path, ref: Path, proc: subprocess.CompletedProcess) -> None:
    """Same losses and weights as ``ref``, with DeepSpeed's Muon (checked by the trainer and logged)."""
    # the optimizer DeepSpeed built, checked by the trainer (gpt2_accel/optim.py, check_deepspeed_runs_muon)
    assert "optimizer: DeepSpeed DeepSpeedZeroOptimizer(MuonWithAuxAdam)" in proc.stdout + proc.stderr
    a, b = _losses(run), _losses(ref)
    assert a.keys() == b.keys() and len(a) == 10
    for k in a:
        assert a[k] == pytest.approx(b[k], abs=LOSS_TOL), (k, a[k], b[k])
    _assert_same_weights(_weights(run), _weights(ref), WEIGHT_TOL)


@pytest.mark.slow
@pytest.mark.usefixtures("deepspeed_ops")
@pytest.mark.parametrize("config", ["deepspeed_zero1.yaml", "deepspeed_zero2.yaml"])
def test_muon_under_deepspeed_zero_trains_like_one_process_and_resumes_bitwise(
    config,
    tokens,  # noqa: F811  (test_distributed's fixture)
    muon_reference,
    tmp_path,
):
    pytest.importorskip("deepspeed")
    run = tmp_path / "run"
    proc = _run(_launch(config, 2, tokens, run, *MUON_DS), env=_ds_env(config))
    _assert_trains_like(run, muon_reference(2), proc)
    # the block matrices moved by Muon's steps, far beyond the tolerance: an optimizer other than Muon would miss
    ds, init = _weights(run), _weights(run / "checkpoints" / "step_00000005" / "model")
    name = "transformer.h.0.attn.c_attn.weight"
    assert (ds[name] - init[name]).abs().max() > 1e-2

    # lose the run after step 5, relaunch: DeepSpeed's checkpoint (ZeRO partitions + Muon momentum) continues it
    resumed = tmp_path / "resumed"
    shutil.copytree(run / "checkpoints" / "step_00000005", resumed / "checkpoints" / "step_00000005")
    shutil.copy(run / "metrics.jsonl", resumed / "metrics.jsonl")
    proc = _run(
        _launch(config, 2, tokens, resumed, *MUON_DS, "--resume_from_checkpoint=auto"), env=_ds_env(config)
    )
    assert "resumed from" in proc.stdout + proc.stderr
    assert _losses(resumed) == _losses(run)
    _assert_same_weights(_weights(resumed), ds, atol=0.0)  # bitwise on CPU


@pytest.mark.slow
@pytest.mark.usefixtures("deepspeed_ops")
def test_muon_under_deepspeed_zero2_with_accumulation_steps_momentum_once_per_step(
    tokens,  # noqa: F811  (test_distributed's fixture)
    muon_reference,
    tmp_path,
):
    """ZeRO-2 reduces the gradients of every micro-batch: Muon must still orthogonalise, and advance its momentum,
    once per optimizer step. 2 ranks x accumulation 2 == 1 rank x accumulation 4 (measured: losses within 5e-7,
    weights within 5e-6; ZeRO-1 the same)."""
    pytest.importorskip("deepspeed")
    run = tmp_path / "run"
    args = ["--gradient_accumulation_steps=2", "--save_steps=0"]
    # eager (the compiled ZeRO-2 update is run by the test above): what this tests is when Muon steps
    proc = _run(
        _launch("deepspeed_zero2.yaml", 2, tokens, run, *MUON_DS, *args), env=_env(TORCHDYNAMO_DISABLE="1")
    )
    _assert_trains_like(run, muon_reference(4), proc)


@pytest.mark.slow
@pytest.mark.usefixtures("deepspeed_ops")
@pytest.mark.parametrize(
    "config, args, message",
    [
        ("deepspeed_zero1.yaml", [], "(ZeRO stage 1, from "),  # the recipe's max_grad_norm=1.0
        ("deepspeed_zero3.yaml", ["--max_grad_norm=0"], "(ZeRO stage 3, from "),
    ],
)
def test_muon_where_deepspeed_cannot_run_it_is_refused_before_any_step(
    config,
    args,
    message,
    tokens,  # noqa: F811  (test_distributed's fixture)
    tmp_path,
):
    pytest.importorskip("deepspeed")
    out = tmp_path / "run"
    # one rank: the refusal happens while the trainer configures the launch, before any step or collective, and
    # names the ZeRO stage whatever the world size (the 2-rank launches above run the modes it lets through)
    cmd = _launch(config, 1, tokens, out, *MUON, *args)
    proc = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode != 0
    assert f"optim=muon cannot run under DeepSpeed {message}" in proc.stderr, proc.stderr[-3000:]
    fix = (
        "Set max_grad_norm=0"
        if config == "deepspeed_zero1.yaml"
        else "deepspeed_zero1.yaml or deepspeed_zero2.yaml"
    )
    assert fix in proc.stderr and "optim=adamw_torch" in proc.stderr  # the fixes are named
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()  # no step ran
