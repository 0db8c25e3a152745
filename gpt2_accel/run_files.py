"""The files a run directory holds: their names and their fields, in one place.

The trainer writes them through this module; the model card (hub.py), ``gpt2-accel checkpoints`` and the loss
plot read them through it. Readers accept the files of earlier versions: a missing field takes its default, a field
this version does not know is ignored.

::

    run_dir/
      recipe.yaml                 the resolved recipe (recipe.py)
      metrics.jsonl               one TrainLog or EvalLog per line, appended as the run goes
      eval_results.json           EvalResults of the final evaluation
      run_info.json               RunInfo: what the run did, on what, for how long, under which licence
      checkpoints/step_N/
        trainer_state.json        TrainerState: what a resume needs besides model, optimizer and RNG states
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import torch

from .atomic import atomic_write_text, write_json

RECIPE = "recipe.yaml"
METRICS = "metrics.jsonl"
EVAL_RESULTS = "eval_results.json"
RUN_INFO = "run_info.json"
TRAINER_STATE = "trainer_state.json"


# ---------------------------------------------------------------------------------------------------------------
# metrics.jsonl and eval_results.json
# ---------------------------------------------------------------------------------------------------------------
class TrainLog(TypedDict, total=False):
    """A training line of metrics.jsonl, written every ``logging_steps`` (and at the last step)."""

    step: int  # optimizer steps completed
    loss: float  # mean training loss over the steps since the previous line (all ranks)
    lr: float  # learning rate of the last step
    grad_norm: float | None  # gradient norm before clipping, of the last step
    tokens: int  # tokens trained on so far (all ranks)
    tokens_per_sec: float  # training throughput since the previous line (all ranks)
    mfu: float  # model FLOPs utilisation: tokens_per_sec * flops_per_token / (peak FLOP/s * processes)
    loss_spike: bool  # present (True) when the loss jumped above 1.5x its recent mean
    skipped_steps: int  # present once on_nonfinite=skip has skipped an update


class EvalResults(TypedDict, total=False):
    """An evaluation's results: eval_results.json holds the final one; each metrics.jsonl eval line adds ``step``."""

    val_loss: float  # mean cross-entropy on the validation windows (nats/token)
    val_ppl: float  # exp(val_loss)
    val_tokens: int  # validation tokens scored
    hellaswag_acc: float
    hellaswag_acc_norm: float
    hellaswag_n: int  # HellaSwag examples scored
    lm_eval: dict[str, dict[str, float]]  # lm-evaluation-harness, {task: {metric: value}} (`gpt2-accel eval`)


class EvalLog(EvalResults, total=False):
    """An evaluation line of metrics.jsonl."""

    step: int


def eval_results_of(metrics: dict[str, Any]) -> EvalResults:
    """The evaluation fields of a dict (a final-metrics dict, an eval line), without ``step`` or anything else."""
    return EvalResults(**{k: v for k, v in metrics.items() if k in EvalResults.__annotations__})  # type: ignore[typeddict-item]


