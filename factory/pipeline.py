"""The pipeline runner: a run is a list of stages, each reading artifacts and writing one.

A stage declares the inputs that determine its output (config slices, seeds, a code version) and
the upstream stages it reads. Its artifact's key hashes those inputs together with the upstream
artifacts' keys, so changing anything upstream rebuilds everything downstream, and nothing else.
A stage whose artifact is already in the store is skipped: a rerun is nearly free, a killed run
resumes (the interrupted stage restarts from its last checkpoint in its work directory), and a
sweep that shares a teacher pays for the teacher once.

In a multi-process run (factory/processes.py) every process runs the same plan. Rank 0 decides
whether a stage's artifact exists and tells the others; a `distributed` stage (one that trains
through the loop) is built by every rank, each on its shard of the batches, the others only by
rank 0 while the rest wait. Only rank 0 publishes the artifact and writes the ledger; after the
barrier every rank reads the artifact rank 0 published.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from factory import faults
from factory.errors import ArtifactError
from factory.ledger import Ledger, LedgerEntry, StageCost, current_device
from factory.processes import broadcast, current_rank, wait_for_everyone
from factory.store import Artifact, Store, content_key

log = logging.getLogger(__name__)


@dataclass
class StageContext:
    """What a stage's build function gets."""

    name: str
    out: Path  # the temporary directory to write the artifact into
    work: Path  # scratch that survives a kill: checkpoints to resume from
    upstream: dict[str, Artifact]  # the artifacts of the stages named in `needs`
    run_dir: Path
    inputs: dict
    metrics: Any = None  # the run's MetricsLogger


@dataclass
class Stage:
    name: str  # unique within a run, e.g. "teacher/sft"
    kind: str  # artifact kind: model | dataset | cache | eval
    inputs: dict  # JSON-able; exactly what determines the artifact
    build: Callable[[StageContext], StageCost]
    needs: list[str] = field(default_factory=list)
    arm: str = ""  # ledger grouping: teacher | base | distill | four_stage | eval
    teacher_side: bool = False  # teacher compute (generation, logit recording, scoring)
    version: int = 1  # bump when the build code changes what it makes
    # every process builds it (a training stage: the loop synchronises the ranks' gradients);
    # False: rank 0 alone builds it (evaluation, generation), the other ranks wait
    distributed: bool = False


def stage_key(stage: Stage, upstream_keys: dict[str, str]) -> str:
    """The store key of a stage's artifact, given the keys of the artifacts it reads."""
    return content_key(stage.kind, {
        "stage": stage.name.split("/")[-1], "version": stage.version, "inputs": stage.inputs,
        "upstream": {n: upstream_keys[n] for n in stage.needs},
    })


