"""The parts of the training loop that decide for themselves when to act (as torchtitan's checkpointer, validator
and metrics processor do), so that ``Trainer._train`` reads as the loop itself.

- :class:`Periodic`: an action every ``interval`` steps, and once more at the end if the last step missed it
  (evaluation and checkpoints).
- :class:`TrainLogger`: the training lines of ``metrics.jsonl``: when to write one, the mean loss since the last,
  throughput, MFU and loss spikes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from .run_files import TrainLog

logger = logging.getLogger("gpt2_accel")


class Periodic:
    """Runs ``action`` every ``interval`` optimizer steps (0: never on a schedule) and remembers the last step it
    ran at, so the end of the run (or a stop) runs it only if that step has not had it yet."""

    def __init__(self, interval: int, action: Callable[[], Any]):
        self.interval = interval
        self.action = action
        self.last_step: int | None = None

    def should_act(self, step: int) -> bool:
        return bool(self.interval) and step % self.interval == 0

    def maybe(self, step: int) -> bool:
        """Run the action if ``step`` is on the schedule; True if it ran."""
        if not self.should_act(step):
            return False
        self.run(step)
        return True

    def run(self, step: int) -> Any:
        self.last_step = step
        return self.action()

    def done_at(self, step: int) -> bool:
        return self.last_step == step


class TrainLogger:
    """Accumulates each step's loss on the device (no host sync) and, every ``logging_steps`` and at the last step,
    makes one :class:`~gpt2_accel.run_files.TrainLog` line: the mean loss over all ranks since the previous line,
    tokens/s, MFU, and a ``loss_spike`` flag when the loss jumps above 1.5x its recent mean after warmup."""

    def __init__(
        self,
        *,
        logging_steps: int,
        max_steps: int,
        warmup_steps: int,
        tokens_per_step: int,
        flops_per_token: float,
        peak_flops: float,
        num_processes: int,
        device: torch.device,
    ):
        self.every, self.max_steps, self.warmup_steps = logging_steps, max_steps, warmup_steps
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.peak_flops, self.num_processes = peak_flops, num_processes
        self.loss_sum = torch.zeros((), device=device)  # summed over the steps since the last line
        self.steps = 0
        self.loss_ema: float | None = None
        self.t0 = time.perf_counter()

    def add(self, step_loss: torch.Tensor) -> None:
        self.loss_sum += step_loss
        self.steps += 1

    def should_log(self, step: int) -> bool:
        return step % self.every == 0 or step == self.max_steps

    def pause(self) -> None:
        """Restart the throughput clock: time spent evaluating or saving is not training throughput."""
        self.t0 = time.perf_counter()

    def line(self, step: int, mean_loss: float, lr: float, grad_norm, tokens: int) -> TrainLog:
        """The line for ``step``; ``mean_loss`` is :meth:`local_mean` reduced over the ranks. Resets the window."""
        tok_s = self.steps * self.tokens_per_step / (time.perf_counter() - self.t0)
        logs = TrainLog(
            step=step,
            loss=mean_loss,
            lr=lr,
            grad_norm=float(grad_norm) if isinstance(grad_norm, torch.Tensor) else grad_norm,
            tokens=tokens,
            tokens_per_sec=tok_s,
            mfu=tok_s * self.flops_per_token / (self.peak_flops * self.num_processes),
        )
        if self.loss_ema is not None and step > self.warmup_steps and mean_loss > 1.5 * self.loss_ema:
            logs["loss_spike"] = True
            logger.warning("loss spike at step %d: %.4f vs recent mean %.4f", step, mean_loss, self.loss_ema)
        self.loss_ema = mean_loss if self.loss_ema is None else 0.9 * self.loss_ema + 0.1 * mean_loss
        self.loss_sum.zero_()
        self.steps = 0
        self.pause()
        return logs

    def local_mean(self) -> torch.Tensor:
        """This rank's mean loss over the steps since the last line (a device tensor, to reduce over ranks)."""
        return self.loss_sum / self.steps
