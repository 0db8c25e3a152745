"""Muon under FSDP2 (torch ``fully_shard``, 2 ranks over gloo on CPU) against one process without FSDP.

One launch of 2 ranks runs everything below (tests/fsdp2.py's wrap policy; the optimizer is built BEFORE sharding
and its parameters swapped for the DTensor shards the way Accelerate's FSDP2 ``prepare`` does):

- given the same gradients, two steps == torch.optim.Muon's, bitwise (bf16 and float32 Newton-Schulz);
- 10 steps of Muon + AdamW on FSDP2 shards == 10 steps of the same optimizer in one process on the whole batch;
- the same 10 steps with Newton-Schulz on each rank's rows only, in one process: far off (so the equality above
  is what proves the matrices were orthogonalised whole);
- a DCP checkpoint of the sharded model and optimizer at step 5, resumed into a fresh model: steps 5-9 again,
  bitwise; resumed on 1 rank (a second, 1-process launch; DCP reshards): the same to fp32 rounding;
- 3 steps with torch's own bf16 Newton-Schulz (the GPU path: the matrices travel in bf16).

The model is 33 wide with 3 heads, so every block matrix splits unevenly over the 2 ranks (33 rows: 17 + 16).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import free_port
from test_distributed import ROOT, _wait_all

from gpt2_accel.optim import check_optimizer_mode
from gpt2_accel.recipe import RecipeError, TrainingArguments

WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch, torch.distributed as dist
    import torch.nn.functional as F
    import torch.optim._muon as torch_muon
    from unittest import mock
    from torch.distributed.tensor import DTensor, distribute_tensor
    from gpt2_accel import GPT2AccelConfig, GPT2AccelForCausalLM
    from gpt2_accel.optim import (build_optimizer, check_fsdp2_runs_muon, fsdp2_muon_update, newton_schulz_float32,
                                  set_lr)
    from gpt2_accel.recipe import TrainingArguments
    from fsdp2 import apply_fsdp, full_state_dict, load_sharded, save_sharded  # tests/fsdp2.py

    out, mode = sys.argv[1], sys.argv[2]  # mode: "all" (2 ranks), or "resume" the 2-rank checkpoint in this world
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = GPT2AccelConfig(vocab_size=128, n_positions=32, n_embd=33, n_layer=2, n_head=3)
    STEPS, SAVE_AT = 10, 5
    args = TrainingArguments(optim="muon", learning_rate=3e-3, muon_learning_rate=0.02, muon_weight_decay=0.05,
                             weight_decay=0.1, warmup_steps=2, max_steps=STEPS)
    batches = torch.randint(0, 128, (STEPS, 4, 17), generator=torch.Generator().manual_seed(1))  # (steps, B, T + 1)

    def fresh(seed):
        torch.manual_seed(seed)
        return GPT2AccelForCausalLM(cfg).train()

    def sharded(model, ns_float32=None):
        # the trainer's order: the optimizer is built on the whole model, then Accelerate's FSDP2 prepare shards the
        # model and points the optimizer's groups at the DTensor shards (accelerator.py _prepare_fsdp2 +
        # utils/fsdp_utils.py fsdp2_switch_optimizer_parameters: placeholders that remember the old data_ptr)
        from accelerate.utils.fsdp_utils import fsdp2_switch_optimizer_parameters
        opt = build_optimizer(model, args, "cpu")
        opt.ns_float32 = ns_float32
        opt.load_state_dict(opt.state_dict())  # what AcceleratedOptimizer does first (new group dicts)
        old = {n: p.data_ptr() for n, p in model.named_parameters()}
        for group in opt.param_groups:
            for i, p in enumerate(group["params"]):
                group["params"][i] = torch.empty(1)
                group["params"][i].data_ptr = p.data_ptr()
        apply_fsdp(model)
        fsdp2_switch_optimizer_parameters(opt, {old[n]: p for n, p in model.named_parameters()})
        return model, opt

    def step(model, opt, i, whole=False):
        set_lr(opt, i, args, STEPS)
        batch = batches[i] if whole else batches[i].chunk(world)[rank]
        loss = F.cross_entropy(model(input_ids=batch[:, :-1]).logits.flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if whole:
            return loss.item()
        loss = loss.detach()
        dist.all_reduce(loss)  # the mean over equal-size shards = the loss of the whole batch
        return (loss / world).item()

    def max_diff(a, b):  # over a's keys
        return max((a[k] - b[k]).abs().max().item() for k in a)

    if mode == "resume":  # DCP reshards the Muon momentum like every other sharded tensor
        model, opt = sharded(fresh(123))
        load_sharded(os.path.join(out, "ckpt"), model, opt)
        resumed = [step(model, opt, i) for i in range(SAVE_AT, STEPS)]
        full = full_state_dict(model)
        if rank == 0:
            final = torch.load(os.path.join(out, "final.pt"), weights_only=True)
            json.dump({"resumed": resumed, "err": max_diff(full, final)},
                      open(os.path.join(out, f"resume{world}.json"), "w"))
        dist.destroy_process_group()
        sys.exit()

    res = {}
    # 1) FSDP2: 10 steps, a DCP checkpoint after step 5
    model, opt = sharded(fresh(0))
    res["layout"] = check_fsdp2_runs_muon(opt)
    losses = []
    for i in range(STEPS):
        losses.append(step(model, opt, i))
        if i + 1 == SAVE_AT:
            save_sharded(os.path.join(out, "ckpt"), model, opt)
    full = full_state_dict(model)
    muon_p = [p for g in opt.param_groups if g["use_muon"] for p in g["params"]]
    bufs = [opt.state[p]["momentum_buffer"] for p in muon_p]
    res["bufs_sharded"] = all(isinstance(b, DTensor) and b.to_local().shape == p.to_local().shape
                              for b, p in zip(bufs, muon_p))
    res["local_rows"] = sorted({(tuple(p.shape), p.to_local().shape[0]) for p in muon_p})
    # 2) resume from the checkpoint in a fresh model (other weights): steps 5-9 again
    model2, opt2 = sharded(fresh(123))
    load_sharded(os.path.join(out, "ckpt"), model2, opt2)
    resumed = [step(model2, opt2, i) for i in range(SAVE_AT, STEPS)]
    full2 = full_state_dict(model2)
    # 3) the GPU path: torch's own bf16 Newton-Schulz, the matrices exchanged in bf16
    model3, opt3 = sharded(fresh(0), ns_float32=False)
    bf16_losses = [step(model3, opt3, i) for i in range(3)]
    full3 = full_state_dict(model3)
    # 4) the same gradients into both (no reduce-scatter rounding): FSDP2 Muon == torch.optim.Muon, bitwise, with
    # torch's own bf16 Newton-Schulz and with our float32 one
    exact = {}
    for float32 in (False, True):
        ref4, (model4, opt4) = fresh(0), sharded(fresh(0), ns_float32=float32)
        names = [n for n, p in ref4.named_parameters() if ".h." in n and p.dim() == 2]
        ref_muon = torch.optim.Muon([ref4.get_parameter(n) for n in names], lr=args.muon_learning_rate,
                                    momentum=args.muon_momentum, nesterov=True, weight_decay=args.muon_weight_decay)
        for i in range(2):
            batch = batches[i]
            ref4.zero_grad()
            F.cross_entropy(ref4(input_ids=batch[:, :-1]).logits.flatten(0, 1), batch[:, 1:].flatten()).backward()
            for n in names:
                p = model4.get_parameter(n)
                p.grad = distribute_tensor(ref4.get_parameter(n).grad, p.device_mesh, p.placements)
            fsdp2_muon_update(opt4._muon, float32)
            with mock.patch.object(torch_muon, "_zeropower_via_newtonschulz",
                                   newton_schulz_float32 if float32 else torch_muon._zeropower_via_newtonschulz):
                ref_muon.step()
        bufs = {n: opt4.state[model4.get_parameter(n)]["momentum_buffer"].full_tensor() for n in names}
        exact["float32" if float32 else "bf16"] = (
            all(torch.equal(model4.get_parameter(n).full_tensor(), ref4.get_parameter(n)) for n in names)
            and all(torch.equal(bufs[n], ref_muon.state[ref4.get_parameter(n)]["momentum_buffer"]) for n in names)
        )
    res["exact"] = exact
    # 5) a layout this code cannot reassemble (here: replicated, as tensor parallelism or HSDP would give) is refused
    from torch.distributed.tensor import Replicate
    from gpt2_accel.optim import fsdp2_shard_group
    from gpt2_accel.recipe import RecipeError
    try:
        fsdp2_shard_group([distribute_tensor(torch.zeros(4, 4), model.transformer.h[0].attn.c_attn.weight.device_mesh,
                                             [Replicate()])])
    except RecipeError as e:
        res["refused"] = str(e)

    if rank == 0:
        # the references, one process, no FSDP, the whole batch: our float32 Newton-Schulz on CPU ...
        ref = fresh(0)
        ref_opt = build_optimizer(ref, args, "cpu")
        ref_losses = [step(ref, ref_opt, i, whole=True) for i in range(STEPS)]
        # ... Newton-Schulz on each rank's block of rows alone (what a naive sharded Muon would do) ...
        def blockwise(g, *a):
            return torch.cat([newton_schulz_float32(b, *a) for b in g.chunk(world)])
        local = fresh(0)
        local_opt = build_optimizer(local, args, "cpu")
        with mock.patch("gpt2_accel.optim.newton_schulz_float32", blockwise):
            local_losses = [step(local, local_opt, i, whole=True) for i in range(STEPS)]
        # ... and torch.optim.Muon's own bf16 iteration
        ref3 = fresh(0)
        ref3_opt = build_optimizer(ref3, args, "cpu")
        ref3_opt.ns_float32 = False
        ref3_losses = [step(ref3, ref3_opt, i, whole=True) for i in range(3)]
        ref_sd, local_sd = ref.state_dict(), local.state_dict()
        muon_names = [n for n, p in ref.named_parameters() if ".h." in n and p.dim() == 2]
        res.update(
            losses=losses, ref_losses=ref_losses, local_losses=local_losses, resumed=resumed,
            err=max_diff(full, ref_sd), err_muon=max_diff({n: full[n] for n in muon_names}, ref_sd),
            err_local=max_diff(local_sd, ref_sd),
            resume_bitwise=all(torch.equal(full[k], full2[k]) for k in full),
            err_resume=max_diff(full2, full),
            bf16_losses=bf16_losses, ref3_losses=ref3_losses, err_bf16=max_diff(full3, ref3.state_dict()),
            moved=max_diff(full, {k: v for k, v in fresh(0).state_dict().items()}),
        )
        json.dump(res, open(os.path.join(out, "result.json"), "w"))
        torch.save(full, os.path.join(out, "final.pt"))
    dist.barrier()
    dist.destroy_process_group()
    """
)


