"""Speedrun: wall time and tokens for a recipe to reach a validation loss, baseline vs candidate in ONE run.

    python benchmarks/speedrun.py                                    # recipes/demo.yaml vs recipes/speedrun.yaml
    python benchmarks/speedrun.py --candidate recipes/demo.yaml --set optim=muon   # one ablation row
    python benchmarks/speedrun.py --repeats 2                        # B C B C, interleaved: noise hits both
    python benchmarks/speedrun.py --candidate_only --target 5.65 --set max_steps=150   # an ablation: no baseline

The baseline (``recipes/demo.yaml``, unchanged) trains to its end; its final validation loss is the target (or
``--target``). The candidate evaluates every ``--eval_every`` steps and stops at the first evaluation at or below
the target. Each arm runs in a fresh process, one after the other, on the same bundled corpus, tokenizer and
validation windows (both recipes must keep them equal: the script checks). Reported time is the training loop's
wall time (``Trainer.train`` from its first step) minus the time spent in evaluation, so the candidate's frequent
evaluations do not count against it; set-up (data, model build) is excluded for both. Checkpoints are off
(``save_steps=0``) in both arms: this measures training, not disk. On a shared machine, read the ratio of each
interleaved pair, not the absolute seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# keys that decide what "the same loss" means: the data, the tokenizer and the validation windows
SAME = ("dataset_name", "tokenizer_name", "validation_split_percentage", "max_eval_samples", "seed")


def _arm(recipe: str, overrides: list[str], target: float | None, eval_every: int | None, out: str) -> None:
    """Run one arm in this process and write its timings to ``out`` (JSON)."""
    sys.path.insert(0, str(ROOT))
    import torch

    from gpt2_accel.recipe import load_recipe
    from gpt2_accel.trainer import Trainer, TrainerCallback

    keys = [*overrides, "--save_steps=0", "--report_to=none", "--overwrite_output_dir=true"]
    if eval_every:
        keys.append(f"--eval_steps={eval_every}")

    class Timed(Trainer):
        """The trainer, timing its loop without evaluations, stopping at the first evaluation <= target."""

        t_start: float | None = None
        eval_s = 0.0
        curve: list[dict]
        reached: dict | None = None

        def evaluate(self):
            t0 = time.perf_counter()
            train_s = None if self.t_start is None else t0 - self.t_start - self.eval_s
            out = super().evaluate()
            self.eval_s += time.perf_counter() - t0
            if train_s is not None and "val_loss" in out:
                row = {"step": self.state.step, "tokens": self.state.tokens_seen, "train_s": train_s,
                       "val_loss": out["val_loss"]}  # fmt: skip
                self.curve.append(row)
                if target is not None and self.reached is None and out["val_loss"] <= target:
                    self.reached = row
            return out

        def _should_stop(self) -> bool:
            return self.reached is not None or super()._should_stop()

    class Start(TrainerCallback):
        def on_train_begin(self, trainer) -> None:
            trainer.t_start = time.perf_counter()

    recipe = load_recipe(recipe, keys)
    trainer = Timed(recipe, callbacks=[Start()])
    trainer.curve = []
    trainer.train()
    n_params = sum(p.numel() for p in trainer.model.parameters())
    last = trainer.curve[-1] if trainer.curve else None
    res = {
        "params": n_params,
        "threads": torch.get_num_threads(),
        "tokens_per_step": trainer.tokens_per_step,
        "max_steps": trainer.max_steps,
        "curve": trainer.curve,
        "reached": trainer.reached,
        "final": last,
        "same": {k: recipe.flat()[k] for k in SAME} | {"block_size": trainer.block_size},
    }
    Path(out).write_text(json.dumps(res, indent=1))


def _start_arm(recipe: str, overrides: list[str], target: float | None, eval_every: int | None, tmp: Path,
               name: str) -> tuple[subprocess.Popen, Path]:  # fmt: skip
    out = tmp / f"{name}.json"
    cmd = [sys.executable, __file__, "--_arm", recipe, "--_out", str(out), "--output_dir", str(tmp / name)]
    cmd += ["--target", str(target)] if target is not None else []
    cmd += ["--eval_every", str(eval_every or 0)]  # 0: the recipe's own eval_steps
    cmd += [f"--set={o}" for o in overrides]  # the child applies them in order (later wins)
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    print(f"  running {name}: {recipe} {' '.join(overrides)}", flush=True)
    proc = subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    return proc, out


def _collect(started: tuple[subprocess.Popen, Path], name: str, timeout: int) -> dict:
    proc, out = started
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    if proc.returncode != 0:
        sys.exit(f"{name} failed (exit {proc.returncode}):\n{err[-4000:]}")
    return json.loads(out.read_text())


def _first_at_or_below(res: dict, target: float) -> dict | None:
    return next((r for r in res["curve"] if r["val_loss"] <= target), None)


def _fmt(name: str, recipe: str, r: dict, target: float) -> str:
    hit = r["reached"]
    if hit is not None:
        when = f"{hit['step']:>6} {hit['tokens']:>10,} {hit['train_s']:>9.1f}"
    else:
        when = f"{'never':>6} {'-':>10} {'-':>9}"
    fin = r["final"] or {}
    return (f"{name:<9} {recipe:<24} {r['params'] / 1e6:>7.2f}M {target:>7.4f} {when}   "
            f"{fin.get('val_loss', float('nan')):.4f} @ {fin.get('step', 0)}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--baseline", default="recipes/demo.yaml", help="the reference recipe (trained to its end)"
    )
    p.add_argument("--candidate", default="recipes/speedrun.yaml", help="the recipe racing to the target")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a candidate recipe key (repeatable), e.g. --set optim=muon")  # fmt: skip
    p.add_argument("--base_set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key in BOTH arms (e.g. --base_set max_steps=20 for a smoke test)")  # fmt: skip
    p.add_argument("--baseline_set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a baseline key (a shortened proxy run; the real comparison uses none)")  # fmt: skip
    p.add_argument("--parallel", action="store_true",
                   help="run the two arms at the same time (same machine noise; the candidate runs to its end and "
                        "its evaluation curve gives the time to the target)")  # fmt: skip
    p.add_argument("--target", type=float, default=None,
                   help="validation loss to reach; default: the baseline's final validation loss")  # fmt: skip
    p.add_argument("--candidate_only", action="store_true",
                   help="run only the candidate to --target (ablations on a busy machine: compare candidates by "
                        "tokens to the target; the ratio needs the baseline)")  # fmt: skip
    p.add_argument("--eval_every", type=int, default=10, help="candidate: evaluate every this many steps")
    p.add_argument("--repeats", type=int, default=1, help="interleaved baseline/candidate pairs")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per arm before giving up")
    p.add_argument("--json", default=None, help="also write every arm's figures here")
    p.add_argument("--_arm", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--output_dir", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    both = [s if s.startswith("--") else f"--{s}" for s in a.base_set]
    overrides = [*both, *(s if s.startswith("--") else f"--{s}" for s in a.set)]
    baseline_ov = [*both, *(s if s.startswith("--") else f"--{s}" for s in a.baseline_set)]
    if a._arm is not None:  # a child process: one arm
        _arm(a._arm, [*overrides, f"--output_dir={a.output_dir}"], a.target, a.eval_every or None, a._out)
        return 0
    if a.candidate_only:
        if a.target is None:
            p.error("--candidate_only needs --target (the baseline's final validation loss)")
        with tempfile.TemporaryDirectory(prefix="speedrun-") as tmp:
            cand = _collect(_start_arm(a.candidate, overrides, a.target, a.eval_every, Path(tmp), "speedrun"),
                            "candidate", a.timeout)  # fmt: skip
        print(
            f"{'arm':<9} {'recipe':<24} {'params':>8} {'target':>7} {'step':>6} {'tokens':>10} {'train_s':>9}   final val"
        )
        print(_fmt("candidate", a.candidate, cand, a.target))
        curve = " ".join(f"{r['step']}:{r['val_loss']:.3f}" for r in cand["curve"])
        print(f"validation loss by step: {curve}")
        if a.json:
            Path(a.json).write_text(json.dumps(cand, indent=1))
        return 0

    print(f"speedrun: {a.baseline} (baseline, to its end) vs {a.candidate} {' '.join(overrides)} "
          f"(evaluated every {a.eval_every} steps); {a.repeats} pair(s), "
          f"{'side by side' if a.parallel else 'interleaved'}")  # fmt: skip
    rows, pairs = [], []
    with tempfile.TemporaryDirectory(prefix="speedrun-") as tmp:
        for i in range(a.repeats):
            tmpd = Path(tmp)
            if a.parallel:  # both at once: the candidate runs its whole schedule, its curve gives the time
                b = _start_arm(a.baseline, baseline_ov, None, None, tmpd, f"baseline{i}")
                c = _start_arm(a.candidate, overrides, None, a.eval_every, tmpd, f"speedrun{i}")
                base, cand = _collect(b, "baseline", a.timeout), _collect(c, "candidate", a.timeout)
                target = a.target if a.target is not None else base["final"]["val_loss"]
                base["reached"] = _first_at_or_below(base, target) if a.target is not None else base["final"]
                cand["reached"] = _first_at_or_below(cand, target)
            else:  # one after the other: the candidate stops at the target
                b = _start_arm(a.baseline, baseline_ov, a.target, None, tmpd, f"baseline{i}")
                base = _collect(b, "baseline", a.timeout)
                if a.target is None:  # the baseline's final loss is the target: it reaches it at its end
                    base["reached"] = base["final"]
                target = a.target if a.target is not None else base["final"]["val_loss"]
                c = _start_arm(a.candidate, overrides, target, a.eval_every, tmpd, f"speedrun{i}")
                cand = _collect(c, "candidate", a.timeout)
            base_time = (base["reached"] or base["final"])["train_s"]
            base_tokens = (base["reached"] or base["final"])["tokens"]
            if base["same"] != cand["same"]:
                sys.exit(f"the recipes differ in data/tokenizer/validation: {base['same']} vs {cand['same']}")
            rows += [_fmt("baseline", a.baseline, base, target), _fmt("candidate", a.candidate, cand, target)]
            hit = cand["reached"]
            pairs.append({"baseline": base, "candidate": cand, "target": target,
                          "time_ratio": hit["train_s"] / base_time if hit else None,
                          "token_ratio": hit["tokens"] / base_tokens if hit else None})  # fmt: skip
            print(rows[-2] + "\n" + rows[-1], flush=True)
    print()
    print(
        f"{'arm':<9} {'recipe':<24} {'params':>8} {'target':>7} {'step':>6} {'tokens':>10} {'train_s':>9}   final val"
    )
    for r in rows:
        print(r)
    print()
    base = pairs[0]["baseline"]
    cand = pairs[0]["candidate"]
    drift = cand["params"] / base["params"] - 1
    print(
        f"parameters: candidate {cand['params']:,} vs baseline {base['params']:,} ({drift:+.1%}; the rule is +-10%)"
    )
    print(f"threads per process: {base['threads']}; time = training loop wall time without evaluations")
    for i, pr in enumerate(pairs):
        if pr["time_ratio"] is None:
            print(f"pair {i}: the candidate never reached {pr['target']:.4f}")
        else:
            print(f"pair {i}: candidate/baseline wall time to val loss {pr['target']:.4f} = {pr['time_ratio']:.3f} "
                  f"(tokens {pr['token_ratio']:.3f}); goal <= 0.333")  # fmt: skip
    ratios = [pr["time_ratio"] for pr in pairs if pr["time_ratio"] is not None]
    if ratios:
        print(f"best ratio {min(ratios):.3f}, worst {max(ratios):.3f}")
    if a.json:
        Path(a.json).write_text(json.dumps(pairs, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
