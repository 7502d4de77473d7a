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
- **The loss is already normalised for the whole optimizer step.** The loop sums the gradients
  of the `grad_accum` micro-batches without dividing: a per-token loss divides each
  micro-batch's token sum by the step's token count on this rank (all micro-batches together),
  so `grad_accum=4` x batch b gives the update of `grad_accum=1` x batch 4b, including when
  micro-batches hold different numbers of tokens. The logged loss is the sum over
  micro-batches, i.e. the step's loss. Across processes DDP/FSDP average the gradients.

Checkpoint layout (`work_dir/checkpoint/`, written by `accelerator.save_state`, so FSDP shards
and per-process RNG states are handled by accelerate): `model.safetensors`, `optimizer.bin`,
`scheduler.bin`, `random_states_<rank>.pkl` (python, numpy, torch, cuda),
`custom_checkpoint_0.pkl` (the loop's own state: stage, total steps, completed step, tokens,
wall time, last metrics) and `custom_checkpoint_1.pkl` (the stage's `extra_state`, if any). It
is written to `checkpoint.tmp/` and renamed into place, so `checkpoint/` is always complete.
"""

from __future__ import annotations

import contextlib
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
from factory.errors import ArtifactError, ConfigError, NonFiniteError
from factory.metrics import MetricsLogger

CHECKPOINT = "checkpoint"
_TMP = "checkpoint.tmp"  # a checkpoint being written; a leftover one is from a killed write
_OLD = "checkpoint.old"  # the previous checkpoint during the swap (see _publish)

MIN_LR_RATIO = 0.1  # the cosine ends at 10% of the peak learning rate
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
class TrainResult:
    steps: int  # completed optimizer steps (== the requested steps)
    tokens: int  # tokens trained on, all processes, all segments of a resumed run
    wall_s: float  # wall time of all segments up to the last checkpoint, plus this one's tail
    final_metrics: dict[str, float]  # the last step's logged metrics
    resumed_from: int  # completed steps found in the checkpoint (0: a fresh start)


@dataclass(frozen=True)
class Rank:
    index: int  # this process's index, 0..world-1
    world: int  # number of training processes


def current_rank() -> Rank:
    """The process index and count of this training run (0 and 1 without `accelerate launch`)."""
    state = PartialState()
    return Rank(state.process_index, state.num_processes)


def current_device() -> torch.device:
    """The device this process trains on: where a micro_step puts its batch."""
    return PartialState().device


def warmup_steps(steps: int, warmup_ratio: float) -> int:
    return min(steps, math.ceil(warmup_ratio * steps))


def lr_multiplier(step: int, steps: int, warmup_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step `step` (1-based).

    Linear warmup to 1 over the first ceil(warmup_ratio * steps) steps, then a cosine from 1 at
    the first step after warmup down to MIN_LR_RATIO at the last step.
    """
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
) -> TrainResult:
    """Train `model` for `steps` optimizer steps of `grad_accum` micro-batches each.

    Resumes from `work_dir/checkpoint` when it exists; checkpoints every
    `trainer_cfg.checkpoint_every` steps (0: only at the end) and after the last step. The
    model is trained in place. On CPU in fp32 a resumed run ends with exactly the weights of an
    uninterrupted one. Raises NonFiniteError, before the optimizer step and without writing a
    checkpoint, when the loss or the gradient norm is NaN or inf (except fp16's overflowing
    gradients, whose update the loss scaler skips). accelerate keeps one AcceleratorState per
    process, so every call in a process must use the same precision and device.
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
    optimizer = torch.optim.AdamW(
        _param_groups(model, trainer_cfg.weight_decay), lr=lr, betas=ADAMW_BETAS
    )
    # LambdaLR's epoch counts completed optimizer steps: the update of step s uses lambda(s - 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda done: lr_multiplier(done + 1, steps, warmup_ratio)
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

    clip = trainer_cfg.grad_clip if trainer_cfg.grad_clip > 0 else math.inf
    model.train()
    bar = tqdm(
        total=steps,
        initial=resumed_from,
        desc=stage,
        unit="step",
        disable=None if trainer_cfg.progress and accelerator.is_main_process else True,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    t_start = time.perf_counter()
    wall_before = state.wall_s
    tokens_at_start = state.tokens
    window_t, window_tokens = t_start, state.tokens
    try:
        for step in range(resumed_from + 1, steps + 1):
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
            # fp16's loss scaler expects the occasional inf gradient and skips that update
            fp16_overflow = accelerator.scaler is not None and math.isfinite(loss)
            if not math.isfinite(loss) or (not math.isfinite(grad_norm) and not fp16_overflow):
                what = "loss" if not math.isfinite(loss) else "gradient norm"
                raise NonFiniteError(
                    f"stage {stage!r}: non-finite {what} at step {step} of {steps} "
                    f"(loss={loss}, grad_norm={grad_norm}, lr={step_lr:.3g}); "
                    f"no update was applied and the last good checkpoint "
                    f"(step {state.step}) is kept in {work_dir / CHECKPOINT}. Lower the "
                    f"learning rate, train in fp32 or bf16, or check the stage's loss inputs."
                )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            state.step = step
            state.tokens += step_tokens
            now = time.perf_counter()
            tok_s_run = (state.tokens - tokens_at_start) / max(now - t_start, 1e-9)
            state.last_metrics = {
                "loss": loss,
                "lr": step_lr,
                "grad_norm": grad_norm,
                "tokens": state.tokens,
                **{k: v / grad_accum for k, v in stage_sums.items()},
            }
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4g}", tok_s=f"{tok_s_run:.3g}", refresh=False)
            last = step == steps
            log_every = trainer_cfg.log_every
            if metrics is not None and (last or (log_every > 0 and step % log_every == 0)):
                window_s = max(now - window_t, 1e-9)
                state.last_metrics["tokens_per_s"] = (state.tokens - window_tokens) / window_s
                metrics.log(stage, step, state.last_metrics)
                window_t, window_tokens = now, state.tokens
            ckpt_every = trainer_cfg.checkpoint_every
            if last or (ckpt_every > 0 and step % ckpt_every == 0):
                state.wall_s = wall_before + (time.perf_counter() - t_start)
                _save_checkpoint(accelerator, work_dir)
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
    )


def save_model(model: torch.nn.Module, tokenizer: Any, out_dir: Path) -> Path:
    """Write a Hugging Face checkpoint (safetensors + tokenizer) to `out_dir`, atomically.

    Call it on the main process with the unwrapped model. `out_dir` either holds the complete
    new checkpoint or what it held before; a killed write leaves only `<out_dir>.tmp`.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    _fsync_tree(tmp)
    _replace_dir(tmp, out_dir)
    return out_dir


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: norms' gains and biases (ndim < 2) are not decayed (as nanoGPT)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]


def _recover_checkpoint(accelerator: Accelerator, work_dir: Path) -> Optional[Path]:
    """The complete checkpoint to resume from, if any, after undoing an interrupted swap."""
    ckpt, old = work_dir / CHECKPOINT, work_dir / _OLD
    if accelerator.is_main_process:
        if not ckpt.exists() and old.exists():
            os.replace(old, ckpt)  # killed between the two renames of _replace_dir
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(work_dir / _TMP, ignore_errors=True)  # a killed write; never complete
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
        _fsync_tree(tmp)
        _replace_dir(tmp, work_dir / CHECKPOINT)
    accelerator.wait_for_everyone()


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
