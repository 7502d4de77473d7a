"""The cost ledger: what each stage of a run cost, written to `ledger.json` in the run directory.

Per stage: the device kind and count, wall seconds, device-hours (wall × count; CPU core-hours on
a CPU, GPU-hours on GPUs), tokens processed and FLOPs by formula (factory/flops.py). A stage whose
artifact was reused costs nothing in this run; its entry keeps the cost recorded when it was made
(`original`), so a report can show both what this run paid and what the artifact cost.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from factory.store import write_json_atomic


@dataclass
class StageCost:
    """What a stage reports about the work it did (the runner adds wall time)."""

    tokens: int = 0
    flops: float = 0.0
    notes: dict = field(default_factory=dict)


@dataclass
class LedgerEntry:
    stage: str
    arm: str
    teacher_side: bool
    artifact: str
    reused: bool
    device: str
    device_count: int
    wall_s: float
    device_hours: float
    tokens: int
    flops: float
    original: dict | None = None  # the cost when the artifact was made, for reused stages
    notes: dict = field(default_factory=dict)


def current_device() -> tuple[str, int]:
    """(device kind, count) the run computes on, all its processes together: GPUs by name, else
    CPU cores in use (torch threads per process x processes)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0), world
    return "cpu", torch.get_num_threads() * world


class Ledger:
    """The run's entries; `write=False` keeps them in memory only (a multi-process run's other
    ranks: rank 0 writes ledger.json)."""

    def __init__(self, run_dir: Path, write: bool = True):
        self.path = Path(run_dir) / "ledger.json"
        self.write = write
        self.entries: list[LedgerEntry] = []

    def add(self, entry: LedgerEntry) -> None:
        self.entries.append(entry)
        if self.write:
            self.save()

    def order(self, names: list[str]) -> None:
        """Put the entries in the order of `names` (the plan's), whatever order they finished
        in (two lanes: factory/background.py), and save."""
        rank = {name: i for i, name in enumerate(names)}
        self.entries.sort(key=lambda e: rank.get(e.stage, len(rank)))
        if self.write:
            self.save()

    def save(self) -> None:
        total = lambda attr: sum(getattr(e, attr) for e in self.entries)  # noqa: E731
        write_json_atomic(self.path, {
            "stages": [asdict(e) for e in self.entries],
            "total": {"wall_s": total("wall_s"), "device_hours": total("device_hours"),
                      "tokens": total("tokens"), "flops": total("flops")},
        })
