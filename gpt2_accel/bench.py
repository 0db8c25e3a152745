"""``gpt2-accel bench``: time the training step of a recipe's model (ms/step, tokens/s, MFU, peak memory).

    gpt2-accel bench recipes/demo.yaml --n_layer=6 --steps 10 --warmup 3
    gpt2-accel bench recipes/demo.yaml --real-data --profile prof/   # with the data pipeline; chrome trace in prof/

One timed step is what the trainer does per optimizer step: ``gradient_accumulation_steps`` forward + backward
passes, gradient clipping, a fused AdamW step and ``zero_grad``. Input is random tokens (no tokenizer, no data
pipeline) unless ``--real-data``. MFU = achieved FLOP/s / peak FLOP/s, with the FLOPs per token of
:func:`gpt2_accel.metrics.flops_per_token` (6N + 12 L d T, PaLM appendix B) and the peak of
:func:`gpt2_accel.metrics.peak_flops` (GPU datasheet table; on CPU an fp32 matmul measured on the spot).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from ._compat import moved_main
from .metrics import flops_per_token, peak_flops
from .recipe import Recipe, RecipeError

GPT2_VOCAB = 50257  # GPT-2 BPE size: the model's vocabulary when the recipe leaves vocab_size unset


@dataclasses.dataclass
class BenchResult:
    """What one ``gpt2-accel bench`` run measured. Times are per optimizer step."""

    ms_per_step: float  # median
    ms_per_step_min: float
    ms_per_step_max: float
    tokens_per_step: int
    tokens_per_sec: float  # tokens_per_step / median step time
    flops_per_token: float
    achieved_flops: float  # FLOP/s at the median step time
    peak_flops: float
    peak_source: str
    mfu: float
    peak_memory_bytes: int
    peak_memory_kind: str
    n_params: int  # without position embeddings (the N of 6N)
    device: str
    precision: str
    threads: int
    compile_s: float | None  # time of the first (compiling) step when torch_compile is on
    final_loss: float
    trace_path: str | None

    def summary(self) -> str:
        mem = self.peak_memory_bytes / 2**20
        lines = [
            f"device: {self.device}, precision {self.precision}, torch {torch.__version__}, {self.threads} threads",
            f"model: {self.n_params / 1e6:.2f}M parameters (no position embeddings), "
            f"{self.tokens_per_step} tokens/step, {self.flops_per_token / 1e6:.1f} MFLOP/token",
            f"ms/step: {self.ms_per_step:.1f} (median; min {self.ms_per_step_min:.1f}, max {self.ms_per_step_max:.1f})",
            f"tokens/s: {self.tokens_per_sec:,.0f}",
            f"MFU: {100 * self.mfu:.1f}% ({self.achieved_flops / 1e12:.3f} TFLOP/s of "
            f"{self.peak_flops / 1e12:.3f}, {self.peak_source})",
            f"peak memory: {mem:,.1f} MiB ({self.peak_memory_kind})",
            f"final loss: {self.final_loss:.4f}",
        ]
        if self.compile_s is not None:
            lines.append(f"torch.compile: first step took {self.compile_s:.1f} s (not timed)")
        if self.trace_path:
            lines.append(
                f"profiler trace: {self.trace_path} (open in chrome://tracing or https://ui.perfetto.dev)"
            )
        return "\n".join(lines)


def build_model(recipe: Recipe, vocab_size: int, device: torch.device) -> torch.nn.Module:
    """The recipe's model from scratch, configured as the trainer builds it (no weights are loaded)."""
    from .modeling_gpt2_accel import GPT2AccelForCausalLM
    from .recipe import model_config

    config = model_config(recipe.model, vocab_size)
    config.use_cache = False
    return GPT2AccelForCausalLM(config).to(device)


def _synthetic_batches(n: int, batch: int, block: int, vocab: int, device: torch.device, seed: int):
    """An endless cycle over ``n`` fixed random (B, T + 1) token batches, already on the device."""
    g = torch.Generator().manual_seed(seed)
    pool = [torch.randint(0, vocab, (batch, block + 1), generator=g).to(device) for _ in range(n)]
    i = 0
    while True:
        yield pool[i % n]
        i += 1


def _real_batches(recipe: Recipe, block: int, device: torch.device):
    """Batches from the recipe's data through the trainer's pipeline (tokenizer, packing, loader workers)."""
    try:
        from .data import build_train_loader
        from .tokenization import get_tokenizer
    except ImportError as e:
        raise RecipeError(
            f"--real-data needs gpt2_accel.data and gpt2_accel.tokenization ({e}); run without it"
        ) from e
    d, t = recipe.data, recipe.training
    tok = get_tokenizer(d.tokenizer_name)
    loader = build_train_loader(
        d,
        tok,
        block_size=block,
        batch_size=t.per_device_train_batch_size,
        rank=0,
        world_size=1,
        seed=t.seed,
        grad_accum=t.gradient_accumulation_steps,
    )
    for batch in loader:
        yield batch.to(device, non_blocking=True)


