"""The second lane: a worker process on the core the training leaves idle.

A CPU run trains on one thread by default (conf/trainer/cpu.yaml), so on a machine with more
cores a second process can build stages beside the main one (`pipeline.eval.background`, on by
default). The run then schedules its plan on two lanes, the main process and one spawned worker
(sharing no torch state, no RNG and no thread pool with it): each lane, when free, takes the
first stage whose inputs exist and that the other lane has not taken, training stages before
evaluations (an evaluation ends a chain; a training stage may start one). So the base student
trains beside the teacher's bootstrap, the four-stage arm beside the distillation arm, and each
model is evaluated as soon as it exists. With `pipeline.background_training=false` the worker
takes evaluations only.

Every stage reads only its upstream artifacts and draws from its own seeded generators on the
same number of threads, so a stage's artifact is the same whichever lane builds it (integration
tests compare the weights). Stage keys depend on the config alone, so the worker is told where
its inputs are before the main process has read them. The main process records each of the
worker's stages with the worker's ledger entry, copies its training metrics into the run's, and
builds the stage itself if the worker fails (or is killed). The store's claim lock
(factory/store.py) keeps two processes from building one artifact twice.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Callable

from omegaconf import OmegaConf

from factory.environment import available_cores
from factory.config import LoggerConfig
from factory.ledger import Ledger, LedgerEntry
from factory.metrics import MetricsLogger
from factory.pipeline import Pipeline, Stage, stage_key

log = logging.getLogger(__name__)


def background_evals_apply(cfg, world: int, threads: int | None) -> bool:
    """Whether this run has a worker: asked for, on a CPU, one process, and a core beyond the
    training's `threads` (None: torch's default, every core) to run on."""
    if not cfg.pipeline.eval.background or cfg.trainer.device != "cpu" or world != 1:
        return False
    return threads is not None and available_cores() > threads


def plan_keys(stages: list[Stage]) -> dict[str, str]:
    """Every stage's store key, from the config alone (the plan lists a stage after the stages
    it reads)."""
    keys: dict[str, str] = {}
    for stage in stages:
        keys[stage.name] = stage_key(stage, {n: keys[n] for n in stage.needs})
    return keys


class Worker:
    """One spawned process that builds one stage at a time (started by its first stage)."""

    def __init__(self, cfg, run_dir: Path, threads: int):
        self._cfg_yaml = OmegaConf.to_yaml(cfg, resolve=True)
        self._run_dir = str(run_dir)
        self._threads = threads
        self._pool: ProcessPoolExecutor | None = None

    def build(self, stage: Stage, upstream: dict[str, tuple[str, str]]) -> LedgerEntry:
        """Build `stage` in the worker from the artifacts `upstream` names ((kind, key) by
        stage name); its ledger entry. Waits; raises what the worker raised."""
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker, initargs=(self._threads, os.getpid()))
        return self._pool.submit(_build_stage, self._cfg_yaml, stage.name, upstream,
                                 self._run_dir).result()

    def close(self, wait: bool = True) -> None:
        """Stop the worker; `wait=False` (the run failed) does not wait for a running stage."""
        if self._pool is not None:
            self._pool.shutdown(wait=wait, cancel_futures=True)
            self._pool = None


def run_stages(stages: list[Stage], pipeline: Pipeline, worker: Worker | None = None,
               train_in_worker: bool = True,
               on_adopt: Callable[[Stage], None] = lambda stage: None) -> None:
    """Build (or reuse) every stage of the plan: in plan order in this process alone, or on two
    lanes with `worker` (module docstring). `on_adopt(stage)` runs when this process records a
    stage the worker built."""
    if worker is None:
        for stage in stages:
            pipeline.run(stage)
        return
    _Lanes(stages, pipeline, worker, train_in_worker, on_adopt).run()
    pipeline.ledger.order([s.name for s in stages])  # the ledger reads in plan order


class _Lanes:
    """The two-lane schedule: this process's loop, and a thread that feeds the worker."""

    def __init__(self, stages, pipeline: Pipeline, worker: Worker, train_in_worker: bool,
                 on_adopt):
        self.pipeline, self.worker, self.on_adopt = pipeline, worker, on_adopt
        self.train_in_worker = train_in_worker
        self.by_name = {s.name: s for s in stages}
        self.keys = plan_keys(stages)
        # training stages first (each may start a chain), then evaluations; plan order within
        self.queue = sorted(stages, key=lambda s: s.kind == "eval")
        self.cv = threading.Condition()
        self.taken: set[str] = set()  # started, by either lane
        self.built: set[str] = set()  # in the store, made or found by either lane
        # found in the store, or failed in the worker: this process records or builds them
        self.here_only: set[str] = set()
        self.results: list[tuple[Stage, LedgerEntry | None]] = []  # the worker's, unrecorded
        self.stopped = False

    def run(self) -> None:
        remaining = set(self.by_name)
        feeder = threading.Thread(target=self._feed, name="worker-feeder", daemon=True)
        try:
            while remaining:
                with self.cv:
                    while not self.results and (stage := self._next_here()) is None:
                        self.cv.wait()  # only while the worker holds a stage: it reports back
                    results, self.results = self.results, []
                    if not results:
                        self.taken.add(stage.name)
                for done, entry in results:  # in the order the worker finished them
                    if entry is not None and self.pipeline.adopt(done, entry):
                        self.on_adopt(done)
                        remaining.discard(done.name)
                    else:  # the worker failed: this process builds the stage
                        with self.cv:
                            self.here_only.add(done.name)
                            self.taken.discard(done.name)
                            self.built.discard(done.name)
                if results:
                    continue
                if feeder.ident is None:  # once this process has taken its first stage
                    feeder.start()
                self.pipeline.run(stage)
                remaining.discard(stage.name)
                with self.cv:
                    self.built.add(stage.name)
                    self.cv.notify_all()
        finally:
            with self.cv:
                self.stopped = True
                self.cv.notify_all()

    def _next_here(self) -> Stage | None:
        """This process's next stage: the first untaken one whose inputs it has recorded."""
        return next((s for s in self.queue if s.name not in self.taken
                     and all(n in self.pipeline.artifacts for n in s.needs)), None)

    def _next_there(self) -> Stage | None:
        """The worker's next stage: the first untaken one it may build whose inputs exist and
        whose artifact does not (a stored one costs nothing here and a worker start there)."""
        for s in self.queue:
            if s.name in self.taken or s.name in self.here_only or \
                    not (s.kind == "eval" or self.train_in_worker) or \
                    not all(n in self.built for n in s.needs):
                continue
            if self.pipeline.store.get(s.kind, self.keys[s.name]) is not None:
                self.here_only.add(s.name)
                continue
            return s
        return None

    def _feed(self) -> None:
        try:
            self._feed_worker()
        except Exception:  # noqa: BLE001 -- e.g. an unreadable store: the rest is built here
            log.exception("the background worker's feeder failed; building the rest here")
            with self.cv:
                self.stopped = True
                self.cv.notify_all()

    def _feed_worker(self) -> None:
        """Hand the worker one stage at a time until the run stops (or the worker dies); each
        result goes to `results` for this process to record, in the order they finish."""
        while True:
            with self.cv:
                while not self.stopped and (stage := self._next_there()) is None:
                    self.cv.wait()
                if self.stopped:
                    return
                self.taken.add(stage.name)
            log.info("stage %s: %s in the background", stage.name,
                     "evaluating" if stage.kind == "eval" else "building")
            upstream = {n: (self.by_name[n].kind, self.keys[n]) for n in stage.needs}
            entry, broken = None, False
            try:
                entry = self.worker.build(stage, upstream)
            except Exception as err:  # noqa: BLE001 -- any failure: the main process builds it
                broken = isinstance(err, BrokenProcessPool)
                if not self.stopped:
                    log.warning("stage %s: the background build failed (%s: %s); building it "
                                "here", stage.name, type(err).__name__, err)
            with self.cv:
                if entry is not None:
                    self.built.add(stage.name)
                self.results.append((stage, entry))
                self.stopped = self.stopped or broken  # a dead worker: the rest is built here
                self.cv.notify_all()


def _init_worker(threads: int, parent: int) -> None:
    import torch

    from factory import faults, loop

    torch.set_num_threads(threads)
    loop.SHOW_PROGRESS = False  # the terminal shows the main process's bar
    faults.run_process = parent  # a kill point reached here kills the run, as one in the main
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
