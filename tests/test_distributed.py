"""Distributed training on CPU: the launch checks, 2 processes == 1 process with accumulation, two "machines",
DeepSpeed ZeRO-1/2/3 (+ offload), FSDP2 (wrap policy, sharded save/load, consolidation) and the model export.

Every run uses a character-level GPT-2 (vocabulary 257, 2 layers, 32 wide) on the bundled Shakespeare written as a
nanoGPT ``train.bin``: pre-tokenized windows are drawn in an order that depends only on the seed, so a global batch
is the same set of windows whatever the number of processes (gpt2_accel/data.py, ``_TokenStream``).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import free_port
from fsdp2 import consolidate_checkpoint

from gpt2_accel.parallel import (
    DistributedSetupError,
    LaunchRequest,
    check_world,
    parse_accelerate_launch,
    wants_cpu,
)

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "demo.yaml"
CONFIGS = ROOT / "accelerate_configs"
TIMEOUT = 240  # every launched process gets one: a rare gloo exit hang was seen
TINY = [
    "--tokenizer_name=char",
    "--n_layer=2",
    "--n_head=2",
    "--n_embd=32",
    "--n_positions=32",
    "--per_device_eval_batch_size=8",
    "--max_eval_samples=16",
    "--dataloader_num_workers=0",
    "--warmup_steps=2",
    "--max_steps=10",
    "--logging_steps=1",
    "--eval_steps=0",
    "--save_steps=5",
    "--per_device_train_batch_size=2",
]
LOSS_TOL = 2e-5  # fp32: summation order differs between all-reduce and accumulation


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env.update(extra)
    return env


def _launch(config: str, n: int, data: Path, out: Path, *args: str, port: int | None = None,
            machines: tuple[int, int] | None = None) -> list[str]:  # fmt: skip
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
           "--num_processes", str(n), "--main_process_port", str(port or free_port())]  # fmt: skip
    if machines is not None:
        cmd += ["--num_machines", str(machines[0]), "--machine_rank", str(machines[1])]
    return [
        *cmd,
        "-m",
        "gpt2_accel.train",
        str(DEMO),
        f"--dataset_name={data}",
        *TINY,
        f"--output_dir={out}",
        *args,
    ]


def _run(cmd: list[str], env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess:
    """Run ``cmd`` (with ``_env()``, or ``env`` when given) under the timeout; assert it succeeded."""
    env = _env() if env is None else env
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT, **kw)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _wait_all(procs: list[subprocess.Popen]) -> list[str]:
    """Wait for every process (each under the timeout), kill stragglers, assert they all succeeded."""
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=TIMEOUT)[0])
        finally:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    return outs


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _assert_same_losses(a: dict[int, float], b: dict[int, float]) -> None:
    assert a.keys() == b.keys() and len(a) >= 5, (a, b)
    for k in a:
        assert a[k] == pytest.approx(b[k], abs=LOSS_TOL), (k, a[k], b[k])


def _logits(model_dir: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    import gpt2_accel  # noqa: F401  (registers the Auto classes)

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.arange(2 * 16).reshape(2, 16) * 7 % 257  # (2, 16), any fixed tokens
    with torch.no_grad():
        return model(ids).logits


def _assert_complete_export(model_dir: Path) -> None:
    """A single-process-loadable model: every weight present with its full shape, lm_head tied to wte."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import gpt2_accel  # noqa: F401

    sd = load_file(model_dir / "model.safetensors")
    assert all(v.numel() > 0 for v in sd.values())
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
    assert sd["transformer.wte.weight"].shape == (model.config.padded_vocab_size, 32)  # full, not a shard


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    """The first 200 kB of the bundled Shakespeare as nanoGPT-style uint16 byte tokens (train.bin + val.bin)."""
    d = tmp_path_factory.mktemp("tokens")
    text = (ROOT / "gpt2_accel" / "assets" / "data" / "shakespeare.txt").read_bytes()[:200_000]
    ids = np.frombuffer(text, dtype=np.uint8).astype(np.uint16)
    ids[:180_000].tofile(d / "train.bin")
    ids[180_000:].tofile(d / "val.bin")
    return d / "train.bin"


@pytest.fixture(scope="module")
def reference(tokens, tmp_path_factory) -> Path:
    """One process, per-device batch 2, gradient accumulation 2: the global batch of 4 windows per step."""
    out = tmp_path_factory.mktemp("ref") / "run"
    _run(_launch("cpu.yaml", 1, tokens, out, "--gradient_accumulation_steps=2"))
    return out


