"""Parameter groups and learning-rate schedules against their closed forms."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import tiny_model

from gpt2_accel.optim import (
    MuonWithAdamW,
    build_optimizer,
    check_optimizer_mode,
    lr_at,
    muon_param_split,
    newton_schulz_float32,
    param_groups,
    set_lr,
)
from gpt2_accel.recipe import RecipeError, TrainingArguments, build_recipe


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
    # decay over the last 20 steps (80..99), the first of them already decayed: 11 of 20 done at step 90
    assert lr_at(90, wsd, 100) == pytest.approx(1.0 + 11 / 20 * (0.1 - 1.0))


# ---------------------------------------------------------------------------------------------------------------
# Muon + AdamW
# ---------------------------------------------------------------------------------------------------------------
def _batch(seed: int) -> torch.Tensor:
    return torch.randint(0, 128, (4, 17), generator=torch.Generator().manual_seed(seed))  # (B, T + 1)


def _train_step(model, opt, batch) -> float:
    out = model(input_ids=batch[:, :-1], labels=batch[:, :-1])
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out.loss.item()


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    model = tiny_model().train()
    args = TrainingArguments(optim="muon", weight_decay=0.1, muon_weight_decay=0.01)
    opt = build_optimizer(model, args, "cpu")
    assert isinstance(opt, MuonWithAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = [names[id(p)] for g in opt.param_groups if g["use_muon"] for p in g["params"]]
    adamw = [names[id(p)] for g in opt.param_groups if not g["use_muon"] for p in g["params"]]
    # every block matrix (c_attn, c_proj, c_fc, mlp.c_proj), nothing else
    assert sorted(muon) == sorted(n for n, p in model.named_parameters() if ".h." in n and p.dim() == 2)
    assert len(muon) == 4 * 2
    assert "transformer.wte.weight" in adamw and "transformer.wpe.weight" in adamw
    assert any(n.endswith("ln_1.weight") for n in adamw) and any(n.endswith("c_fc.bias") for n in adamw)
    assert len(muon) + len(adamw) == len(list(model.parameters()))  # the tied lm_head/wte once
    wd = {g["use_muon"]: g["weight_decay"] for g in opt.param_groups if g["params"][0].dim() == 2}
    assert wd == {True: 0.01, False: 0.1}


def test_muon_with_adamw_steps_like_torch_muon_and_adamw_side_by_side():
    """The one-object optimizer == torch.optim.Muon and torch.optim.AdamW stepped separately (the reference)."""
    args = TrainingArguments(
        optim="muon",
        learning_rate=3e-3,
        muon_learning_rate=0.05,
        warmup_steps=0,
        lr_scheduler_type="constant",
    )
    model, ref = tiny_model(0).train(), tiny_model(0).train()
    opt = build_optimizer(model, args, "cpu")
    assert opt.uses_float32_ns()  # on CPU: float32 Newton-Schulz (see newton_schulz_float32)
    opt.ns_float32 = False  # torch's own bf16 iteration: the reference below is then exact
    muon_p, rest = muon_param_split(ref)
    ref_muon = torch.optim.Muon(muon_p, lr=0.05, momentum=0.95, nesterov=True, weight_decay=0.0)
    ref_adamw = torch.optim.AdamW(param_groups(rest, 0.1), lr=3e-3, betas=(0.9, 0.95), eps=1e-8, fused=True)
    for i in range(3):
        lr = set_lr(opt, i, args, 10)
        assert lr == args.learning_rate
        assert {g["lr"] for g in opt.param_groups if g["use_muon"]} == {0.05}
        _train_step(model, opt, _batch(i))
        ref_out = ref(input_ids=_batch(i)[:, :-1], labels=_batch(i)[:, :-1])
        ref_out.loss.backward()
        ref_muon.step()
        ref_adamw.step()
        ref_muon.zero_grad()
        ref_adamw.zero_grad()
    for (n, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q), n


def test_muon_newton_schulz_dtype_follows_where_the_matrices_are_at_step_time():
    """The trainer builds the optimizer before ``accelerator.prepare`` moves the model to its GPU: the float32
    (CPU) / torch bf16 (elsewhere) choice is made when stepping, not when building."""
    model = tiny_model().train()
    opt = build_optimizer(model, TrainingArguments(optim="muon"), "cpu")
    assert opt.ns_float32 is None and opt.uses_float32_ns()
    for g in opt.param_groups:  # the groups now point at parameters off the CPU (as after prepare on a GPU)
        g["params"] = [torch.nn.Parameter(torch.empty_like(p, device="meta")) for p in g["params"]]
    assert not opt.uses_float32_ns()
    opt.ns_float32 = True  # an explicit choice wins
    assert opt.uses_float32_ns()


def test_muon_state_dict_round_trip_continues_bitwise():
    args = TrainingArguments(optim="muon", warmup_steps=2)
    model = tiny_model(0).train()
    opt = build_optimizer(model, args, "cpu")
    for i in range(3):
        set_lr(opt, i, args, 10)
        _train_step(model, opt, _batch(i))
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = copy.deepcopy(opt.state_dict())
    assert any("momentum_buffer" in s for s in saved_opt["state"].values())  # Muon's state is saved
    assert any("exp_avg" in s for s in saved_opt["state"].values())  # and AdamW's
    cont = [(set_lr(opt, i, args, 10), _train_step(model, opt, _batch(i)))[1] for i in range(3, 6)]

    resumed = tiny_model(7).train()  # other weights: everything must come from the saved state
    resumed.load_state_dict(saved_model)
    opt2 = build_optimizer(resumed, args, "cpu")
    opt2.load_state_dict(saved_opt)
    again = [(set_lr(opt2, i, args, 10), _train_step(resumed, opt2, _batch(i)))[1] for i in range(3, 6)]
    assert cont == again
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


def test_muon_is_refused_where_it_cannot_run():
    args = TrainingArguments(optim="muon")
    check_optimizer_mode(args, "multi")  # DDP and one process run it
    # DeepSpeed: ZeRO-1/2 unclipped run it (tests/test_muon_deepspeed.py has every DeepSpeed case)
    with pytest.raises(
        RecipeError, match=r"optim=muon cannot run under DeepSpeed.*ddp\.yaml.*optim=adamw_torch"
    ):
        check_optimizer_mode(args, "deepspeed", " (ZeRO stage 3)", zero_stage=3)
    # FSDP: version 2 runs it (tests/test_muon_fsdp2.py), version 1's flat parameters cannot
    check_optimizer_mode(args, "fsdp", fsdp_version=2)
    with pytest.raises(
        RecipeError,
        match=r"optim=muon cannot run under FSDP version 1.*whole.*fsdp_version: 2.*optim=adamw_torch",
    ):
        check_optimizer_mode(args, "fsdp", fsdp_version=1)
    check_optimizer_mode(TrainingArguments(), "deepspeed")  # AdamW runs everywhere
    with pytest.raises(RecipeError, match="optim must be"):
        build_recipe({"optim": "sgd"})


def test_float32_newton_schulz_matches_a_float64_reference_and_orthogonalises():
    """The float32 iteration == the same quintic iteration in float64; its output has singular values near 1."""
    coeffs, steps = (3.4445, -4.775, 2.0315), 5
    for shape in ((384, 128), (128, 512), (64, 64)):
        g = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        x = g.double().T if shape[0] > shape[1] else g.double()
        x = x / x.norm()
        for _ in range(steps):  # float64 reference, written out
            gram = x @ x.T
            x = coeffs[0] * x + (coeffs[1] * gram + coeffs[2] * gram @ gram) @ x
        ref = x.T if shape[0] > shape[1] else x
        out = newton_schulz_float32(g, coeffs, steps, 1e-7)
        assert out.dtype == torch.float32 and out.shape == g.shape
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-4)
        sv = torch.linalg.svdvals(out.double())
        # Jordan's iteration pushes singular values into ~(0.7, 1.2); only the very smallest stay behind
        assert sv.max() < 1.5 and (sv > 0.5).double().mean() > 0.9
        # and it is what torch's bf16 iteration computes, to bf16 precision
        torch_out = torch.optim._muon._zeropower_via_newtonschulz(g, coeffs, steps, 1e-7).double()
        assert (torch_out - out.double()).abs().max() < 0.05
