"""Distributed set-up checks.

- :func:`launch_request` / :func:`check_world`: what ``accelerate launch`` (or torchrun) was asked for, compared with
  the world Accelerate actually built. A launch that silently falls back (``--cpu --num_processes 2`` runs ONE
  process; an FSDP config on a machine without GPUs runs DDP) would train N independent models that all write as
  rank 0, so the trainer refuses it with :class:`DistributedSetupError`.
- :func:`expected_shapes`: the full parameter shapes an export must have (a sharded state dict is refused).

Accelerate applies FSDP2 and DeepSpeed from the launch config; the FSDP2 helpers the tests use to exercise the same
code paths on CPU over gloo are in tests/fsdp2.py.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from typing import Any

import torch


class DistributedSetupError(RuntimeError):
    """The world Accelerate built is not the one the launch asked for."""


# ---------------------------------------------------------------------------------------------------------------
# what the launch asked for
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class LaunchRequest:
    """The parts of a launch that decide the world: total processes, machines, and the parallelism kind."""

    num_processes: int | None = None  # total over all machines, as `accelerate launch --num_processes` counts
    num_machines: int | None = None
    mode: str | None = (
        None  # "cpu" (one process: --cpu), "deepspeed", "fsdp", "multi" (DDP), or None: unknown
    )
    use_cpu: bool = False  # the config's use_cpu / --cpu: train on CPU over gloo even if GPUs exist
    source: str = ""  # where it was read from, for error messages


def _parent_cmdline() -> list[str] | None:
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:  # not Linux, or no permission: fall back to the environment alone
        return None


def _accelerate_args(cmdline: list[str]) -> list[str] | None:
    """The arguments of an ``accelerate launch`` command line (``accelerate launch ...`` or ``-m ...launch``)."""
    for i, arg in enumerate(cmdline):
        if arg == "accelerate.commands.launch" or (
            arg == "launch" and i > 0 and os.path.basename(cmdline[i - 1]).startswith("accelerate")
        ):
            return cmdline[i + 1 :]
    return None


def parse_accelerate_launch(args: list[str]) -> LaunchRequest:
    """A :class:`LaunchRequest` from ``accelerate launch`` arguments and the config file they name (or default)."""
    from accelerate.commands.config.config_args import default_config_file, load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    ns, _ = launch_command_parser().parse_known_args(args)
    cfg_file = ns.config_file or (default_config_file if os.path.isfile(default_config_file) else None)
    cfg: dict[str, Any] = {}
    if cfg_file is not None and os.path.isfile(cfg_file):
        cfg = load_config_from_file(cfg_file).to_dict()
    dist = str(cfg.get("distributed_type", "")).split(".")[-1].upper()
    n = ns.num_processes if ns.num_processes is not None else cfg.get("num_processes")
    machines = ns.num_machines if ns.num_machines is not None else cfg.get("num_machines")
    if ns.cpu:  # accelerate's launcher then starts ONE process whatever --num_processes says
        mode = "cpu"
    elif ns.use_deepspeed or dist == "DEEPSPEED":
        mode = "deepspeed"
    elif ns.use_fsdp or dist == "FSDP":
        mode = "fsdp"
    elif ns.multi_gpu or dist.startswith("MULTI_"):
        mode = "multi"
    else:
        mode = None
    return LaunchRequest(
        num_processes=int(n) if n is not None and int(n) > 0 else None,
        num_machines=int(machines) if machines else None,
        mode=mode,
        use_cpu=bool(ns.cpu or cfg.get("use_cpu", False)),
        source="accelerate launch " + shlex.join(args[:12]) + (" ..." if len(args) > 12 else ""),
    )


def launch_request() -> LaunchRequest:
    """What this process was launched for: ``accelerate launch`` arguments (read from the parent process, which
    is the launcher for single-node launches) completed by the environment torchrun/Accelerate set."""
    args = _accelerate_args(_parent_cmdline() or [])
    req = parse_accelerate_launch(args) if args is not None else LaunchRequest(source="environment")
    if "WORLD_SIZE" in os.environ and req.mode != "cpu":
        req.num_processes = int(os.environ["WORLD_SIZE"])
    env = {k: os.environ.get(k, "").lower() in ("1", "true", "yes") for k in
           ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_CPU")}  # fmt: skip
    if env["ACCELERATE_USE_DEEPSPEED"]:
        req.mode = "deepspeed"
    elif env["ACCELERATE_USE_FSDP"]:
        req.mode = "fsdp"
    req.use_cpu = req.use_cpu or env["ACCELERATE_USE_CPU"]
    if req.num_machines is None and "GROUP_WORLD_SIZE" in os.environ:  # torchrun's number of nodes
        req.num_machines = int(os.environ["GROUP_WORLD_SIZE"])
    return req


def check_world(req: LaunchRequest, num_processes: int, distributed_type: str) -> None:
    """Raise :class:`DistributedSetupError` unless Accelerate's world is the one ``req`` asked for."""
    dist = str(distributed_type).split(".")[-1].upper()
    asked = req.num_processes or 1
    where = f" (asked by: {req.source})" if req.source else ""
    if req.mode == "cpu" and (req.num_processes or 1) > 1:
        raise DistributedSetupError(
            f"`accelerate launch --cpu --num_processes {req.num_processes}` starts ONE process (Accelerate's "
            "simple launcher), which would train alone while believing it is one of many. For multi-process "
            "training on CPU use `--config_file accelerate_configs/cpu.yaml --num_processes N` (no --cpu)"
        )
    if num_processes != asked:
        raise DistributedSetupError(
            f"the launch asked for {asked} process(es){where} but Accelerate built a world of {num_processes} "
            f"(distributed_type={dist}): each process would train its own model. On CPU use "
            "accelerate_configs/cpu.yaml; check --num_processes (the TOTAL over machines), --num_machines and "
            "the launch config"
        )
    want = {"deepspeed": ("DEEPSPEED",), "fsdp": ("FSDP",)}.get(req.mode or "")
    if want is not None and dist not in want:
        hint = (
            "Accelerate's FSDP needs GPUs; on CPU test with accelerate_configs/cpu.yaml (DDP), or torch's "
            "fully_shard under torch.distributed without Accelerate (as tests/fsdp2.py does)"
            if req.mode == "fsdp"
            else "install deepspeed (pip install 'gpt2_accel[deepspeed]') and launch with a deepspeed_zero*.yaml"
        )
        raise DistributedSetupError(
            f"the launch config asks for {want[0]} but Accelerate runs {dist}{where}. {hint}"
        )
    if want is None and num_processes > 1 and not dist.startswith("MULTI_"):
        raise DistributedSetupError(
            f"{num_processes} processes but distributed_type={dist}: the processes would not synchronise "
            "gradients. Use accelerate_configs/ddp.yaml (GPUs) or cpu.yaml (CPU)"
        )