# ---------------------------------------------------------------------------------------------------------------
# the launch checks
# ---------------------------------------------------------------------------------------------------------------
def test_launch_configs_parse_to_what_they_say():
    cases = {
        "cpu.yaml": ("multi", True),
        "ddp.yaml": ("multi", False),
        "ddp_multinode.yaml": ("multi", False),
        "fsdp.yaml": ("fsdp", False),
        "deepspeed_zero1.yaml": ("deepspeed", False),
        "deepspeed_zero2.yaml": ("deepspeed", False),
        "deepspeed_zero3.yaml": ("deepspeed", False),
        "deepspeed_zero3_offload.yaml": ("deepspeed", False),
    }
    for name, (mode, cpu) in cases.items():
        text = (CONFIGS / name).read_text()
        assert text.startswith("#"), f"{name} needs a header comment saying when to use it"
        req = parse_accelerate_launch(["--config_file", str(CONFIGS / name), "--num_processes", "4", "x.py"])
        assert (req.mode, req.use_cpu, req.num_processes) == (mode, cpu, 4), name
    req = parse_accelerate_launch(["--cpu", "--num_processes", "2", "-m", "gpt2_accel.train", "r.yaml"])
    assert req.mode == "cpu" and req.num_processes == 2


def test_check_world_refuses_every_silent_fallback():
    check_world(LaunchRequest(num_processes=2, mode="multi"), 2, "MULTI_CPU")  # what cpu.yaml gives
    check_world(LaunchRequest(num_processes=2, mode="deepspeed"), 2, "DistributedType.DEEPSPEED")
    check_world(LaunchRequest(), 1, "NO")  # python -m gpt2_accel.train / a notebook
    with pytest.raises(
        DistributedSetupError, match=r"--cpu --num_processes 2` starts ONE process.*cpu\.yaml"
    ):
        check_world(LaunchRequest(num_processes=2, mode="cpu"), 1, "NO")
    with pytest.raises(DistributedSetupError, match=r"asked for 2 process\(es\).*world of 1.*own model"):
        check_world(LaunchRequest(num_processes=2, mode="multi"), 1, "NO")
    with pytest.raises(
        DistributedSetupError, match=r"asks for FSDP but Accelerate runs MULTI_CPU.*needs GPUs"
    ):
        check_world(LaunchRequest(num_processes=2, mode="fsdp"), 2, "MULTI_CPU")
    with pytest.raises(
        DistributedSetupError, match=r"asks for DEEPSPEED but Accelerate runs NO.*install deepspeed"
    ):
        check_world(LaunchRequest(num_processes=1, mode="deepspeed"), 1, "NO")
    with pytest.raises(DistributedSetupError, match=r"distributed_type=XLA.*not synchronise"):
        check_world(LaunchRequest(num_processes=2), 2, "XLA")
    # cpu.yaml's use_cpu reaches the trainer although Accelerate's torchrun launcher drops it; DeepSpeed never gets it
    assert wants_cpu(LaunchRequest(num_processes=1, mode="multi", use_cpu=True))
    assert not wants_cpu(LaunchRequest(num_processes=2, mode="deepspeed", use_cpu=True))


