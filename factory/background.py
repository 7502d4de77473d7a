"""Evaluations on a core the training leaves idle (`pipeline.eval.background`).

A CPU run trains on one thread by default (conf/trainer/cpu.yaml), so on a machine with more
cores the evaluation of a finished model can run beside the training of the next one. As soon
as the pipeline has every input of an eval stage, the stage is sent to one worker process
(spawned, so it shares no torch state, no RNG and no thread pool with the training); the main
process later reaches the stage in plan order, waits for the worker's result, and records the
worker's ledger entry as built in this run. An eval reads only its model artifact and draws from
its own seeded generator, on the same number of threads, so its numbers are the ones the main
process would have computed.

The store's claim lock (factory/store.py) keeps the two processes from building one artifact
twice. If the worker fails (or is killed), the main process builds the stage itself, as
without this option.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from omegaconf import OmegaConf

from factory.environment import available_cores
from factory.config import LoggerConfig
from factory.ledger import Ledger, LedgerEntry
from factory.metrics import MetricsLogger
from factory.pipeline import Pipeline, Stage

log = logging.getLogger(__name__)


def background_evals_apply(cfg, world: int, threads: int | None) -> bool:
    """Whether this run evaluates in the background: asked for, on a CPU, one process, and a
    core beyond the training's `threads` (None: torch's default, every core) to run on."""
    if not cfg.pipeline.eval.background or cfg.trainer.device != "cpu" or world != 1:
        return False
    return threads is not None and available_cores() > threads


def root_stages(stages: list[Stage]) -> list[Stage]:
    """The training stages that need nothing from the plan, except its first (which the main
    process starts with): what `pipeline.background_roots` gives the worker at once."""
    return [s for s in stages[1:] if not s.needs and s.kind != "eval"]


class BackgroundEvals:
    """One worker process that builds eval stages submitted to it, in submission order."""

    def __init__(self, cfg, run_dir: Path, threads: int):
        self._cfg_yaml = OmegaConf.to_yaml(cfg, resolve=True)
        self._run_dir = str(run_dir)
        self._threads = threads
        self._pool: ProcessPoolExecutor | None = None  # started with the first submission
        self._futures: dict[str, Future] = {}
        self._considered: set[str] = set()  # each stage is looked up in the store once
        self._broken = False  # the worker died: the main process builds everything from then on

    def submit(self, stage: Stage, pipeline: Pipeline) -> None:
        """Send `stage` to the worker unless it was sent already or the store holds it."""
        if self._broken or stage.name in self._considered:
            return
        self._considered.add(stage.name)
        if pipeline.store.get(stage.kind, pipeline.key(stage)):
            return
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker, initargs=(self._threads, os.getpid()))
        upstream = {n: (pipeline.artifacts[n].kind, pipeline.artifacts[n].key)
                    for n in stage.needs}
        try:
            future = self._pool.submit(
                _build_stage, self._cfg_yaml, stage.name, upstream, self._run_dir)
        except BrokenProcessPool:
            self._broken = True
            return
        log.info("stage %s: %s in the background", stage.name,
                 "evaluating" if stage.kind == "eval" else "building")
        self._futures[stage.name] = future

    def result(self, stage: Stage) -> LedgerEntry | None:
        """The worker's ledger entry for `stage` (waiting for it), or None when it was not sent
        or the worker failed (the caller then builds the stage itself)."""
        future = self._futures.pop(stage.name, None)
        if future is None:
            return None
        try:
            return future.result()
        except Exception as err:  # noqa: BLE001 -- any failure: the main process builds it
            self._broken = self._broken or isinstance(err, BrokenProcessPool)
            log.warning("stage %s: the background evaluation failed (%s: %s); building it here",
                        stage.name, type(err).__name__, err)
            return None

    def close(self, wait: bool = True) -> None:
        """Stop the worker; `wait=False` (the run failed) does not wait for a running eval."""
        if self._pool is not None:
            self._pool.shutdown(wait=wait, cancel_futures=True)
            self._pool = None


def _init_worker(threads: int, parent: int) -> None:
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    # A killed run must not leave its worker behind (holding the run's output pipes and a claim
    # on an artifact): the worker exits as soon as its parent is gone.
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.2)
    os._exit(1)


def _build_stage(cfg_yaml: str, name: str, upstream: dict[str, tuple[str, str]],
                 run_dir: str) -> LedgerEntry:
    """In the worker: compose the run's plan, build stage `name` from its upstream artifacts,
    return its ledger entry (the worker writes no ledger file)."""
    from factory.plan import build_plan
    from factory.store import Store

    cfg = OmegaConf.create(cfg_yaml)
    stage = next(s for s in build_plan(cfg).stages if s.name == name)
    store = Store(cfg.artifacts_dir)
    # a training stage's metrics go to a file of the worker's own; the main process copies
    # them into the run's metrics.jsonl (and wandb) when it takes the stage (replay_metrics)
    with MetricsLogger(worker_metrics_dir(Path(run_dir), name),
                       LoggerConfig(mode="disabled")) as metrics:
        pipeline = Pipeline(store, Path(run_dir), metrics=metrics,
                            ledger=Ledger(Path(run_dir), write=False))
        for need, (kind, key) in upstream.items():
            pipeline.artifacts[need] = store.get(kind, key)
        pipeline.run(stage)
    return pipeline.ledger.entries[-1]


def worker_metrics_dir(run_dir: Path, stage: str) -> Path:
    return run_dir / ".background" / stage.replace("/", "-")


def replay_metrics(run_dir: Path, stage: str, metrics: MetricsLogger) -> int:
    """Copy the worker's metric lines for `stage` into the run's logger; how many."""
    path = worker_metrics_dir(run_dir, stage) / "metrics.jsonl"
    if not path.is_file():
        return 0
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for record in records:
        metrics.replay(record)
    shutil.rmtree(path.parent, ignore_errors=True)
    return len(records)
