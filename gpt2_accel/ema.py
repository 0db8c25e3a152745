"""Post-hoc EMA (EDM2: Karras et al. 2023, "Analyzing and Improving the Training Dynamics of Diffusion Models",
sec. 3 and appendix C): choose the EMA length AFTER training.

During training (recipe key ``ema_sigma_rels``) the trainer keeps a few *power-function* EMAs of the weights. A
power EMA with exponent gamma averages the weights seen up to step t with weights proportional to tau**gamma, so
its length grows with the run; it is parametrised by its relative standard deviation ``sigma_rel`` (the width of
that profile over t). Every ``ema_snapshot_steps`` the EMAs are written to ``<run>/ema/``. Afterwards,
``gpt2-accel ema RUN --sigma_rel S --output DIR`` finds the linear combination of the stored snapshots whose
averaging profile is closest (least squares) to the profile of a power EMA of length S at the chosen step, and
writes that combination of weights as a normal model directory (evaluate, sample, export, push it like any other).

Files (the schema lives here; the trainer writes, the command reads):

- ``<run>/ema/step_XXXXXXXX.safetensors``: one tensor per (EMA, parameter), named ``ema{i}/{parameter name}``;
  metadata ``{"step": t, "gammas": [gamma_i, ...]}`` (JSON strings). Written atomically.
- ``<checkpoint>/ema_state.safetensors``: the same for the running EMAs, so a resumed run continues them exactly.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ._compat import moved_main
from .atomic import atomic_output

EMA_DIR = "ema"
STATE_FILE = "ema_state.safetensors"
_SNAP_RE = re.compile(r"^step_(\d{8})\.safetensors$")
# A power EMA has gamma > 0 only for sigma_rel below the uniform average's sqrt(1/12) (gamma = 0 in
# gamma_to_sigma_rel); gamma <= 0 is not a decaying average any more.
SIGMA_REL_MAX = math.sqrt(1 / 12)
# The reconstruction's relative L2 error on the averaging profile above which an EMA length is refused: beyond it
# the stored snapshots cannot express the asked-for average (EDM2's own fits of sigma_rel in [0.01, 0.25] from
# two EMAs with ~160 snapshots stay well below this).
MAX_PROFILE_ERROR = 0.05


class EMAError(ValueError):
    """An EMA length the stored snapshots cannot reconstruct, or a run without snapshots. Names the fix."""


# ---------------------------------------------------------------------------------------------------------------
# the math (float64; EDM2 appendix C)
# ---------------------------------------------------------------------------------------------------------------
def gamma_to_sigma_rel(gamma: float) -> float:
    """Relative standard deviation of the power profile tau**gamma on [0, t]:
    sigma_rel = sqrt((gamma + 1) / ((gamma + 2)**2 (gamma + 3))) (EDM2, appendix C.2)."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma > 0 with :func:`gamma_to_sigma_rel` (gamma) == sigma_rel.

    Squaring and clearing denominators gives the cubic gamma**3 + 7 gamma**2 + (16 - s) gamma + (12 - s) = 0 with
    s = sigma_rel**-2; its largest real root is the decaying power EMA (EDM2, appendix C.2, Algorithm 2).
    """
    if not 0 < sigma_rel < SIGMA_REL_MAX:
        raise EMAError(
            f"sigma_rel={sigma_rel} is outside (0, {SIGMA_REL_MAX:.4f}): a power EMA's relative length must be "
            "positive and shorter than a uniform average of the whole run; EDM2 uses 0.05-0.15"
        )
    s = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def ema_beta(step: int, gamma: float) -> float:
    """Decay of the power EMA at optimizer step ``step`` (1-based): beta = (1 - 1/t)**(gamma + 1) (EDM2 sec. 3,
    appendix C.1). Step 1 copies the weights (beta = 0); the weight that step tau ends up with at step t is
    ~ (gamma + 1) tau**gamma / t**(gamma + 1), the power profile."""
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


def _profile_dot(t_a: np.ndarray, g_a: np.ndarray, t_b: np.ndarray, g_b: np.ndarray) -> np.ndarray:
    """<p_a, p_b> = integral over tau of p_a(tau) p_b(tau), for the power profiles
    p(tau) = (gamma + 1) tau**gamma / t**(gamma + 1) on [0, t] (EDM2 appendix C.3), in closed form:
    (g_a + 1)(g_b + 1) min(t_a, t_b)**(g_a + g_b + 1) / ((g_a + g_b + 1) t_a**(g_a + 1) t_b**(g_b + 1)).
    Computed through logarithms: t**gamma overflows float64 for long runs and small sigma_rel."""
    t_a, g_a = t_a[:, None], g_a[:, None]
    t_b, g_b = t_b[None, :], g_b[None, :]
    m = np.minimum(t_a, t_b)
    log = (np.log(g_a + 1) + np.log(g_b + 1) + (g_a + g_b + 1) * np.log(m) - np.log(g_a + g_b + 1)
           - (g_a + 1) * np.log(t_a) - (g_b + 1) * np.log(t_b))  # fmt: skip
    return np.exp(log)


def solve_coefficients(
    steps: np.ndarray, gammas: np.ndarray, target_step: float, target_gamma: float
) -> tuple[np.ndarray, float]:
    """Least-squares weights x of the snapshots (step_i, gamma_i) whose summed profiles best match the target
    power profile (target_step, target_gamma): solve A x = b with A_ij = <p_i, p_j>, b_i = <p_i, p_r>
    (EDM2 appendix C.3). Returns (x, relative L2 error of the fitted profile)."""
    steps, gammas = np.asarray(steps, np.float64), np.asarray(gammas, np.float64)
    tr, gr = np.array([float(target_step)]), np.array([float(target_gamma)])
    a = _profile_dot(steps, gammas, steps, gammas)
    b = _profile_dot(steps, gammas, tr, gr)[:, 0]
    c = _profile_dot(tr, gr, tr, gr)[0, 0]
    x = np.linalg.lstsq(a, b, rcond=None)[0]
    residual = max(float(x @ a @ x - 2 * x @ b + c), 0.0)  # ||sum x_i p_i - p_r||**2
    return x, math.sqrt(residual / c)


# ---------------------------------------------------------------------------------------------------------------
# during training
# ---------------------------------------------------------------------------------------------------------------
class PowerEMA:
    """The running power EMAs of a model's parameters, one per sigma_rel (same dtype and device as the weights)."""

    def __init__(self, model: nn.Module, sigma_rels: list[float]):
        self.sigma_rels = list(sigma_rels)
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        self.params = {n: p for n, p in model.named_parameters() if p.is_floating_point()}
        self.averages = [{n: p.detach().clone() for n, p in self.params.items()} for _ in self.gammas]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold the current weights in after optimizer step ``step`` (1-based)."""
        for gamma, avg in zip(self.gammas, self.averages, strict=True):
            beta = ema_beta(step, gamma)
            names = list(avg)
            # avg = beta * avg + (1 - beta) * weights, for every tensor in one call
            torch._foreach_lerp_(
                [avg[n] for n in names], [self.params[n].detach() for n in names], 1.0 - beta
            )

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"ema{i}/{n}": v.detach().cpu().contiguous() for i, avg in enumerate(self.averages)
                for n, v in avg.items()}  # fmt: skip

    def save(self, path: str | os.PathLike, step: int) -> None:
        """Write the EMAs at ``step`` to ``path`` atomically (a snapshot, or a checkpoint's state)."""
        from safetensors.torch import save_file

        meta = {"step": json.dumps(step), "gammas": json.dumps(self.gammas),
                "sigma_rels": json.dumps(self.sigma_rels)}  # fmt: skip
        with atomic_output(path) as tmp:
            save_file(self.tensors(), str(tmp), metadata=meta)

    def load(self, path: str | os.PathLike) -> None:
        """Restore the EMAs a checkpoint saved (refuses another set of sigma_rels)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            saved = json.loads(f.metadata()["sigma_rels"])
            if saved != self.sigma_rels:
                raise EMAError(
                    f"the checkpoint tracks EMAs with ema_sigma_rels={saved} but the recipe asks for "
                    f"{self.sigma_rels}; restore ema_sigma_rels or start a new output_dir"
                )
            with torch.no_grad():
                for i, avg in enumerate(self.averages):
                    for n, v in avg.items():
                        v.copy_(f.get_tensor(f"ema{i}/{n}"))

    def after_step(self, step: int, max_steps: int, run_dir: str | os.PathLike, snapshot_steps: int) -> None:
        """The trainer's one call per optimizer step: update, and write a snapshot every ``snapshot_steps`` steps
        and at the last step."""
        self.update(step)
        if step % snapshot_steps == 0 or step == max_steps:
            self.snapshot(run_dir, step)

    def snapshot(self, run_dir: str | os.PathLike, step: int) -> Path:
        path = Path(run_dir) / EMA_DIR / f"step_{step:08d}.safetensors"
        self.save(path, step)
        return path


def drop_snapshots_after(run_dir: str | os.PathLike, step: int) -> None:
    """A resumed run rewrites the snapshots after its checkpoint: remove those of the abandoned future."""
    for s, path in list_snapshots(run_dir):
        if s > step:
            path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------------
# after training
# ---------------------------------------------------------------------------------------------------------------
def list_snapshots(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    root = Path(run_dir) / EMA_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _SNAP_RE.match(p.name))]
    return sorted(found)


def _snapshot_gammas(path: Path) -> list[float]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["gammas"])


def reconstructable_range(
    steps: np.ndarray, gammas: np.ndarray, target_step: int
) -> tuple[float, float] | None:
    """The sigma_rel interval (on a fine grid) that the snapshots fit within MAX_PROFILE_ERROR at target_step."""
    grid = np.linspace(0.005, SIGMA_REL_MAX - 1e-3, 400)
    ok = [s for s in grid if solve_coefficients(steps, gammas, target_step, sigma_rel_to_gamma(s))[1]
          <= MAX_PROFILE_ERROR]  # fmt: skip
    return (float(min(ok)), float(max(ok))) if ok else None


def reconstruct(
    run_dir: str | os.PathLike, sigma_rel: float, step: int | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """The weights of a power EMA of length ``sigma_rel`` at ``step`` (default: the last snapshot), as a
    combination of the run's snapshots. Returns (parameter name -> tensor, a report dict)."""
    from safetensors import safe_open

    snaps = list_snapshots(run_dir)
    if not snaps:
        raise EMAError(
            f"{str(run_dir)!r} has no EMA snapshots ({EMA_DIR}/step_*.safetensors): train with "
            "ema_sigma_rels (e.g. [0.05, 0.10]) to record them"
        )
    last = snaps[-1][0]
    step = last if step is None else step
    if not 1 <= step <= last:
        raise EMAError(f"step={step} is outside the snapshots' steps 1..{last}; choose a step <= {last}")
    gamma_r = sigma_rel_to_gamma(sigma_rel)
    rows = []  # (step, gamma, path, index inside the file)
    for s, path in snaps:
        for i, g in enumerate(_snapshot_gammas(path)):
            rows.append((s, g, path, i))
    steps = np.array([r[0] for r in rows], np.float64)
    gammas = np.array([r[1] for r in rows], np.float64)
    x, err = solve_coefficients(steps, gammas, step, gamma_r)
    if err > MAX_PROFILE_ERROR:
        rng = reconstructable_range(steps, gammas, step)
        where = f"sigma_rel in [{rng[0]:.3f}, {rng[1]:.3f}]" if rng else "no sigma_rel at all"
        raise EMAError(
            f"sigma_rel={sigma_rel} at step {step} cannot be reconstructed from the {len(snaps)} snapshots of "
            f"{str(run_dir)!r} (relative profile error {err:.3f} > {MAX_PROFILE_ERROR}); they support {where}. "
            "Choose a sigma_rel in that range, or train with ema_sigma_rels bracketing it and snapshots more often "
            "(ema_snapshot_steps)"
        )
    out: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for coef, (_, _, path, i) in zip(x, rows, strict=True):
        if coef == 0.0:
            continue
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                idx, name = key.split("/", 1)
                if idx != f"ema{i}":
                    continue
                tensor = f.get_tensor(key)
                dtypes[name] = tensor.dtype
                t = tensor.to(torch.float64) * float(coef)  # sum in float64, cast back at the end
                out[name] = out[name] + t if name in out else t
    weights = {n: v.to(dtypes[n]) for n, v in out.items()}
    report = {"sigma_rel": sigma_rel, "gamma": gamma_r, "step": step, "profile_error": err,
              "snapshots": len(snaps), "coefficients": [float(c) for c in x]}  # fmt: skip
    return weights, report


def export(
    run_dir: str | os.PathLike, sigma_rel: float, output: str | os.PathLike, step: int | None = None
) -> dict:
    """Write the reconstructed EMA model as a Hugging Face model directory (config, tokenizer, code from the run)."""
    from . import checkpoint as ckpt
    from .modeling_gpt2_accel import GPT2AccelForCausalLM

    run_dir, output = Path(run_dir), Path(output)
    if output.resolve() == run_dir.resolve():
        raise EMAError(
            "--output must differ from the run directory (the run's own model would be overwritten)"
        )
    weights, report = reconstruct(run_dir, sigma_rel, step)
    source = run_dir if (run_dir / "config.json").is_file() else None
    if source is None:
        latest = ckpt.latest_checkpoint(run_dir)
        source = latest / "model" if latest is not None else None
    if source is None:
        raise EMAError(
            f"{str(run_dir)!r} has neither a final model nor a complete checkpoint to take config from"
        )
    model = GPT2AccelForCausalLM.from_pretrained(source)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    params = {n for n, _ in model.named_parameters()}
    if unexpected or params & set(missing):
        raise EMAError(f"the snapshots do not match the run's model: missing {sorted(params & set(missing))[:5]}, "
                       f"unexpected {sorted(unexpected)[:5]}")  # fmt: skip
    model.tie_weights()
    model.save_pretrained(output, safe_serialization=True)
    from transformers import AutoTokenizer

    with contextlib.suppress(OSError, ValueError):  # a run without tokenizer files: the model is still usable
        AutoTokenizer.from_pretrained(source).save_pretrained(output)
    ckpt.write_json(output / "ema_info.json", report | {"run": str(run_dir)})
    return report


__getattr__ = moved_main(__name__, "ema")  # `gpt2_accel.ema.main` keeps working


if __name__ == "__main__":  # `python -m gpt2_accel.ema` runs the command, which lives in gpt2_accel/cli/
    from .cli.ema import main

    raise SystemExit(main())