@pytest.mark.parametrize(
    ("launch", "message"),
    [
        (
            ["--cpu"],
            "starts ONE process",
        ),  # Accelerate's simple launcher: one process whatever --num_processes
        (["--config_file", str(CONFIGS / "fsdp.yaml")], "asks for FSDP but Accelerate runs MULTI_CPU"),
    ],
    ids=["cpu_flag", "fsdp_without_gpus"],
)
def test_a_launch_that_would_fall_back_fails_with_a_clear_error(launch, message, tokens, tmp_path):
    if "fsdp.yaml" in launch[-1] and torch.cuda.is_available():
        pytest.skip("FSDP really runs on this machine")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch, "--num_processes", "2",
           "--main_process_port", str(free_port()), "-m", "gpt2_accel.train", str(DEMO),
           f"--dataset_name={tokens}", *TINY, f"--output_dir={out}"]  # fmt: skip
    proc = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode != 0
    assert "DistributedSetupError" in proc.stderr and message in proc.stderr, proc.stderr[-3000:]
    assert "accelerate_configs/cpu.yaml" in proc.stderr  # the fix is named
    assert not (out / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------------------------
# DDP over gloo
# ---------------------------------------------------------------------------------------------------------------
def test_two_processes_equal_one_process_with_accumulation_and_resume_on_one(tokens, reference, tmp_path):
    run = tmp_path / "ddp2"
    proc = _run(_launch("cpu.yaml", 2, tokens, run))
    log = proc.stdout + proc.stderr
    assert "distributed_type=MULTI_CPU processes=2 machines=1 mixed_precision=no" in log
    info = json.loads((run / "run_info.json").read_text())
    assert info["world_size"] == 2
    # same global batch (2 x 2 == 1 x 2 x 2), same windows: the same losses, step by step
    _assert_same_losses(_losses(run), _losses(reference))
    torch.testing.assert_close(_logits(run), _logits(reference), rtol=0, atol=1e-4)
    _assert_complete_export(run)
    _assert_complete_export(run / "checkpoints" / "step_00000010" / "model")

    # the 2-process checkpoint of step 5 resumes on ONE process (accumulation 2 keeps the global batch)
    resumed = tmp_path / "resumed"
    shutil.copytree(run / "checkpoints" / "step_00000005", resumed / "checkpoints" / "step_00000005")
    shutil.copy(run / "metrics.jsonl", resumed / "metrics.jsonl")
    _run(
        _launch(
            "cpu.yaml", 1, tokens, resumed, "--gradient_accumulation_steps=2", "--resume_from_checkpoint=auto"
        )
    )
    _assert_same_losses(_losses(resumed), _losses(run))
    torch.testing.assert_close(_logits(resumed), _logits(run), rtol=0, atol=1e-4)


@pytest.mark.slow
def test_two_machines_on_localhost_stay_in_sync(tokens, reference, tmp_path):
    port, run = free_port(), tmp_path / "run"  # one output_dir: multi-node runs need a shared filesystem
    procs = [
        subprocess.Popen(_launch("ddp_multinode.yaml", 2, tokens, run, port=port, machines=(2, rank)),
                         env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)
    ]  # fmt: skip
    outs = _wait_all(procs)
    assert "processes=2 machines=2" in outs[0]
    _assert_same_losses(_losses(run), _losses(reference))
    # the two machines end with the same weights (a checksum of every rank's replica, gathered at the end)
    sums = json.loads((run / "run_info.json").read_text())["replica_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]
    torch.testing.assert_close(_logits(run), _logits(reference), rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# FSDP2 (torch fully_shard over gloo: Accelerate's FSDP needs GPUs, these are the same code paths)
# ---------------------------------------------------------------------------------------------------------------
FSDP_WORKER = textwrap.dedent(
    """
    import json, os, sys
    import torch, torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.fsdp import FSDPModule
    from gpt2_accel import GPT2AccelConfig, GPT2AccelForCausalLM
    from fsdp2 import apply_fsdp, export_full_model, full_state_dict, load_sharded, save_sharded  # tests/fsdp2.py

    mode, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = GPT2AccelConfig(vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    torch.manual_seed(0)
    model = GPT2AccelForCausalLM(cfg)
    ref = GPT2AccelForCausalLM(cfg)
    ref.load_state_dict(model.state_dict())  # the unsharded reference, same init
    batches = torch.randint(0, 128, (6, 4, 17), generator=torch.Generator().manual_seed(1))  # (steps, B, T + 1)

    def step(m, opt, batch):
        loss = F.cross_entropy(m(input_ids=batch[:, :-1]).logits.flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.detach()

    def global_loss(loss):  # the mean over ranks of equal-size shards = the loss of the whole batch
        dist.all_reduce(loss)
        return (loss / world).item()

    if mode == "train":
        apply_fsdp(model)
        assert all(isinstance(b, FSDPModule) for b in model.transformer.h) and isinstance(model, FSDPModule)
        assert not isinstance(model.transformer.wte, FSDPModule)  # the tied weight lives in the root unit
        assert model.lm_head.weight is model.transformer.wte.weight
        assert model.transformer.h[0].attn.c_attn.weight.to_local().shape[0] == 3 * 32 // world  # dim-0 shards
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
        losses, ref_losses = [], []
        for i in range(4):
            per_rank = batches[i].chunk(world)[rank]
            losses.append(global_loss(step(model, opt, per_rank)))
            ref_losses.append(step(ref, ref_opt, batches[i]).item())
        save_sharded(os.path.join(out, "ckpt"), model, opt)
        full = full_state_dict(model)
        more = [global_loss(step(model, opt, batches[i].chunk(world)[rank])) for i in (4, 5)]
        if rank == 0:
            ref_full = ref.state_dict()
            err = max((full[k] - ref_full[k]).abs().max().item() for k in ref_full)
            export_full_model(cfg, full, os.path.join(out, "export"))
            torch.save(full, os.path.join(out, "full_state.pt"))
            json.dump({"losses": losses, "ref_losses": ref_losses, "more": more, "err": err,
                       "keys": sorted(full)}, open(os.path.join(out, "train.json"), "w"))
    else:  # resume the sharded checkpoint in this world (any size) and take the same two steps
        torch.manual_seed(123)
        model = GPT2AccelForCausalLM(cfg)  # other weights: all of them must come from the checkpoint
        apply_fsdp(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        load_sharded(os.path.join(out, "ckpt"), model, opt)
        more = [global_loss(step(model, opt, batches[i].chunk(world)[rank])) for i in (4, 5)]
        if rank == 0:
            json.dump({"more": more}, open(os.path.join(out, f"resume{world}.json"), "w"))
    dist.barrier()
    dist.destroy_process_group()
    """
)


class _CreatesFile:
    """Unpickling this creates ``path`` (what a poisoned checkpoint would do with os.system instead)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _torch_dist(script: Path, world: int, *args: str) -> None:
    port = str(free_port())
    procs = [
        subprocess.Popen([sys.executable, str(script), *args], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True,
                         env=_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(r), WORLD_SIZE=str(world),
                                  LOCAL_RANK=str(r), PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")])))
        for r in range(world)
    ]  # fmt: skip
    _wait_all(procs)


def test_fsdp2_wrap_sharded_save_load_across_world_sizes_and_consolidation(tmp_path):
    script = tmp_path / "fsdp_worker.py"
    script.write_text(FSDP_WORKER)
    _torch_dist(script, 2, "train", str(tmp_path))
    res = json.loads((tmp_path / "train.json").read_text())
    # sharded training == the unsharded model on the whole batch
    np.testing.assert_allclose(res["losses"], res["ref_losses"], rtol=0, atol=1e-5)
    # AdamW's first steps divide each gradient by its own magnitude, which turns fp32 reduction-order noise on
    # near-zero gradients into weight differences of up to ~lr * 1e-2
    assert res["err"] < 2e-4
    # the 2-rank checkpoint resumes on 1 rank (DCP reshards): the next two losses are those of the 2-rank run
    _torch_dist(script, 1, "resume", str(tmp_path))
    np.testing.assert_allclose(
        json.loads((tmp_path / "resume1.json").read_text())["more"], res["more"], atol=1e-5
    )
    # consolidation without a process group: the 2 ranks' shards make the full model of step 4
    gathered = torch.load(tmp_path / "full_state.pt")  # full_state_dict() of the sharded model at step 4
    offline = consolidate_checkpoint(tmp_path / "ckpt")
    assert set(offline) >= set(gathered) - {"lm_head.weight"}
    for k in offline:
        assert torch.equal(offline[k], gathered[k]), k
    # DCP unpickles .metadata with plain pickle: a poisoned one is refused before it is read, its payload never runs
    from gpt2_accel.checkpoint import CheckpointError

    poisoned, marker = tmp_path / "poisoned", tmp_path / "pwned"
    shutil.copytree(tmp_path / "ckpt", poisoned)
    (poisoned / ".metadata").write_bytes(pickle.dumps(_CreatesFile(marker)))
    with pytest.raises(CheckpointError, match=r"\.metadata would import io\.open"):
        consolidate_checkpoint(poisoned)
    assert not marker.exists()
    # the export from the gathered state loads in one process, with the tied head, and gives the same logits
    from transformers import AutoModelForCausalLM

    import gpt2_accel  # noqa: F401
    from gpt2_accel import GPT2AccelConfig, GPT2AccelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert exported.lm_head.weight.data_ptr() == exported.transformer.wte.weight.data_ptr()
    plain = GPT2AccelForCausalLM(
        GPT2AccelConfig(vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    )
    plain.load_state_dict(gathered)
    ids = torch.arange(32).reshape(2, 16) % 128
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, plain.eval()(ids).logits, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO on CPU (gloo)
# ---------------------------------------------------------------------------------------------------------------
def _zero_checkpoint_logits(state_dir: Path, model_dir: Path) -> torch.Tensor:
    """Logits of the weights DeepSpeed itself saved (its shards merged by its own zero_to_fp32), in our model."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from gpt2_accel import GPT2AccelConfig, GPT2AccelForCausalLM

    sd = get_fp32_state_dict_from_zero_checkpoint(str(state_dir))
    model = GPT2AccelForCausalLM(GPT2AccelConfig.from_pretrained(model_dir))
    model.load_state_dict(sd, strict=False)
    model.tie_weights()
    ids = torch.arange(2 * 16).reshape(2, 16) * 7 % 257
    with torch.no_grad():
        return model.eval()(ids).logits


@pytest.mark.slow
@pytest.mark.parametrize("config", ["deepspeed_zero1.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml"])
@pytest.mark.usefixtures("deepspeed_ops")
def test_deepspeed_zero_trains_like_ddp_exports_and_resumes(config, tokens, reference, tmp_path):
    pytest.importorskip("deepspeed")
    run = tmp_path / "run"
    # ZeRO-3 gathers parameters in every forward: with 13 validation windows at batch 2, rank 0 makes 4 forward
    # passes and rank 1 makes 3, so evaluation must pad the shorter shard or the run hangs
    uneven = ["--max_eval_samples=13", "--per_device_eval_batch_size=2"] if "zero3" in config else []
    proc = _run(_launch(config, 2, tokens, run, *uneven))
    assert "distributed_type=DEEPSPEED processes=2" in proc.stdout + proc.stderr
    assert np.isfinite(json.loads((run / "eval_results.json").read_text())["val_loss"])
    # our batch / accumulation / clipping reached DeepSpeed: same global batch, same clipped updates as DDP
    _assert_same_losses(_losses(run), _losses(reference))
    ckpt10 = run / "checkpoints" / "step_00000010"
    assert (ckpt10 / "state" / "pytorch_model").is_dir()  # DeepSpeed's own (sharded) checkpoint
    # the exports are complete (ZeRO-3: gathered) and equal the weights DeepSpeed saved
    for export in (run, ckpt10 / "model"):
        _assert_complete_export(export)
    torch.testing.assert_close(_logits(ckpt10 / "model"), _zero_checkpoint_logits(ckpt10 / "state", run), rtol=0,
                               atol=1e-6)  # fmt: skip
    torch.testing.assert_close(_logits(run), _logits(reference), rtol=0, atol=1e-4)
    if config != "deepspeed_zero3.yaml":
        return
    resumed = tmp_path / "resumed"
    shutil.copytree(run / "checkpoints" / "step_00000005", resumed / "checkpoints" / "step_00000005")
    shutil.copy(run / "metrics.jsonl", resumed / "metrics.jsonl")
    _run(_launch(config, 2, tokens, resumed, *uneven, "--resume_from_checkpoint=auto"))
    _assert_same_losses(_losses(resumed), _losses(run))
    torch.testing.assert_close(_logits(resumed), _logits(run), rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.usefixtures("deepspeed_ops")
def test_deepspeed_zero3_cpu_offload_trains_like_ddp(tokens, reference, tmp_path):
    pytest.importorskip("deepspeed")
    run = tmp_path / "run"
    _run(
        _launch("deepspeed_zero3_offload.yaml", 2, tokens, run, "--save_steps=0")
    )  # DeepSpeedCPUAdam (compiled)
    _assert_same_losses(_losses(run), _losses(reference))
    _assert_complete_export(run)
    torch.testing.assert_close(_logits(run), _logits(reference), rtol=0, atol=1e-4)


MODERN = [  # every modern block option at once (docs/architecture.md)
    "--position_embedding_type=rope",
    "--norm_type=rmsnorm",
    "--mlp_type=swiglu",
    "--n_kv_head=1",
    "--qk_norm=true",
    "--sliding_window=8",
    "--layer_types=sliding_attention,full_attention",
    "--attention_sinks=true",
    "--tie_word_embeddings=false",
    "--final_logit_softcapping=15",
]


@pytest.fixture(scope="module")
def modern_reference(tokens, tmp_path_factory) -> Path:
    """The MODERN model on one process with gradient accumulation 2 (the reference of the 2-process runs)."""
    out = tmp_path_factory.mktemp("modern") / "one"
    _run(_launch("cpu.yaml", 1, tokens, out, "--gradient_accumulation_steps=2", *MODERN))
    return out


def test_two_processes_equal_one_process_with_modern_blocks(tokens, modern_reference, tmp_path):
    one = modern_reference
    two = tmp_path / "two"
    proc = _run(_launch("cpu.yaml", 2, tokens, two, *MODERN))
    assert "processes=2" in proc.stdout + proc.stderr
    _assert_same_losses(_losses(two), _losses(one))
    torch.testing.assert_close(_logits(two), _logits(one), rtol=0, atol=1e-4)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(two, trust_remote_code=True)
    assert config.attention_sinks and config.n_kv_head == 1 and not config.tie_word_embeddings


@pytest.mark.slow
@pytest.mark.usefixtures("deepspeed_ops")
def test_deepspeed_zero3_with_modern_blocks_trains_like_one_process(tokens, modern_reference, tmp_path):
    pytest.importorskip("deepspeed")
    one = modern_reference
    run = tmp_path / "zero3"
    uneven = ["--max_eval_samples=13", "--per_device_eval_batch_size=2"]  # see the ZeRO test above
    proc = _run(_launch("deepspeed_zero3.yaml", 2, tokens, run, *uneven, *MODERN))
    assert "distributed_type=DEEPSPEED processes=2" in proc.stdout + proc.stderr
    _assert_same_losses(_losses(run), _losses(one))
    torch.testing.assert_close(
        _logits(run), _logits(one), rtol=0, atol=1e-4
    )  # the gathered export is complete


# ---------------------------------------------------------------------------------------------------------------
# a rank that dies or hangs (docs/reliability.md)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP"])
def test_a_rank_that_dies_or_hangs_ends_the_run_in_bounded_time(tokens, tmp_path, fault):
    import signal
    import time

    import psutil

    run, timeout_s = tmp_path / "run", 20
    cmd = _launch(
        "cpu.yaml",
        2,
        tokens,
        run,
        "--max_steps=1000000",
        "--save_steps=1000000",
        f"--ddp_timeout={timeout_s}",
    )
    proc = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        t0 = time.time()
        while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").stat().st_size):
            assert proc.poll() is None and time.time() - t0 < TIMEOUT, "the run did not start"
            time.sleep(0.2)
        ranks = {}
        for child in psutil.Process(proc.pid).children(recursive=True):
            rank = child.environ().get("RANK")
            if rank is not None and "gpt2_accel.train" in " ".join(child.cmdline()):
                ranks[rank] = child
        ranks["1"].send_signal(getattr(signal, fault))  # a node lost, or a rank stuck (D state, deadlock)
        t0 = time.time()
        out, _ = proc.communicate(timeout=TIMEOUT)
        elapsed = time.time() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode != 0
    # bounded: a dead peer is noticed at once (closed socket), a hung one after ddp_timeout; plus torchrun's teardown
    assert elapsed < timeout_s + 60, elapsed
    assert "another process died, or hung for longer than ddp_timeout=20s" in out
    assert "relaunch the same command to resume" in out


# ---------------------------------------------------------------------------------------------------------------
# Muon (optim=muon): DDP runs it exactly (DeepSpeed ZeRO-1/2: tests/test_muon_deepspeed.py)
# ---------------------------------------------------------------------------------------------------------------
MUON = ["--optim=muon", "--muon_learning_rate=0.02", "--muon_weight_decay=0.01"]


def test_muon_two_processes_equal_one_process_with_accumulation(tokens, reference, tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "ddp2"
    _run(_launch("cpu.yaml", 1, tokens, ref, "--gradient_accumulation_steps=2", *MUON))
    _run(_launch("cpu.yaml", 2, tokens, run, *MUON))
    # Newton-Schulz's five matrix polynomials amplify the all-reduce's fp32 summation-order differences in the
    # gradient, so the tolerance is looser than AdamW's LOSS_TOL
    a, b = _losses(run), _losses(ref)
    assert a.keys() == b.keys() and len(a) == 10
    for k in a:
        assert a[k] == pytest.approx(b[k], abs=2e-3), (k, a[k], b[k])
    torch.testing.assert_close(_logits(run), _logits(ref), rtol=0, atol=5e-3)
    sums = json.loads((run / "run_info.json").read_text())["replica_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]  # the replicas took the same Muon steps
    # the AdamW run on the same data and batches (the module's reference) is a different trajectory: Muon ran
    adamw_loss_10 = _losses(reference)[10]
    assert abs(_losses(ref)[10] - _losses(run)[10]) < abs(_losses(ref)[10] - adamw_loss_10)
