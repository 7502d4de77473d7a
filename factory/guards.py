"""Guarded numerics for the training loop: a bad step stops the stage or is skipped, never applied.

A step is bad when its loss or its gradient norm is NaN or inf (fp16's overflowing gradients
excepted: the loss scaler skips those updates itself), or, with `trainer.loss_spike_factor` F > 0,
when its loss exceeds F x the median of the last SPIKE_WINDOW accepted losses (once
SPIKE_MIN_HISTORY of them exist, and only while that median is positive: an RL surrogate loss
hovers around 0, where a ratio means nothing). `trainer.on_nonfinite` says what a bad step does:

    stop   NonFiniteError naming the stage, the step and the values; the update is not applied
           and the last checkpoint in the work dir is the one the rerun resumes from (default)
    skip   no update (gradients dropped, the schedule still advances, so step s keeps step s's
           learning rate and batch); a warning names the step; `skipped_steps` joins the logged
           metrics. MAX_CONSECUTIVE_SKIPS bad steps in a row stop the stage anyway: that is a
           diverged run, not a bad batch.

The guard's memory (recent losses, skip counts) lives in the loop's checkpointed state, so a
resumed stage makes the decisions an uninterrupted one would.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from factory.errors import ConfigError

ON_NONFINITE = ("stop", "skip")
SPIKE_WINDOW = 50  # accepted losses the running median is taken over
SPIKE_MIN_HISTORY = 10  # the guard does not judge spikes against fewer losses than this
MAX_CONSECUTIVE_SKIPS = 10


def check_guard_config(trainer_cfg) -> None:
    """Refuse an unknown `on_nonfinite` or a spike factor that would flag ordinary steps."""
    if trainer_cfg.on_nonfinite not in ON_NONFINITE:
        raise ConfigError(f"trainer.on_nonfinite must be one of {', '.join(ON_NONFINITE)}, got "
                          f"{trainer_cfg.on_nonfinite!r}")
    factor = trainer_cfg.loss_spike_factor
    if not (factor == 0 or factor > 1) or not math.isfinite(factor):
        raise ConfigError(f"trainer.loss_spike_factor must be 0 (off) or > 1 (a multiple of the "
                          f"running median loss), got {factor}")


class StepGuard:
    """Judges each step before its update (module docstring). `state` is the loop's
    checkpointed state object: the guard keeps `recent_losses`, `skipped` and
    `consecutive_skips` on it."""

    def __init__(self, trainer_cfg, state: Any) -> None:
        check_guard_config(trainer_cfg)
        self.action = trainer_cfg.on_nonfinite
        self.factor = float(trainer_cfg.loss_spike_factor)
        self.state = state

    def problem(self, loss: float, grad_norm: float, fp16_overflow: bool) -> str | None:
        """What is wrong with this step (a phrase), or None when it is good."""
        if not math.isfinite(loss):
            return "non-finite loss"
        if not math.isfinite(grad_norm) and not fp16_overflow:
            return "non-finite gradient norm"
        recent = self.state.recent_losses
        if self.factor > 0 and len(recent) >= SPIKE_MIN_HISTORY:
            median = statistics.median(recent)
            if median > 0 and loss > self.factor * median:
                return (f"loss spike (above trainer.loss_spike_factor={self.factor:g} x the "
                        f"running median {median:.4g} of the last {len(recent)} steps)")
        return None

    def accept(self, loss: float) -> None:
        self.state.recent_losses = (self.state.recent_losses + [loss])[-SPIKE_WINDOW:]
        self.state.consecutive_skips = 0

    def skip(self) -> bool:
        """Count a skipped step; False when it is one too many in a row (then stop instead)."""
        self.state.skipped += 1
        self.state.consecutive_skips += 1
        return self.state.consecutive_skips < MAX_CONSECUTIVE_SKIPS
