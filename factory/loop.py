"""The one training loop every stage runs (SFT, pretraining, distillation, RL).

A stage hands `train` a model and a `micro_step` function; the loop owns everything else:
AdamW, warmup + cosine schedule, gradient accumulation and clipping, mixed precision (through
`accelerate.Accelerator`), checkpoints and resume, the progress bar and the metrics.

Conventions a stage must follow:

- **Steps are numbered from 1.** `micro_step(model, step, micro)` is called for
  `step = 1..steps` (the optimizer update it contributes to) and `micro = 0..grad_accum-1`.
  Logged steps, the checkpointed step and `TrainResult.resumed_from` all count completed
  optimizer steps, so "step 7" means the same update everywhere.
- **Batches are a pure function of (step, micro, rank).** The loop keeps no data-loader state,
  so a resumed run sees the same batches as an uninterrupted one. `current_rank()` gives the
  process index and count, for a stage that shards its data across processes, and
  `current_device()` the device to put the batch on (the model may be wrapped by DDP/FSDP).
  A sharding stage draws the step's *global* micro-batch on every rank and trains on its rows
  ``rank::world`` (factory/processes.py), so the global batch does not depend on the world size.
- **The loss is already normalised for the whole optimizer step, over all ranks.** The loop
  sums the gradients of the `grad_accum` micro-batches without dividing, and DDP/FSDP average
  them over the `world` ranks. So a per-token loss divides each micro-batch's token sum by the
  token count of the whole step on all ranks together (every micro-batch, every rank's shard)
  and multiplies it by `world`: the averaged gradient is then exactly the gradient of the
  per-token mean over the global step, and `grad_accum=4` x batch b on `world=2` ranks gives
  the update of `grad_accum=1` x batch 8b on one process, including when micro-batches and
  shards hold different numbers of tokens. (A stage whose ranks all train on the same rows,
  unsharded, normalises by its own count: the average of identical gradients is that gradient.)
  The logged loss is the sum over micro-batches averaged over ranks, i.e. the step's loss.
- **Stage metrics are averaged over the step's micro-batches and over ranks.** A per-token
  metric reports its micro-batch sum x grad_accum x world / the step's global token count, so
  that average is the exact per-token mean of the global step.

Checkpoint layout (`work_dir/checkpoint/`, written by `accelerator.save_state`, so FSDP shards
and per-process RNG states are handled by accelerate): `model.safetensors`, `optimizer.bin`,
`scheduler.bin`, `random_states_<rank>.pkl` (python, numpy, torch, cuda),
`custom_checkpoint_0.pkl` (the loop's own state: stage, total steps, completed step, tokens,
wall time, last metrics) and `custom_checkpoint_1.pkl` (the stage's `extra_state`, if any). It
is written to `checkpoint.tmp/` and renamed into place, so `checkpoint/` is always complete.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import torch
from accelerate import Accelerator, PartialState
from tqdm.auto import tqdm

from factory.config import TrainerConfig
from factory import faults
from factory.errors import ArtifactError, ConfigError, NonFiniteError
from factory.guards import StepGuard
from factory.metrics import MetricsLogger
from factory.store import verify_checksums, write_checksums
from factory.processes import Rank, current_device, current_rank  # noqa: F401 (re-exported for stages)

CHECKPOINT = "checkpoint"
_TMP = "checkpoint.tmp"  # a checkpoint being written; a leftover one is from a killed write
_OLD = "checkpoint.old"  # the previous checkpoint during the swap (see _publish)

log = logging.getLogger(__name__)

MIN_LR_RATIO = 0.1  # the cosine ends at 10% of the peak learning rate
# False in the background worker (factory/background.py): the terminal shows the main process's bar
SHOW_PROGRESS = True
ADAMW_BETAS = (0.9, 0.95)


@dataclass
class StepOutput:
    """What a stage's micro_step returns for one micro-batch.

    loss: scalar with grad, normalised for the whole optimizer step (module docstring).
    tokens: tokens this micro-batch trained on (for tokens/s and the ledger).
    metrics: the stage's own numbers; the loop averages them over the step's micro-batches.
    """

    loss: torch.Tensor
    tokens: int
    metrics: dict[str, float] = field(default_factory=dict)


MicroStep = Callable[[torch.nn.Module, int, int], StepOutput]


class Stateful(Protocol):
    """Extra state a stage keeps across resume (e.g. an RL entropy controller)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class StopCheck:
    """A measurement of the model the loop takes every `every` steps from step `after` on, and
    at the last step: training stops after the first step whose value reaches `target`, and
    that step's weights are final. `measure(model, step)` sees the unwrapped model in eval mode
    under no_grad; it must not draw from torch's global generator (training would then differ
    from a run without checks), and must give every process the same value."""

    name: str  # the metric it is logged under
    measure: Callable[[torch.nn.Module, int], float]
    target: float
    every: int
    after: int = 0

    def __post_init__(self) -> None:
        if self.every < 1 or self.after < 0:
            raise ConfigError(f"check {self.name!r}: every must be >= 1 and after >= 0, got "
                              f"every={self.every}, after={self.after}")

    def due(self, step: int, steps: int) -> bool:
        return step == steps or (step >= self.after and step % self.every == 0)


