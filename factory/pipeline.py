"""The pipeline runner: a run is a list of stages, each reading artifacts and writing one.

A stage declares the inputs that determine its output (config slices, seeds, a code version) and
the upstream stages it reads. Its artifact's key hashes those inputs together with the upstream
artifacts' keys, so changing anything upstream rebuilds everything downstream, and nothing else.
A stage whose artifact is already in the store is skipped: a rerun is nearly free, a killed run
resumes (the interrupted stage restarts from its last checkpoint in its work directory), and a
sweep that shares a teacher pays for the teacher once.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from factory.ledger import Ledger, LedgerEntry, StageCost, current_device
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


class Pipeline:
    def __init__(self, store: Store, run_dir: Path, metrics=None, ledger: Ledger | None = None):
        self.store = store
        self.metrics = metrics
        self.run_dir = Path(run_dir)
        self.ledger = ledger or Ledger(self.run_dir)
        self.artifacts: dict[str, Artifact] = {}

    def key(self, stage: Stage) -> str:
        missing = [n for n in stage.needs if n not in self.artifacts]
        if missing:
            raise KeyError(f"stage {stage.name} needs {missing}, which did not run before it")
        return content_key(stage.kind, {
            "stage": stage.name.split("/")[-1], "version": stage.version, "inputs": stage.inputs,
            "upstream": {n: self.artifacts[n].key for n in stage.needs},
        })

    def run(self, stage: Stage) -> Artifact:
        key = self.key(stage)
        device, count = current_device()
        found = self.store.get(stage.kind, key)
        if found is not None:
            log.info("stage %s: reusing %s", stage.name, found.path)
            original = found.manifest.get("cost")
            self.ledger.add(LedgerEntry(
                stage=stage.name, arm=stage.arm, teacher_side=stage.teacher_side,
                artifact=str(found.path), reused=True, device=device, device_count=count,
                wall_s=0.0, device_hours=0.0, tokens=0, flops=0.0, original=original))
            self.artifacts[stage.name] = found
            return found
        log.info("stage %s: building %s/%s", stage.name, stage.kind, key)
        start = time.perf_counter()
        upstream = {n: self.artifacts[n] for n in stage.needs}
        with self.store.writing(stage.kind, key, self._manifest_inputs(stage)) as (tmp, extra):
            ctx = StageContext(name=stage.name, out=tmp, work=self.store.work_dir(stage.kind, key),
                               upstream=upstream, run_dir=self.run_dir, inputs=stage.inputs,
                               metrics=self.metrics)
            ctx.work.mkdir(parents=True, exist_ok=True)
            cost = stage.build(ctx)
            wall = time.perf_counter() - start
            extra["cost"] = {"device": device, "device_count": count, "wall_s": wall,
                             "device_hours": wall * count / 3600, "tokens": cost.tokens,
                             "flops": cost.flops, "notes": cost.notes}
        artifact = self.store.get(stage.kind, key)
        self.ledger.add(LedgerEntry(
            stage=stage.name, arm=stage.arm, teacher_side=stage.teacher_side,
            artifact=str(artifact.path), reused=False, device=device, device_count=count,
            wall_s=wall, device_hours=wall * count / 3600, tokens=cost.tokens, flops=cost.flops,
            notes=cost.notes))
        self.artifacts[stage.name] = artifact
        return artifact

    def _manifest_inputs(self, stage: Stage) -> dict[str, Any]:
        return {"stage": stage.name, "version": stage.version, "inputs": stage.inputs,
                "upstream": {n: self.artifacts[n].key for n in stage.needs}}


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())
