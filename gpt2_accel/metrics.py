"""What a run reports: FLOPs and MFU, the ``metrics.jsonl`` tracker, and the loss-curve plot."""

from __future__ import annotations

import os
import time
from functools import cache
from pathlib import Path
from typing import Any

import torch
from accelerate.tracking import GeneralTracker

from .run_files import METRICS, append_metrics, read_metrics

# Dense peak throughput per device in FLOP/s, from the vendors' data sheets (no sparsity).
# A100 SXM: 312 TFLOPS bf16/fp16, 156 tf32 (NVIDIA A100 datasheet). H100 SXM: 989 bf16, 495 tf32 (H100 datasheet).
# H200 SXM: same compute as H100 SXM (H200 datasheet). fp32 (no tf32) numbers are the CUDA-core rates.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "A100": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "tf32": 495e12, "fp32": 67e12},
    "H200": {"bf16": 989e12, "fp16": 989e12, "tf32": 495e12, "fp32": 67e12},
    "L4": {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30e12},
    "A10": {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12},
}


def flops_per_token(n_params: int, n_layer: int, n_embd: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls with the weights (forward 2N, backward 4N) plus the attention
    score and value matmuls, 12 * n_layer * n_embd * seq_len (PaLM paper, Chowdhery et al. 2022, appendix B;
    nanoGPT's estimate_mfu uses the same count). N excludes the position embeddings (they are a lookup)."""
    return 6 * n_params + 12 * n_layer * n_embd * seq_len


@cache
def measured_cpu_matmul_flops(n: int = 1024, seconds: float = 0.5, windows: int = 5) -> float:
    """FLOP/s of a large fp32 matmul on this CPU, measured now: the ceiling MFU is reported against on CPU.

    Best of ``windows`` short windows: on a shared host one preempted window understates the ceiling (MFU > 100%).
    """
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b  # warm up the BLAS threads
    best = 0.0
    for _ in range(windows):
        iters, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / windows:
            a @ b
            iters += 1
        best = max(best, 2 * n**3 * iters / (time.perf_counter() - t0))
    return best


def peak_flops(device: torch.device, precision: str) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number comes from). ``precision``: bf16, fp16, tf32 or fp32."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, table in PEAK_FLOPS.items():
            if key in name:
                return table[precision], f"{key} {precision} datasheet"
        return float("nan"), f"unknown GPU {name!r}: add it to gpt2_accel.metrics.PEAK_FLOPS"
    return measured_cpu_matmul_flops(), "measured fp32 matmul on this CPU"


class JsonlTracker(GeneralTracker):
    """``metrics.jsonl`` as an Accelerate tracker: one ``accelerator.log(values, step)`` call writes it together
    with TensorBoard, W&B or any other tracker of ``report_to``. One line per call, ``{"step": step, **values}``,
    appended and closed at once (a crash loses at most the line being written); main process only."""

    name = "jsonl"
    requires_logging_directory = False

    def __init__(self, run_dir: str | os.PathLike):
        super().__init__()
        self.run_dir = Path(run_dir)

    @property
    def tracker(self) -> Path:
        return self.run_dir / METRICS

    def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        append_metrics(self.run_dir, {"step": step, **values})


def plot_loss_curve(
    metrics_path: str | os.PathLike, out_path: str | os.PathLike, title: str = ""
) -> Path | None:
    """Train and validation loss against step, as a PNG. Returns the path, or None if nothing was logged."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path)
    plt.close(fig)
    return out_path