@dataclass
class TrainResult:
    steps: int  # completed optimizer steps (the requested steps unless a StopCheck passed)
    tokens: int  # tokens trained on, all processes, all segments of a resumed run
    wall_s: float  # wall time of all segments up to the last checkpoint, plus this one's tail
    final_metrics: dict[str, float]  # the last step's logged metrics
    resumed_from: int  # completed steps found in the checkpoint (0: a fresh start)
    checks: list[tuple[int, float]] = field(default_factory=list)  # (step, value) of each check
    passed: Optional[bool] = None  # whether the StopCheck reached its target (None: no check)


def warmup_steps(steps: int, warmup_ratio: float) -> int:
    return min(steps, math.ceil(warmup_ratio * steps))


def lr_multiplier(step: int, steps: int, warmup_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step `step` (1-based).

    Linear warmup to 1 over the first ceil(warmup_ratio * steps) steps, then a cosine from 1 at
    the first step after warmup down to MIN_LR_RATIO at the last step, and MIN_LR_RATIO after
    it (the steps a StopCheck may add past the schedule).
    """
    if step > steps:
        return MIN_LR_RATIO
    warm = warmup_steps(steps, warmup_ratio)
    if step <= warm:
        return step / warm
    decay_steps = steps - warm - 1  # the first decay step is at 1, the last at MIN_LR_RATIO
    progress = 1.0 if decay_steps <= 0 else (step - warm - 1) / decay_steps
    return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress))


class _LoopState:
    """The loop's own counters, checkpointed with the model (custom_checkpoint_0.pkl)."""

    def __init__(self, stage: str, steps: int) -> None:
        self.stage, self.steps = stage, steps
        self.step, self.tokens, self.wall_s = 0, 0, 0.0
        self.last_metrics: dict[str, float] = {}
        # the step guard's memory (factory/guards.py)
        self.recent_losses: list[float] = []
        self.skipped, self.consecutive_skips = 0, 0
        # the StopCheck's record: (step, value) of each check, and whether one passed
        self.checks: list[tuple[int, float]] = []
        self.passed = False

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["stage"], state["steps"]) != (self.stage, self.steps):
            raise ArtifactError(
                f"the checkpoint in this work dir is from stage {state['stage']!r} with "
                f"{state['steps']} steps, not {self.stage!r} with {self.steps}; a stage's "
                f"schedule depends on its step count, so it cannot be resumed with another. "
                f"Delete the checkpoint directory to start over."
            )
        vars(self).update(state)