class Pipeline:
    def __init__(self, store: Store, run_dir: Path, metrics=None, ledger: Ledger | None = None):
        self.store = store
        self.metrics = metrics
        self.run_dir = Path(run_dir)
        self.rank = current_rank()
        self.ledger = ledger or Ledger(self.run_dir, write=self.rank.main)
        self.artifacts: dict[str, Artifact] = {}

    def key(self, stage: Stage) -> str:
        missing = [n for n in stage.needs if n not in self.artifacts]
        if missing:
            raise KeyError(f"stage {stage.name} needs {missing}, which did not run before it")
        return stage_key(stage, {n: self.artifacts[n].key for n in stage.needs})

    def run(self, stage: Stage) -> Artifact:
        key = self.key(stage)
        # one maker per artifact among the processes sharing the store (a sweep's jobs)
        with self.store.claim(stage.kind, key, hold=self.rank.main):
            return self._run(stage, key)

    def _run(self, stage: Stage, key: str) -> Artifact:
        found = self._lookup(stage.kind, key)
        if found is not None:
            log.info("stage %s: reusing %s", stage.name, found.path)
            device, count = current_device()
            original = found.manifest.get("cost")
            self.ledger.add(LedgerEntry(
                stage=stage.name, arm=stage.arm, teacher_side=stage.teacher_side,
                artifact=str(found.path), reused=True, device=device, device_count=count,
                wall_s=0.0, device_hours=0.0, tokens=0, flops=0.0, original=original))
            self.artifacts[stage.name] = found
            return found
        log.info("stage %s: building %s/%s", stage.name, stage.kind, key)
        faults.enter_stage(stage.name)
        entry = self._build(stage, key)
        artifact = self._published(stage.kind, key)
        faults.point("published")
        self.ledger.add(entry)
        self.artifacts[stage.name] = artifact
        return artifact

    def adopt(self, stage: Stage, entry: LedgerEntry) -> bool:
        """Record `stage` as built by another process of this run (factory/background.py) with
        that process's ledger entry, if its artifact is in the store; False when it is not."""
        found = self.store.get(stage.kind, self.key(stage))
        if found is None:
            return False
        log.info("stage %s: built in the background, %s", stage.name, found.path)
        self.ledger.add(entry)
        self.artifacts[stage.name] = found
        return True

    def _lookup(self, kind: str, key: str) -> Artifact | None:
        """The complete artifact, if the store holds one: rank 0 looks, every rank follows its
        answer (a concurrent writer publishing in between must not split the ranks)."""
        found = self.store.get(kind, key) if self.rank.main else None
        if not broadcast(found is not None):
            return None
        return found or self._published(kind, key)

    def _build(self, stage: Stage, key: str) -> LedgerEntry:
        """Build the stage on the ranks that build it (module docstring); rank 0 publishes.
        Returns rank 0's ledger entry, on every rank."""
        entry = None
        if stage.distributed or self.rank.main:
            device, count = current_device()
            start = time.perf_counter()
            # checksummed once per process before a stage reads them: corruption is refused
            upstream = {n: self.store.opened(self.artifacts[n]) for n in stage.needs}
            with self.store.writing(stage.kind, key, self._manifest_inputs(stage),
                                    publish=self.rank.main) as (tmp, extra):
                ctx = StageContext(name=stage.name, out=tmp,
                                   work=self.store.work_dir(stage.kind, key), upstream=upstream,
                                   run_dir=self.run_dir, inputs=stage.inputs, metrics=self.metrics)
                ctx.work.mkdir(parents=True, exist_ok=True)
                cost = stage.build(ctx)
                wall = time.perf_counter() - start
                extra["cost"] = {"device": device, "device_count": count, "wall_s": wall,
                                 "device_hours": wall * count / 3600, "tokens": cost.tokens,
                                 "flops": cost.flops, "notes": cost.notes}
                faults.point("built")  # FACTORY_KILL_AT test hook: files written, unpublished
            entry = LedgerEntry(
                stage=stage.name, arm=stage.arm, teacher_side=stage.teacher_side,
                artifact=str(self.store.path(stage.kind, key)), reused=False, device=device,
                device_count=count, wall_s=wall, device_hours=wall * count / 3600,
                tokens=cost.tokens, flops=cost.flops, notes=cost.notes)
        wait_for_everyone()  # rank 0 has published
        return broadcast(entry)

    def _published(self, kind: str, key: str) -> Artifact:
        """The artifact rank 0 published, as this rank sees it."""
        artifact = self.store.get(kind, key)
        if artifact is None:
            raise ArtifactError(
                f"process {self.rank.index} of {self.rank.world} cannot see the artifact rank 0 "
                f"published at {self.store.path(kind, key)}: in a multi-process run every "
                f"process reads the store, so artifacts_dir must be on a filesystem they share")
        return artifact

    def _manifest_inputs(self, stage: Stage) -> dict[str, Any]:
        return {"stage": stage.name, "version": stage.version, "inputs": stage.inputs,
                "upstream": {n: self.artifacts[n].key for n in stage.needs}}


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())
