"""``gpt2-accel ema``: a post-hoc EMA model from a run's EMA snapshots (library: :mod:`gpt2_accel.ema`)."""

from __future__ import annotations

import numpy as np

from ..ema import (
    EMAError,
    _snapshot_gammas,
    export,
    gamma_to_sigma_rel,
    list_snapshots,
    reconstructable_range,
)
from ..logs import quiet_save
from .common import command_parser, error, parse


def main(argv: list[str] | None = None) -> int:
    p = command_parser(
        "ema",
        "Reconstruct a post-hoc EMA model (EDM2) of any length from a run's EMA snapshots.",
    )
    p.add_argument("run", help="run directory trained with ema_sigma_rels (holds ema/step_*.safetensors)")
    p.add_argument(
        "--sigma_rel", type=float, required=False, help="EMA length relative to the step, e.g. 0.05"
    )
    p.add_argument("--output", help="model directory to write")
    p.add_argument(
        "--step", type=int, default=None, help="the training step to average up to (default: last)"
    )
    p.add_argument(
        "--list", action="store_true", help="print the snapshots and the sigma_rel range they support"
    )
    a = parse(p, argv)
    try:
        if a.list or a.sigma_rel is None:
            snaps = list_snapshots(a.run)
            if not snaps:
                raise EMAError(f"{a.run!r} has no EMA snapshots; train with ema_sigma_rels to record them")
            gam = [_snapshot_gammas(path) for _, path in snaps]
            steps = np.array([s for (s, _), g in zip(snaps, gam, strict=True) for _ in g], np.float64)
            gammas = np.array([x for g in gam for x in g], np.float64)
            t = a.step or snaps[-1][0]
            rng = reconstructable_range(steps, gammas, t)
            print(f"{len(snaps)} snapshots, steps {snaps[0][0]}..{snaps[-1][0]}, EMAs with sigma_rel "
                  f"{[round(gamma_to_sigma_rel(g), 4) for g in gam[0]]}")  # fmt: skip
            print(
                f"reconstructable at step {t}: "
                + (f"sigma_rel {rng[0]:.3f}..{rng[1]:.3f}" if rng else "none")
            )
            return 0
        if not a.output:
            p.error("--output is required with --sigma_rel")
        with quiet_save():  # transformers' loading/writing bars of a local model are noise here
            report = export(a.run, a.sigma_rel, a.output, a.step)
    except EMAError as e:
        return error(e)
    print(f"EMA sigma_rel={a.sigma_rel} (gamma {report['gamma']:.2f}) at step {report['step']} from "
          f"{report['snapshots']} snapshots (profile error {report['profile_error']:.4f}) -> {a.output}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
