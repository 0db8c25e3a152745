"""EDM2 magnitude preservation (``magnitude_preserving: true``; Karras et al. 2023, arXiv:2312.02696): the forward
against a float64 model written from the paper's formulas, activation magnitudes at init and after training, the
forced weight normalisation after real optimizer and trainer steps (one process and DDP), exact reloads and
resumes, the inverse-sqrt schedule, and the refusals."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from gpt2_accel import GPT2AccelConfig, GPT2AccelForCausalLM
from gpt2_accel.modeling_gpt2_accel import MP_ACTIVATION_RMS, mp_normalize, mp_sum
from gpt2_accel.optim import attach_forced_weight_norm, forced_weight_norm_params, lr_at
from gpt2_accel.recipe import RecipeError, TrainingArguments, build_recipe

MP = dict(magnitude_preserving=True, bias=False, norm_elementwise_affine=False)
EPS = 1e-4  # EDM2's normalize() epsilon: a normalised row has RMS 1 / (1 + eps)


def mp_model(seed: int = 0, **overrides) -> GPT2AccelForCausalLM:
    torch.manual_seed(seed)
    return GPT2AccelForCausalLM(tiny_config(**{**MP, **overrides})).eval()


def _rms_over_unit_normal(f) -> float:
    """E[f(x)^2]^(1/2), x ~ N(0, 1), by the trapezoid rule in float64 on [-12, 12]."""
    x = torch.linspace(-12, 12, 400_001, dtype=torch.float64)
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    return math.sqrt(torch.trapezoid(f(x) ** 2 * pdf, x).item())


def test_activation_constants_and_mp_sum_are_edm2s():
    silu = _rms_over_unit_normal(F.silu)
    assert silu == pytest.approx(0.596, abs=5e-4)  # EDM2's mp_silu divisor
    gelu = _rms_over_unit_normal(lambda x: F.gelu(x, approximate="tanh"))
    relu2 = _rms_over_unit_normal(lambda x: F.relu(x) ** 2)
    assert pytest.approx({"gelu": gelu, "relu2": relu2, "swiglu": silu}, abs=1e-6) == MP_ACTIVATION_RMS
    # mp_sum keeps unit RMS for independent unit-RMS inputs, at any blend
    g = torch.Generator().manual_seed(0)
    a, b = (
        torch.randn(200_000, generator=g, dtype=torch.float64),
        torch.randn(200_000, generator=g, dtype=torch.float64),
    )
    for t in (0.1, 0.3, 0.5, 0.9):
        ref = ((1 - t) * a + t * b) / math.sqrt((1 - t) ** 2 + t**2)
        torch.testing.assert_close(mp_sum(a, b, t), ref, rtol=1e-12, atol=1e-12)
        assert mp_sum(a, b, t).pow(2).mean().sqrt().item() == pytest.approx(1.0, abs=0.01)
    w = torch.randn(7, 33, dtype=torch.float64) * 5
    rows = w / (EPS + w.pow(2).mean(dim=1, keepdim=True).sqrt())
    torch.testing.assert_close(mp_normalize(w), rows, rtol=1e-12, atol=1e-12)


def _reference_logits(model: GPT2AccelForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """The magnitude-preserving GPT in float64, from the formulas (EDM2 Sec. 2.2-2.5), reading the model's weights:
    every matrix as w_hat / sqrt(fan_in) with w_hat's rows at unit RMS, mp_sum residuals with t, the MLP activation
    over its RMS on a unit normal, parameter-free norms, logits = gain * h @ w_hat_wte^T / sqrt(C)."""
    c = model.config
    p = {k: v.detach().double() for k, v in model.named_parameters()}

    def w_hat(w):
        return w / (EPS + w.pow(2).mean(dim=1, keepdim=True).sqrt())

    def lin(x, name):
        w = p[name]
        return x @ (w_hat(w) / math.sqrt(w.shape[1])).T

    def blend(a, b, t):
        return ((1 - t) * a + t * b) / math.sqrt((1 - t) ** 2 + t * t)

    def norm(x):
        if c.norm_type == "rmsnorm":
            return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + c.layer_norm_epsilon)
        mu = x.mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt((x - mu).pow(2).mean(-1, keepdim=True) + c.layer_norm_epsilon)

    acts = {
        "gelu": lambda h: (
            F.gelu(h, approximate="tanh") / _rms_over_unit_normal(lambda x: F.gelu(x, approximate="tanh"))
        ),
        "relu2": lambda h: F.relu(h) ** 2 / math.sqrt(1.5),  # E[relu(x)^4] = 3/2
        "swiglu": lambda h: F.silu(h.chunk(2, -1)[0]) * h.chunk(2, -1)[1] / _rms_over_unit_normal(F.silu),
    }
    B, T = ids.shape
    C, nh, t = c.n_embd, c.n_head, c.mp_residual_balance
    hs = C // nh
    x = w_hat(p["transformer.wte.weight"])[ids]  # (B, T, C)
    x = blend(x, w_hat(p["transformer.wpe.weight"])[:T], 0.5)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(c.n_layer):
        pre = f"transformer.h.{i}."
        q, k, v = lin(norm(x), pre + "attn.c_attn.weight").split(C, dim=-1)
        q, k, v = (z.view(B, T, nh, hs).transpose(1, 2) for z in (q, k, v))  # (B, nh, T, hs)
        att = (q @ k.transpose(-1, -2) / math.sqrt(hs)).masked_fill(~causal, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)
        x = blend(x, lin(y, pre + "attn.c_proj.weight"), t)
        h = acts[c.mlp_type](lin(norm(x), pre + "mlp.c_fc.weight"))
        x = blend(x, lin(h, pre + "mlp.c_proj.weight"), t)
    logits = p["lm_head.gain"] * lin(norm(x), "transformer.wte.weight")
    return logits[..., : c.vocab_size]


@pytest.mark.parametrize(
    "options",
    [dict(), dict(mlp_type="relu2", norm_type="rmsnorm", mp_residual_balance=0.5), dict(mlp_type="swiglu")],
    ids=["gelu-layernorm", "relu2-rmsnorm", "swiglu"],
)
def test_forward_matches_a_float64_reference(options):
    model = mp_model(**options)
    with torch.no_grad():  # trained-looking weights: off the unit sphere and a gain away from 1
        for w in forced_weight_norm_params(model):
            w.mul_(torch.rand(w.shape[0], 1) + 0.5)
        model.lm_head.gain.fill_(2.5)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(ids, labels=ids)
    ref = _reference_logits(model, ids)
    torch.testing.assert_close(out.logits.double(), ref, rtol=0, atol=2e-5)
    # the chunked loss path (the trainer's) reads the same normalised, gained head: same loss, same gradients
    grads = []
    for skip in (False, True):
        model.zero_grad()
        loss = model(ids, labels=ids, skip_logits=skip).loss
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        torch.testing.assert_close(loss, out.loss, rtol=1e-5, atol=1e-5)
    assert grads[0].keys() == grads[1].keys() and grads[0]["lm_head.gain"].abs() > 0
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6, msg=n)
    assert "lm_head.gain" in dict(model.named_parameters()) and not any(
        n.endswith(".bias") for n, _ in model.named_parameters()
    )


def _hidden_rms(model, **inputs) -> list[float]:
    with torch.no_grad():
        hs = model(**inputs, output_hidden_states=True).hidden_states
    return [h.pow(2).mean().sqrt().item() for h in hs[:-1]]  # the residual stream entering each block


def test_activations_keep_unit_magnitude_through_depth_at_init():
    model = mp_model(n_layer=12, position_embedding_type="rope", norm_type="rmsnorm")
    x = torch.randn(4, 64, 64, generator=torch.Generator().manual_seed(0))  # unit-variance input embeddings
    rms = _hidden_rms(model, inputs_embeds=x)
    assert len(rms) == 12 and all(0.7 < r < 1.3 for r in rms), rms
    rms_ids = _hidden_rms(model, input_ids=torch.randint(0, 128, (4, 64)))
    assert rms_ids[0] == pytest.approx(1.0, abs=0.01) and all(0.7 < r < 1.3 for r in rms_ids), rms_ids
    # GPT-2's additive residual stream on the same unit-variance input does not stay there
    torch.manual_seed(0)
    gpt2 = GPT2AccelForCausalLM(tiny_config(n_layer=12, initializer_range=0.5)).eval()
    plain = _hidden_rms(gpt2, inputs_embeds=x)
    assert plain[-1] > 1.5 * plain[0], plain


def _train(model, steps: int, renorm: bool, lr: float = 0.02) -> None:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    if renorm:
        attach_forced_weight_norm(model, opt, "MULTI_CPU")
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, 128, (4, 33), generator=g)
        loss = model(ids[:, :-1], shift_labels=ids[:, 1:]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def _row_rms(w: torch.Tensor) -> torch.Tensor:
    return w.detach().pow(2).mean(dim=1).sqrt()


def test_forced_weight_norm_after_optimizer_steps_keeps_weights_and_activations_at_unit_scale():
    trained, drifted = mp_model(n_layer=4), mp_model(n_layer=4)
    init = [w.detach().clone() for w in forced_weight_norm_params(trained)]
    _train(trained, 20, renorm=True)
    _train(drifted, 20, renorm=False)
    for w0, w in zip(init, forced_weight_norm_params(trained), strict=True):
        assert not torch.equal(w0, w)  # trained
        torch.testing.assert_close(_row_rms(w), torch.full((w.shape[0],), 1 / (1 + EPS)), rtol=0, atol=1e-5)
    # without the re-normalisation every matrix's rows grow (EDM2 Sec. 2.3: an update orthogonal to w adds norm)
    assert all(_row_rms(w).mean() > 1.002 for w in forced_weight_norm_params(drifted))
    # activations stay near unit RMS through training (at a learning rate of the speedrun's order; mp_sum keeps
    # unit RMS for independent inputs, and training correlates a branch with its input, so not exactly 1)
    model = mp_model(n_layer=4)
    _train(model, 20, renorm=True, lr=0.005)
    rms = _hidden_rms(model, input_ids=torch.randint(0, 128, (4, 64)))
    assert all(0.7 < r < 1.3 for r in rms), rms


def test_a_saved_model_reloads_with_identical_logits_and_exports_as_its_fold(tmp_path):
    from gpt2_accel.convert import export_class

    model = mp_model()
    _train(model, 3, renorm=True)
    model.save_pretrained(tmp_path)
    again = GPT2AccelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    for a, b in zip(forced_weight_norm_params(model), forced_weight_norm_params(again), strict=True):
        assert torch.equal(a, b)  # loading never re-normalises what was saved
    # exported as the plain model its constants fold into (gpt2_accel.fold; tests/test_fold.py checks the logits)
    assert export_class(again.config) == "gpt2"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(bias=True), "magnitude_preserving=True conflicts with biases.*Set bias=False"),
        (dict(mlp_bias=True), r"biases \(mlp_bias=True"),
        (
            dict(bias=True, attention_bias=False, mlp_bias=False, norm_elementwise_affine=True),
            "LayerNorm's learned bias",
        ),
        (
            dict(norm_elementwise_affine=True),
            "layernorm with a learned gain.*Set norm_elementwise_affine=False",
        ),
        (dict(norm_elementwise_affine=True, norm_type="rmsnorm"), "rmsnorm with a learned gain"),
        (dict(zero_init_output_proj=True), "zero_init_output_proj=True: a zero matrix"),
        (dict(mp_residual_balance=1.0), r"mp_residual_balance=1.0 must be in \(0, 1\)"),
    ],
)
def test_options_that_break_magnitude_preservation_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        GPT2AccelConfig(**{**MP, **overrides})
    keys = {**MP, **overrides}
    with pytest.raises(RecipeError, match=message):  # at recipe load, before any data or weights
        build_recipe(keys)
    # GPT-2's defaults (bias, LayerNorm gains) are the first thing a bare magnitude_preserving=True meets
    with pytest.raises(ValueError, match="Set bias=False"):
        GPT2AccelConfig(magnitude_preserving=True)


def test_sharded_modes_are_refused_before_any_step():
    model = mp_model()
    opt = torch.optim.AdamW(model.parameters())
    for mode, name in (("DEEPSPEED", "DeepSpeed"), ("FSDP", "FSDP")):
        with pytest.raises(RecipeError, match=f"magnitude_preserving=True cannot run under {name}.*ddp.yaml"):
            attach_forced_weight_norm(model, opt, mode)
    plain = GPT2AccelForCausalLM(tiny_config())
    attach_forced_weight_norm(
        plain, torch.optim.AdamW(plain.parameters()), "DEEPSPEED"
    )  # nothing to constrain


def test_inverse_sqrt_schedule_is_edm2s():
    args = TrainingArguments(
        learning_rate=0.01, warmup_steps=10, lr_scheduler_type="inverse_sqrt", inverse_sqrt_timescale=40
    )
    for step in (0, 9, 10, 39, 40, 159, 1000):
        t = step + 1
        expect = 0.01 * t / 10 if step < 10 else 0.01 / math.sqrt(max(t / 40, 1))
        assert lr_at(step, args, 2000) == pytest.approx(expect, rel=1e-12)
    default = TrainingArguments(learning_rate=0.01, warmup_steps=10, lr_scheduler_type="inverse_sqrt")
    assert lr_at(39, default, 100) == pytest.approx(0.01 / 2)  # t_ref = warmup_steps: t = 40 = 4 t_ref
    with pytest.raises(RecipeError, match="inverse_sqrt_timescale must be"):
        build_recipe({"lr_scheduler_type": "inverse_sqrt", "inverse_sqrt_timescale": 0})


TRAIN = dict(n_layer=2, n_head=2, n_embd=32, n_positions=32, per_device_train_batch_size=4, max_steps=4,
             max_eval_samples=8, per_device_eval_batch_size=8, dataloader_num_workers=0, warmup_steps=1,
             eval_steps=0, save_steps=0, logging_steps=1, optim="muon", muon_learning_rate=0.05,
             learning_rate=0.02, **MP)  # fmt: skip


def test_real_trainer_steps_renormalise_and_the_saved_model_reloads_exactly(tmp_path):
    from transformers import AutoModelForCausalLM

    from gpt2_accel.trainer import Trainer, TrainerCallback

    before = []

    class Initial(TrainerCallback):
        def on_train_begin(self, trainer) -> None:
            before.extend(w.detach().clone() for w in forced_weight_norm_params(trainer.model))

    run = tmp_path / "run"
    trainer = Trainer(**TRAIN, output_dir=str(run), callbacks=[Initial()])
    trainer.train()
    after = forced_weight_norm_params(trainer.model)
    assert len(after) == 2 * 4 + 2  # 4 matrices per block, wte (tied with lm_head) and wpe
    for w0, w in zip(before, after, strict=True):
        # Muon's and AdamW's updates move every row off the unit sphere; the hook put each back
        assert not torch.equal(w0, w)
        torch.testing.assert_close(_row_rms(w), torch.full((w.shape[0],), 1 / (1 + EPS)), rtol=0, atol=1e-5)
    rms = _hidden_rms(trainer.model.eval(), input_ids=torch.randint(0, 1000, (4, 32)))
    assert all(0.7 < r < 1.3 for r in rms), rms  # trained on Shakespeare with Muon: still unit scale
    saved = AutoModelForCausalLM.from_pretrained(run).eval()
    assert saved.config.magnitude_preserving
    ids = torch.randint(0, 1000, (2, 32))
    with torch.no_grad():
        assert torch.equal(saved(ids).logits, trainer.model.eval()(ids).logits)


def test_bf16_mixed_precision_forward_and_training(tmp_path):
    # Under autocast the blocks' branches come back in bf16 while the residual stream stays fp32; mp_sum must blend
    # the two (it once raised "expected dtype float for `end`", seen on a GPU with bf16: true).
    from gpt2_accel.trainer import Trainer

    model = mp_model(mlp_type="swiglu", position_embedding_type="rope", norm_type="rmsnorm")
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(ids).logits.float()
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()  # bf16 rounding, not another function
    from accelerate.state import AcceleratorState

    run = tmp_path / "run"
    # Accelerate keeps one process-wide state, and this worker may have trained in fp32 already: start afresh,
    # and leave it fresh for the next test (accelerate's own tests reset it the same way)
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        Trainer(**TRAIN, bf16=True, output_dir=str(run)).train()
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == TRAIN["max_steps"] and all(math.isfinite(x) for x in losses)


@pytest.mark.slow
def test_two_processes_equal_one_process_with_accumulation(tmp_path):
    import numpy as np
    from test_distributed import ROOT, _launch, _logits, _losses, _run

    # test_distributed's data: the bundled Shakespeare as uint16 byte tokens
    text = (ROOT / "gpt2_accel" / "assets" / "data" / "shakespeare.txt").read_bytes()[:100_000]
    ids = np.frombuffer(text, dtype=np.uint8).astype(np.uint16)
    ids[:90_000].tofile(tmp_path / "train.bin")
    ids[90_000:].tofile(tmp_path / "val.bin")
    keys = ["--magnitude_preserving=true", "--bias=false", "--norm_elementwise_affine=false", "--optim=muon",
            "--save_steps=0"]  # fmt: skip
    ref, run = tmp_path / "ref", tmp_path / "ddp2"
    _run(_launch("cpu.yaml", 1, tmp_path / "train.bin", ref, "--gradient_accumulation_steps=2", *keys))
    _run(_launch("cpu.yaml", 2, tmp_path / "train.bin", run, *keys))
    a, b = _losses(run), _losses(ref)
    assert a.keys() == b.keys() and len(a) == 10
    for (
        k
    ) in a:  # Muon's Newton-Schulz amplifies the all-reduce's summation-order differences (test_distributed)
        assert a[k] == pytest.approx(b[k], abs=2e-3), (k, a[k], b[k])
    torch.testing.assert_close(_logits(run), _logits(ref), rtol=0, atol=5e-3)
    sums = json.loads((run / "run_info.json").read_text())["replica_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]  # both ranks re-normalised identically


def test_resume_continues_bitwise(tmp_path, caplog):
    from safetensors.torch import load_file

    from gpt2_accel.trainer import Trainer

    keys = {**TRAIN, "save_steps": 2}
    Trainer(**keys, output_dir=str(tmp_path / "straight")).train()
    Trainer(**{**keys, "max_steps": 2}, output_dir=str(tmp_path / "resumed")).train()
    with caplog.at_level("INFO", logger="gpt2_accel"):
        Trainer(
            **keys, output_dir=str(tmp_path / "resumed")
        ).train()  # resume_from_checkpoint=auto: steps 3-4
    assert "resumed from" in caplog.text and "at step 2" in caplog.text
    a = load_file(tmp_path / "straight" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and "lm_head.gain" in a
    for k in a:
        assert torch.equal(a[k], b[k]), k