def _peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "CUDA max_memory_allocated (tensors only)"
    # ru_maxrss is KiB on Linux, bytes on macOS; it is the peak of the whole process since it started.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024
    return rss * scale, "CPU peak RSS of the whole process (getrusage ru_maxrss)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_bench(
    recipe: Recipe,
    *,
    steps: int = 10,
    warmup: int = 3,
    real_data: bool = False,
    profile_dir: str | Path | None = None,
    device: str | torch.device | None = None,
) -> BenchResult:
    """Time ``steps`` optimizer steps of the recipe's model after ``warmup`` untimed ones."""
    from .optim import build_optimizer

    if steps < 1 or warmup < 0:
        raise RecipeError(f"--steps must be >= 1 and --warmup >= 0, got steps={steps}, warmup={warmup}")
    m, t = recipe.model, recipe.training
    if m.init_from != "scratch":
        print(
            f"note: bench times a random-init model with the recipe's shape; init_from={m.init_from!r} is ignored"
        )
    dev = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    torch.manual_seed(t.seed)
    block = recipe.data.block_size or m.n_positions
    vocab = m.vocab_size or GPT2_VOCAB
    model = build_model(recipe, vocab, dev)
    model.train()
    opt = build_optimizer(model, t, dev.type)
    params = [p for p in model.parameters() if p.requires_grad]
    wpe = model.transformer.wpe  # None with rotary positions
    n_params = sum(p.numel() for p in params) - (wpe.weight.numel() if wpe is not None else 0)
    fwd = torch.compile(model) if t.torch_compile else model

    if t.fp16 and dev.type != "cuda":
        raise RecipeError("fp16=true needs a CUDA device; use bf16=true or neither on CPU")
    amp_dtype = torch.bfloat16 if t.bf16 else torch.float16 if t.fp16 else None
    precision = "bf16" if t.bf16 else "fp16" if t.fp16 else "fp32"
    if dev.type == "cuda" and precision == "fp32" and torch.backends.cuda.matmul.allow_tf32:
        precision = "tf32"  # the trainer's rule: fp32 matmuls run on tensor cores when TF32 is allowed
    scaler = torch.amp.GradScaler("cuda") if t.fp16 else None
    ga = t.gradient_accumulation_steps
    batches = (
        _real_batches(recipe, block, dev)
        if real_data
        else _synthetic_batches(4, t.per_device_train_batch_size, block, vocab, dev, t.seed)
    )

    def step() -> torch.Tensor:
        loss_sum = torch.zeros((), device=dev)
        for _ in range(ga):
            batch = next(batches)  # (B, T + 1)
            ctx = (
                torch.autocast(dev.type, dtype=amp_dtype)
                if amp_dtype is not None
                else contextlib.nullcontext()
            )
            with ctx:
                # skip_logits: the chunked LM head + loss, no (B, T, V) logits (what the trainer passes)
                out = fwd(
                    input_ids=batch[:, :-1], shift_labels=batch[:, 1:], use_cache=False, skip_logits=True
                )
                loss = out.loss / ga
            (scaler.scale(loss) if scaler else loss).backward()
            loss_sum += loss.detach()
        if scaler:
            scaler.unscale_(opt)
        if t.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        return loss_sum

    compile_s = None
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for i in range(warmup):
        t0 = time.perf_counter()
        step()
        _sync(dev)
        if i == 0 and t.torch_compile:
            compile_s = time.perf_counter() - t0
    times, loss = [], torch.zeros(())
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        _sync(dev)  # CUDA runs asynchronously: wait for the step before reading the clock
        times.append(time.perf_counter() - t0)
    peak_mem, mem_kind = _peak_memory(dev)

    trace_path = None
    if profile_dir is not None:
        trace_path = _profile(step, dev, Path(profile_dir))

    med = statistics.median(times)
    tokens_per_step = t.per_device_train_batch_size * ga * block
    fpt = flops_per_token(n_params, m.n_layer, m.n_embd, block)
    achieved = tokens_per_step * fpt / med
    peak, source = peak_flops(dev, precision)
    if dev.type == "cpu" and precision != "fp32":
        source += f" (fp32 ceiling; the step ran in {precision})"
    return BenchResult(
        ms_per_step=1e3 * med,
        ms_per_step_min=1e3 * min(times),
        ms_per_step_max=1e3 * max(times),
        tokens_per_step=tokens_per_step,
        tokens_per_sec=tokens_per_step / med,
        flops_per_token=fpt,
        achieved_flops=achieved,
        peak_flops=peak,
        peak_source=source,
        mfu=achieved / peak if math.isfinite(peak) and peak > 0 else float("nan"),
        peak_memory_bytes=int(peak_mem),
        peak_memory_kind=mem_kind,
        n_params=n_params,
        device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({_cpu_name()})",
        precision=precision,
        threads=torch.get_num_threads(),
        compile_s=compile_s,
        final_loss=float(loss),
        trace_path=trace_path,
    )


def _profile(step, dev: torch.device, out_dir: Path) -> str:
    """Profile two extra steps (after timing: the profiler slows them) and write a chrome trace to ``out_dir``."""
    from torch.profiler import ProfilerActivity, profile, record_function

    out_dir.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for i in range(2):
            with record_function(f"train_step_{i}"):
                step()
            _sync(dev)
    path = out_dir / "trace.json"
    prof.export_chrome_trace(str(path))
    sort = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=15)
    (out_dir / "top_ops.txt").write_text(table + "\n", encoding="utf-8")
    print(table)
    return str(path)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


__getattr__ = moved_main(__name__, "bench")  # `gpt2_accel.bench.main` keeps working


if __name__ == "__main__":  # `python -m gpt2_accel.bench` runs the command, which lives in gpt2_accel/cli/
    from .cli.bench import main

    raise SystemExit(main())