def wants_cpu(req: LaunchRequest) -> bool:
    """Whether to build ``Accelerator(cpu=True)``: asked for (use_cpu, --cpu), or a multi-process DDP launch on a
    machine without an accelerator. Accelerate's torchrun launcher does not pass the config's ``use_cpu`` on, and
    without ``cpu=True`` Accelerate sees no GPU and quietly builds a one-process world. DeepSpeed must NOT get it:
    it runs on CPU over gloo by itself (``cpu=True`` would turn it off)."""
    if req.mode == "deepspeed":
        return False
    return req.use_cpu or ((req.num_processes or 1) > 1 and not _has_accelerator())


def _has_accelerator() -> bool:
    accel = getattr(torch, "accelerator", None)
    return accel.is_available() if accel is not None else torch.cuda.is_available()


def process_group_backend(req: LaunchRequest) -> str | None:
    """``"gloo"`` for DeepSpeed on a machine without an accelerator (Accelerate would otherwise start no process
    group at all and train each rank alone); None (Accelerate's choice: nccl, gloo for cpu=True...) otherwise."""
    if req.mode == "deepspeed" and not _has_accelerator():
        return "gloo"
    return None


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every parameter name of a GPT2AccelForCausalLM of ``config`` with its full (unsharded) shape."""
    from .modeling_gpt2_accel import GPT2AccelForCausalLM

    with torch.device("meta"):
        model = GPT2AccelForCausalLM(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}
