"""The processes of one run: who this process is, who writes, and how the processes agree.

`python -m factory.run` is one process. Under `accelerate launch --multi_gpu --num_processes N`
(torchrun underneath; on a machine without GPUs, with `trainer=cpu`, the N processes train on
CPU over gloo) or `torchrun --nproc_per_node N -m factory.run`, every process runs the whole
run: Hydra's main, the plan, every stage in order. They divide the work like this
(docs/design.md, "Multi-process runs"):

* **Training stages shard their batches.** A step's global batch is drawn the same way on every
  rank (a pure function of the seed, step and micro-batch) and rank r trains on rows
  ``r::world`` of it (`shard`). The loss is normalised by the token count of the whole global
  step and multiplied by the world size, because DDP/FSDP average the gradients over ranks: the
  averaged gradient is the one-process gradient of the same global batch (factory/loop.py).
* **Only rank 0 writes**: the store's artifacts, the run directory's files, the metrics, the
  ledger, the report. The other ranks wait for rank 0 (`wait_for_everyone`) and then read the
  artifact it published; the store must therefore be on a filesystem every process sees.
* **Stages that do not shard run on rank 0 alone** (evaluation, the teacher's generation and
  logit recording), the others waiting at a barrier. PROCESS_GROUP_TIMEOUT bounds that wait.
* **The run directory is agreed before Hydra starts**: rank 0's clock is broadcast
  (`agree_launch_time`) and `hydra.run.dir` is built from it (the `launch_time` resolver in
  conf/config.yaml), so every process resolves the same `outputs/<date>/<time>`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Sequence, TypeVar

import torch
from accelerate import PartialState

from factory.errors import ConfigError

log = logging.getLogger(__name__)

LAUNCH_TIME_ENV = "FACTORY_LAUNCH_TIME"  # rank 0's time.time() at launch, set in every process
# Rank 0 evaluates and generates alone while the other ranks wait at a barrier; torch's default
# 30 minutes is shorter than a real-scale evaluation (HF Trainer raises it with `ddp_timeout`).
PROCESS_GROUP_TIMEOUT = timedelta(hours=6)

T = TypeVar("T")


@dataclass(frozen=True)
class Rank:
    index: int  # this process's index, 0..world-1
    world: int  # number of training processes

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes."""
        return self.index == 0


def _state(cpu: bool | None = None) -> PartialState:
    """accelerate's per-process state, created on first use. Once created its arguments are
    ignored, so the first call decides CPU (gloo) or GPU (nccl): `init_processes`, or a
    training loop's Accelerator, or, for a bare call, whether CUDA is visible."""
    if cpu is None:
        cpu = not torch.cuda.is_available()
    return PartialState(cpu=cpu, timeout=PROCESS_GROUP_TIMEOUT)


def launched_world() -> int:
    """The process count a launcher announced in the environment (1 without one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_processes(device: str) -> Rank:
    """Join the run's processes for a trainer on `device` ("cpu" | "cuda") and return this rank.

    Raises ConfigError when a multi-process launch already joined on the other kind of device
    (GPUs visible but `trainer=cpu`, or the reverse), naming the fix.
    """
    want_cpu = device == "cpu"
    state = _state(cpu=want_cpu)
    on_cpu = state.device.type == "cpu"
    if state.num_processes > 1 and on_cpu != want_cpu:
        raise ConfigError(
            f"this multi-process run joined its {state.num_processes} processes on "
            f"{state.device.type}, but trainer.device={device}: on a machine with GPUs use "
            f"trainer=gpu, or hide them (CUDA_VISIBLE_DEVICES=) to train CPU processes")
    if (state.num_processes == 1 and os.environ.get("MASTER_ADDR")
            and os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")):
        # accelerate's simple launcher sets MASTER_ADDR only when asked for several processes
        log.warning("`accelerate launch --cpu --num_processes N` started one process: without "
                    "--mpirun_hostfile accelerate runs a single CPU process. For N CPU "
                    "processes on one machine use `accelerate launch --multi_gpu "
                    "--num_processes N -m factory.run trainer=cpu ...` (torchrun; gloo) or "
                    "`torchrun --nproc_per_node N -m factory.run ...`")
    return Rank(state.process_index, state.num_processes)


def current_rank() -> Rank:
    """The process index and count of this run (0 and 1 without a multi-process launch)."""
    state = _state()
    return Rank(state.process_index, state.num_processes)


def current_device() -> torch.device:
    """The device this process trains on: where a micro_step puts its batch."""
    return _state().device


def wait_for_everyone() -> None:
    """A barrier over the run's processes (nothing in a one-process run)."""
    _state().wait_for_everyone()


def broadcast(obj: T) -> T:
    """Rank 0's `obj` on every rank (pickled; for small objects: flags, times, summaries)."""
    if _state().num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([obj], from_process=0)[0]


def all_sum(values: Sequence[int]) -> list[int]:
    """Each integer summed over the run's processes (a collective: every rank must call it)."""
    state = _state()
    if state.num_processes == 1:
        return [int(v) for v in values]
    import torch.distributed as dist

    t = torch.tensor([int(v) for v in values], dtype=torch.int64, device=state.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [int(v) for v in t.tolist()]


def shard(rows: Sequence[T] | Any, rank: Rank | None = None) -> Any:
    """This rank's share of a global batch: rows ``rank::world`` (every rank holds the global
    batch in the same order, so the shares are disjoint and cover it)."""
    rank = rank or current_rank()
    return rows[rank.index :: rank.world]


def check_shardable(what: str, rows: int, rank: Rank | None = None) -> None:
    """Refuse a global micro-batch with fewer rows than processes (a rank with no rows would
    have no graph for DDP to synchronise), naming the setting."""
    rank = rank or current_rank()
    if rows < rank.world:
        raise ConfigError(f"{what}: {rows} rows per micro-batch cannot be shared by "
                          f"{rank.world} processes; raise it to at least {rank.world} rows per "
                          f"micro-batch, or launch fewer processes")


# ----------------------------------------------------------------------------------------------
# The run directory: one time for every process
# ----------------------------------------------------------------------------------------------


def agree_launch_time() -> None:
    """Before Hydra starts: every process of a multi-process launch takes rank 0's clock.

    Hydra resolves `hydra.run.dir` in each process from the time; processes that start a second
    apart would write two run directories. Rank 0's `time.time()` is broadcast and kept in
    LAUNCH_TIME_ENV, which the `launch_time` resolver reads. A one-process run, or one whose
    environment already names the time, needs nothing.
    """
    if launched_world() <= 1 or os.environ.get(LAUNCH_TIME_ENV):
        return
    import time

    os.environ[LAUNCH_TIME_ENV] = repr(broadcast(time.time()))


def launch_time(pattern: str) -> str:
    """OmegaConf resolver `${launch_time:%Y-%m-%d}`: the launch time (rank 0's, see
    `agree_launch_time`) formatted like Hydra's `${now:...}`; the current time without one."""
    stamp = os.environ.get(LAUNCH_TIME_ENV)
    when = datetime.fromtimestamp(float(stamp)) if stamp else datetime.now()
    return when.strftime(pattern)


def register_launch_time() -> None:
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("launch_time", launch_time, use_cache=True, replace=True)