def append_metrics(run_dir: str | os.PathLike, record: TrainLog | EvalLog) -> None:
    """Append one line to metrics.jsonl (flushed at once: a crash loses at most the line being written)."""
    with open(Path(run_dir) / METRICS, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every line of metrics.jsonl (``run_dir`` may also be the file itself); a line cut by a crash is skipped."""
    path = Path(run_dir)
    path = path / METRICS if path.is_dir() else path
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def last_logs(run_dir: str | os.PathLike) -> tuple[TrainLog, EvalLog]:
    """The last training line and the last evaluation line of metrics.jsonl (empty dicts if none)."""
    last_train: dict[str, Any] = {}
    last_eval: dict[str, Any] = {}
    for rec in read_metrics(run_dir):
        if "val_loss" in rec or any(k.startswith("hellaswag_") for k in rec):
            last_eval = rec
        elif "loss" in rec:
            last_train = rec
    return TrainLog(**last_train), EvalLog(**last_eval)  # type: ignore[typeddict-item]


def truncate_metrics(run_dir: str | os.PathLike, step: int) -> None:
    """Drop the lines logged after ``step`` (by a run killed after its last checkpoint), atomically."""

    path = Path(run_dir) / METRICS
    if not path.is_file():
        return
    kept = [json.dumps(r) for r in read_metrics(path) if r.get("step", 0) <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def write_eval_results(run_dir: str | os.PathLike, results: EvalResults) -> None:
    write_json(Path(run_dir) / EVAL_RESULTS, dict(results))


def update_eval_results(run_dir: str | os.PathLike, results: EvalResults) -> Path:
    """Merge ``results`` into eval_results.json (atomically): the keys given replace theirs, every other key stays,
    and ``lm_eval`` is merged task by task. How ``gpt2-accel eval`` files its HellaSwag and harness scores next to
    the run's own validation loss."""
    path = Path(run_dir) / EVAL_RESULTS
    merged: dict[str, Any] = _read_json(path)
    for key, value in results.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            value = {**merged[key], **value}
        merged[key] = value
    write_json(path, merged)
    return path


def read_eval_results(run_dir: str | os.PathLike) -> EvalResults:
    """eval_results.json, or an empty dict if the run has none (yet)."""
    return eval_results_of(_read_json(Path(run_dir) / EVAL_RESULTS))


# ---------------------------------------------------------------------------------------------------------------
# trainer_state.json and run_info.json
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class TrainerState:
    """What, besides model/optimizer/RNG, a resumed run needs: saved as trainer_state.json in each checkpoint."""

    step: int = 0  # optimizer steps completed
    tokens_seen: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None
    skipped_steps: int = 0
    world_size: int = 1
    last_eval: dict[str, Any] | None = None  # the latest evaluation results, for the final report
    wall_time_s: float = 0.0  # seconds spent in train() up to this step, summed over resumes


@dataclass
class RunInfo:
    """What a finished run did and on what: run_info.json, written with the final model, shown by the model card."""

    steps: int = 0  # optimizer steps completed
    tokens_seen: int = 0
    wall_time_s: float | None = None  # seconds in train(), summed over resumes; None: not recorded
    hardware: str | None = None  # the device's name: the GPU model, or the CPU with its core count
    device_type: str | None = None  # torch device type: cuda, cpu, mps, xpu...
    world_size: int | None = None  # processes (one device each)
    distributed_type: str | None = None  # Accelerate's DistributedType (NO, MULTI_GPU, DEEPSPEED, FSDP...)
    mixed_precision: str | None = None  # no, bf16 or fp16
    skipped_steps: int = 0  # updates skipped by on_nonfinite=skip
    replica_checksums: list[float] | None = None  # each rank's float64 weight sum (None when sharded)
    license: str | None = None  # the model's licence (the recipe's `license`): the card's metadata
    extra: dict[str, Any] = field(default_factory=dict)  # fields of a newer version, kept when rewritten


def hardware_name(device: torch.device) -> str:
    """A person-readable name of the device a process trains on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return device.type


def write_trainer_state(checkpoint_dir: str | os.PathLike, state: TrainerState) -> None:

    write_json(Path(checkpoint_dir) / TRAINER_STATE, dataclasses.asdict(state))


def read_trainer_state(checkpoint_dir: str | os.PathLike) -> TrainerState:
    """A checkpoint's trainer_state.json (raises OSError/ValueError if missing or unreadable: resume needs it)."""
    raw = json.loads((Path(checkpoint_dir) / TRAINER_STATE).read_text(encoding="utf-8"))
    return _known_fields(TrainerState, raw)[0]


def write_run_info(run_dir: str | os.PathLike, info: RunInfo) -> None:
    record = dataclasses.asdict(info)
    record.update(record.pop("extra"))
    write_json(Path(run_dir) / RUN_INFO, record)


def read_run_info(run_dir: str | os.PathLike) -> RunInfo | None:
    """run_info.json, or None if the run has not finished (or the file is unreadable)."""
    raw = _read_json(Path(run_dir) / RUN_INFO)
    if not raw:
        return None
    info, unknown = _known_fields(RunInfo, raw)
    info.extra = unknown
    return info


def _known_fields(cls, raw: dict[str, Any]):
    names = {f.name for f in dataclasses.fields(cls) if f.name != "extra"}
    return cls(**{k: v for k, v in raw.items() if k in names}), {
        k: v for k, v in raw.items() if k not in names
    }


def _read_json(path: Path) -> dict[str, Any]:
    try:
        out = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return out if isinstance(out, dict) else {}