def _run_ranks(script: Path, world: int, *args: str) -> None:
    port = str(free_port())
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
               WORLD_SIZE=str(world), PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))  # fmt: skip
    procs = [
        subprocess.Popen([sys.executable, str(script), *args], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)))
        for r in range(world)
    ]  # fmt: skip
    _wait_all(procs)


@pytest.mark.slow  # a 2-rank launch and a 1-rank one: ~30-45 s on 2 loaded cores
def test_fsdp2_muon_equals_one_process_torch_muon_and_resumes_bitwise(tmp_path):
    """Everything from one 2-rank launch (a single test, so xdist never splits it into two launches), then the
    1-rank resume."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    _run_ranks(script, 2, str(tmp_path), "all")
    res = json.loads((tmp_path / "result.json").read_text())
    loss_diff = {k: max(abs(a - b) for a, b in zip(res[k], res[ref], strict=True))
                 for k, ref in (("losses", "ref_losses"), ("bf16_losses", "ref3_losses"))}  # fmt: skip
    # the figures docs/distributed.md quotes
    print({k: v for k, v in res.items() if k.startswith("err")}, loss_diff)
    assert res["layout"].startswith("MuonWithAdamW on 8 matrices sharded over 2 ranks")
    # uneven shards: rank 0 holds 17 of 33 rows, 50 of 99
    assert res["local_rows"] == [[[33, 33], 17], [[33, 132], 17], [[99, 33], 50], [[132, 33], 66]]
    assert res["bufs_sharded"]  # Muon's momentum stays a sharded DTensor, like AdamW's moments
    assert "sharded on dim 0 over one 1-D mesh" in res["refused"] and "(Replicate(),)" in res["refused"]

    # 1) the same gradients handed to both (as DTensor shards / whole): after two steps, the weights and momentum
    # buffers are torch.optim.Muon's to the bit, with its bf16 Newton-Schulz and with our float32 one
    assert res["exact"] == {"bf16": True, "float32": True}

    # 2) 10 steps, 2 ranks FSDP2 == one process on the whole batch, to fp32 rounding (the reduce-scatter sums in
    # another order than one process's backward): Muon matrices ~2e-7, AdamW parameters ~6e-6 (AdamW divides
    # near-zero gradients by their own magnitude, as in test_distributed's FSDP2 test)
    assert res["moved"] > 1e-2  # the weights did train
    assert loss_diff["losses"] < 1e-5
    assert res["err_muon"] < 2e-6 and res["err"] < 5e-5, res

    # 3) Newton-Schulz on each rank's rows alone would be another optimizer, ~1e5 times further away
    assert res["err_local"] > 1e-2
    assert abs(res["local_losses"][-1] - res["ref_losses"][-1]) > 1e-3

    # 4) the DCP checkpoint of step 5, resumed in a fresh model: steps 5-9 again, bitwise
    assert res["resumed"] == res["losses"][5:], (res["resumed"], res["losses"][5:])
    assert res["resume_bitwise"], res["err_resume"]
    # ... and on 1 rank (DCP reshards the momentum buffers): the 2-rank run's losses and weights, to fp32 rounding
    _run_ranks(script, 1, str(tmp_path), "resume")
    one = json.loads((tmp_path / "resume1.json").read_text())
    assert max(abs(a - b) for a, b in zip(one["resumed"], res["losses"][5:], strict=True)) < 1e-5
    assert one["err"] < 5e-5, one["err"]
    print("resumed on 1 rank:", one)

    # 5) torch's own bf16 Newton-Schulz (the GPU path; the matrices travel in bf16): equal to one process up to
    # the bf16 rounding of updates whose inputs differ by fp32 rounding (a flipped last bit, times the lr)
    assert loss_diff["bf16_losses"] < 1e-5
    assert res["err_bf16"] < 3e-3, res["err_bf16"]


def test_muon_under_fsdp_needs_fsdp2_without_offload():
    args = TrainingArguments(optim="muon")
    check_optimizer_mode(args, "fsdp", fsdp_version=2)  # runs (the tests above)
    with pytest.raises(RecipeError, match=r"FSDP version 1.*flat.*Set fsdp_version: 2"):
        check_optimizer_mode(args, "fsdp", " (from accelerate launch ...)", fsdp_version=1)
    with pytest.raises(RecipeError, match=r"fsdp_offload_params: true.*Set fsdp_offload_params: false"):
        check_optimizer_mode(args, "fsdp", fsdp_version=2, offload_params=True)
    check_optimizer_mode(TrainingArguments(), "fsdp", fsdp_version=1)  # AdamW runs under FSDP1


def test_a_muon_that_would_not_see_fsdp2_shards_is_refused_after_prepare():
    """The guard run right after accelerator.prepare under FSDP: Muon matrices that are not FSDP2 shards (the
    parameter swap did not happen) or another optimizer are an error naming the fix, never a per-shard Muon."""
    from conftest import tiny_model

    from gpt2_accel.optim import build_optimizer, check_fsdp2_runs_muon

    model = tiny_model()
    opt = build_optimizer(model, TrainingArguments(optim="muon"), "cpu")
    with pytest.raises(RuntimeError, match=r"MuonWithAdamW over 0/8 sharded Muon matrices.*ddp\.yaml"):
        check_fsdp2_runs_muon(opt)
    adamw = build_optimizer(model, TrainingArguments(), "cpu")
    with pytest.raises(RuntimeError, match=r"optimizer is AdamW"):
        check_fsdp2_runs_muon(adamw)