def train(
    model: torch.nn.Module,
    micro_step: MicroStep,
    *,
    stage: str,
    steps: int,
    lr: float,
    warmup_ratio: float,
    grad_accum: int,
    trainer_cfg: TrainerConfig,
    work_dir: Path,
    metrics: Optional[MetricsLogger] = None,
    extra_state: Optional[Stateful] = None,
    stop: Optional[StopCheck] = None,
    schedule_steps: Optional[int] = None,
) -> TrainResult:
    """Train `model` for `steps` optimizer steps of `grad_accum` micro-batches each.

    The lr schedule (warmup, cosine) spans `schedule_steps` (default: `steps`) and stays at its
    final value after it. With `stop`, training ends early at the first check that reaches its
    target (`StopCheck`); the checks and their outcome are checkpointed, so a resumed run
    neither repeats a check nor trains past a passed one.

    Resumes from `work_dir/checkpoint` when it exists; checkpoints every
    `trainer_cfg.checkpoint_every` steps (0: only at the end) and after the last step. The
    model is trained in place. On CPU in fp32 a resumed run ends with exactly the weights of an
    uninterrupted one. A step whose loss or gradient norm is NaN or inf (except fp16's
    overflowing gradients, whose update the loss scaler skips), or whose loss spikes, stops the
    stage with NonFiniteError before its update or is skipped, by `trainer_cfg.on_nonfinite`
    (factory/guards.py); weights that are not finite are never checkpointed (NonFiniteError
    again), so the checkpoint in `work_dir` is always the last good one. accelerate keeps one
    AcceleratorState per process, so every call in a process must use the same precision and
    device.
    """
    if grad_accum < 1 or steps < 0:
        raise ConfigError(f"stage {stage!r}: grad_accum must be >= 1 and steps >= 0, "
                          f"got grad_accum={grad_accum}, steps={steps}")
    if trainer_cfg.num_threads > 0:
        torch.set_num_threads(trainer_cfg.num_threads)
    work_dir = Path(work_dir)
    accelerator = Accelerator(
        mixed_precision=trainer_cfg.precision,
        cpu=trainer_cfg.device == "cpu",
        # 1, not grad_accum: accelerator.backward would divide the loss by it, and the stage's
        # loss is already normalised for the step. Accumulation is the no_sync below.
        gradient_accumulation_steps=1,
        # the scheduler counts optimizer steps; left linked, accelerate would step it once per
        # process per update
        step_scheduler_with_optimizer=False,
    )
    # on CPU torch's default is one kernel per tensor per operation; the fused kernel does the
    # whole update in one pass (2.5 -> 1.2 ms a step for the tiny teacher, docs/benchmarks.md).
    # CUDA keeps torch's default (foreach): fused has not been run here under FSDP
    optimizer = torch.optim.AdamW(
        _param_groups(model, trainer_cfg.weight_decay), lr=lr, betas=ADAMW_BETAS,
        fused=True if trainer_cfg.device == "cpu" else None,
    )
    # LambdaLR's epoch counts completed optimizer steps: the update of step s uses lambda(s - 1)
    schedule_steps = steps if schedule_steps is None else schedule_steps
    if not 0 < schedule_steps <= steps and steps > 0:
        raise ConfigError(f"stage {stage!r}: the lr schedule's {schedule_steps} steps must be in "
                          f"1..{steps} (the stage's steps)")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda done: lr_multiplier(done + 1, schedule_steps, warmup_ratio)
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    state = _LoopState(stage, steps)
    accelerator.register_for_checkpointing(state)
    if extra_state is not None:
        accelerator.register_for_checkpointing(extra_state)
    ckpt_dir = _recover_checkpoint(accelerator, work_dir)
    if ckpt_dir is not None:
        accelerator.load_state(str(ckpt_dir))
    resumed_from = state.step
    last_checkpoint = resumed_from  # the step of the checkpoint in work_dir (0: none)
    guard = StepGuard(trainer_cfg, state)

    clip = trainer_cfg.grad_clip if trainer_cfg.grad_clip > 0 else math.inf
    model.train()
    bar = tqdm(
        total=steps,
        initial=resumed_from,
        desc=stage,
        unit="step",
        disable=None if SHOW_PROGRESS and trainer_cfg.progress and accelerator.is_main_process
        else True,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    t_start = time.perf_counter()
    wall_before = state.wall_s
    tokens_at_start = state.tokens
    window_t, window_tokens = t_start, state.tokens
    try:
        # a run killed after its passing check resumes with nothing left to train
        for step in range(steps + 1 if state.passed else resumed_from + 1, steps + 1):
            loss_sum = torch.zeros((), device=accelerator.device)
            tokens = 0
            stage_sums: dict[str, float] = {}
            for micro in range(grad_accum):
                # gradients sync across processes once per step, on the last micro-batch
                sync = contextlib.nullcontext() if micro == grad_accum - 1 else (
                    accelerator.no_sync(model)
                )
                with sync:
                    out = micro_step(model, step, micro)
                    accelerator.backward(out.loss)
                loss_sum += out.loss.detach().float()
                tokens += int(out.tokens)
                for k, v in out.metrics.items():
                    stage_sums[k] = stage_sums.get(k, 0.0) + float(v)
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), clip)
            loss = accelerator.reduce(loss_sum, "mean").item()
            grad_norm = float(grad_norm)
            step_tokens = int(
                accelerator.reduce(torch.tensor(tokens, device=accelerator.device), "sum")
            )
            step_lr = scheduler.get_last_lr()[0]
            # ---- guarded numerics (factory/guards.py): a bad step is never applied ----
            # fp16's loss scaler expects the occasional inf gradient and skips that update
            fp16_overflow = accelerator.scaler is not None and math.isfinite(loss)
            problem = guard.problem(loss, grad_norm, fp16_overflow)
            if problem is not None and (trainer_cfg.on_nonfinite == "stop" or not guard.skip()):
                why = ("" if trainer_cfg.on_nonfinite == "stop" else
                       f" ({state.consecutive_skips} bad steps in a row with "
                       f"trainer.on_nonfinite=skip: the run has diverged)")
                raise NonFiniteError(
                    f"stage {stage!r}: {problem} at step {step} of {steps} (loss={loss}, "
                    f"grad_norm={grad_norm}, lr={step_lr:.3g}){why}; "
                    f"no update was applied and {_kept(work_dir, last_checkpoint)}. Lower the "
                    f"learning rate, train in fp32 or bf16, check the stage's loss inputs, or "
                    f"set trainer.on_nonfinite=skip to drop such steps."
                )
            if problem is None:
                guard.accept(loss)
                optimizer.step()
            else:
                log.warning("stage %r: skipped step %d of %d: %s (loss=%s, grad_norm=%s; "
                            "trainer.on_nonfinite=skip, %d skipped so far)", stage, step, steps,
                            problem, loss, grad_norm, state.skipped)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            # ---- end of the guard ----

            state.step = step
            state.tokens += step_tokens
            now = time.perf_counter()
            tok_s_run = (state.tokens - tokens_at_start) / max(now - t_start, 1e-9)
            state.last_metrics = {
                "loss": loss,
                "lr": step_lr,
                "grad_norm": grad_norm,
                "tokens": state.tokens,
                **_mean_over_ranks(accelerator,
                                   {k: v / grad_accum for k, v in stage_sums.items()}),
            }
            if state.skipped:
                state.last_metrics["skipped_steps"] = state.skipped
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4g}", tok_s=f"{tok_s_run:.3g}", refresh=False)
            last = step == steps
            checked = stop is not None and stop.due(step, steps)
            if checked:
                value = _measure(accelerator, model, stop, step)
                state.checks.append((step, value))
                state.passed = value >= stop.target
                log.info("stage %r: step %d: %s = %.4g (target %.4g)%s", stage, step, stop.name,
                         value, stop.target, ": reached, training stops" if state.passed else "")
                state.last_metrics[stop.name] = value
                last = last or state.passed
            log_every = trainer_cfg.log_every
            if metrics is not None and (last or checked
                                        or (log_every > 0 and step % log_every == 0)):
                window_s = max(now - window_t, 1e-9)
                state.last_metrics["tokens_per_s"] = (state.tokens - window_tokens) / window_s
                metrics.log(stage, step, state.last_metrics)
                window_t, window_tokens = now, state.tokens
            ckpt_every = trainer_cfg.checkpoint_every
            if last or (ckpt_every > 0 and step % ckpt_every == 0):
                state.wall_s = wall_before + (time.perf_counter() - t_start)
                _check_finite_weights(accelerator, model, stage, step, work_dir, last_checkpoint)
                _save_checkpoint(accelerator, work_dir)
                last_checkpoint = step
                faults.point("checkpoint")  # FACTORY_KILL_AT test hook (factory/faults.py)
            if state.passed:
                break
    finally:
        bar.close()

    accelerator.wait_for_everyone()
    accelerator.unwrap_model(model, keep_fp32_wrapper=False)  # drops the autocast forward patch
    return TrainResult(
        steps=state.step,
        tokens=state.tokens,
        wall_s=wall_before + (time.perf_counter() - t_start),
        final_metrics=dict(state.last_metrics),
        resumed_from=resumed_from,
        checks=[tuple(c) for c in state.checks],
        passed=None if stop is None else state.passed,
    )


def _measure(accelerator: Accelerator, model: torch.nn.Module, stop: StopCheck,
             step: int) -> float:
    """The StopCheck's value at `step`, taken in eval mode and agreed across processes."""
    model.eval()
    try:
        with torch.no_grad():
            value = float(stop.measure(accelerator.unwrap_model(model), step))
    finally:
        model.train()
    return float(accelerator.reduce(torch.tensor(value, device=accelerator.device), "mean"))


def save_model(model: torch.nn.Module, tokenizer: Any, out_dir: Path) -> Path:
    """Write a Hugging Face checkpoint (safetensors + tokenizer) to `out_dir`, atomically.

    Call it with the unwrapped model. Only the main process writes (every rank holds the same
    weights after training); on the others it returns `out_dir` without touching it. `out_dir`
    either holds the complete new checkpoint or what it held before; a killed write leaves only
    `<out_dir>.tmp`.
    """
    out_dir = Path(out_dir)
    if not PartialState().is_main_process:
        return out_dir
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    _fsync_tree(tmp)
    _replace_dir(tmp, out_dir)
    return out_dir


def _mean_over_ranks(accelerator: Accelerator, values: dict[str, float]) -> dict[str, float]:
    """Each stage metric averaged over the processes (every rank logs the same keys per step)."""
    if accelerator.num_processes == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=accelerator.device)
    return dict(zip(keys, accelerator.reduce(t, "mean").tolist()))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: norms' gains and biases (ndim < 2) are not decayed (as nanoGPT)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def _recover_checkpoint(accelerator: Accelerator, work_dir: Path) -> Optional[Path]:
    """The complete checkpoint to resume from, if any, after undoing an interrupted swap;
    refused (ArtifactError naming the file) when it does not match its checksums."""
    ckpt, old = work_dir / CHECKPOINT, work_dir / _OLD
    if accelerator.is_main_process:
        if not ckpt.exists() and old.exists():
            os.replace(old, ckpt)  # killed between the two renames of _replace_dir
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(work_dir / _TMP, ignore_errors=True)  # a killed write; never complete
        if ckpt.exists():
            verify_checksums(ckpt, "a training checkpoint", f"delete {ckpt} and rerun; the stage "
                             f"then restarts from its first step")
    accelerator.wait_for_everyone()
    return ckpt if ckpt.exists() else None


def _save_checkpoint(accelerator: Accelerator, work_dir: Path) -> None:
    tmp = work_dir / _TMP
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_checksums(tmp)
        _fsync_tree(tmp)
        _replace_dir(tmp, work_dir / CHECKPOINT)
    accelerator.wait_for_everyone()


def _kept(work_dir: Path, last_checkpoint: int) -> str:
    if last_checkpoint == 0:
        return "no checkpoint was written yet (a rerun starts the stage over)"
    return f"the last good checkpoint (step {last_checkpoint}) is kept in {work_dir / CHECKPOINT}"


def _check_finite_weights(accelerator: Accelerator, model: torch.nn.Module, stage: str,
                          step: int, work_dir: Path, last_checkpoint: int) -> None:
    """Raise NonFiniteError rather than checkpoint weights holding NaN or inf (every rank
    checks its shard; the verdict is summed so all ranks agree)."""
    flags = [~torch.isfinite(p).all() for p in model.parameters() if p.numel()]
    bad = torch.stack(flags).sum().float() if flags else torch.zeros(())  # one host sync
    if accelerator.reduce(bad.to(accelerator.device), "sum").item() == 0:
        return
    raise NonFiniteError(
        f"stage {stage!r}: the weights hold NaN or inf after step {step} (the loss and gradient "
        f"norm were finite); they were not checkpointed and {_kept(work_dir, last_checkpoint)}. "
        f"Lower the learning rate or train in fp32.")


def _replace_dir(src: Path, dst: Path) -> None:
    """Move the complete directory `src` to `dst`, replacing it.

    rename(2) cannot replace a non-empty directory, so the old one steps aside to `<dst>.old`
    first; a crash between the two renames leaves `<dst>.old` complete, and
    `_recover_checkpoint` moves it back.
    """
    old = dst.with_name(dst.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    _fsync_dir(dst.parent)
    shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    """Flush every file under `root` to disk, so a renamed-in checkpoint survives power loss."""
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
