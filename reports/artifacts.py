"""Reading a run directory: the files a run writes, and nothing else (STYLE.md 10).

A run directory holds `config.yaml` (the resolved config), `ledger.json` (factory/ledger.py),
`metrics.jsonl` (factory/metrics.py), `eval/*.json` (factory/evaluation.py's `evaluate` output
plus the model label, the task and the guessing baseline), and, when Hydra made it,
`.hydra/overrides.yaml`. A Hydra multirun directory holds `multirun.yaml` and one run directory per
job. Every file is optional here: a run that died half way still gets a report of what it made.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ReportError(Exception):
    """A directory that holds no run (or no sweep of runs) to report on."""


@dataclass
class Run:
    dir: Path
    config: dict  # config.yaml, resolved; {} when absent
    stages: list[dict]  # ledger.json's "stages", in the order they ran
    evals: list[dict]  # eval/*.json, sorted by file name
    metrics: list[dict]  # metrics.jsonl, the last line per (stage, step), in file order
    overrides: list[str] = field(default_factory=list)  # .hydra/overrides.yaml
    environment: dict = field(default_factory=dict)  # env.json or environment.json, if written

    @property
    def name(self) -> str:
        return self.dir.name


def is_run(path: Path) -> bool:
    path = Path(path)
    return (path / "ledger.json").is_file() or (path / "eval").is_dir()


def is_sweep(path: Path) -> bool:
    path = Path(path)
    return (path / "multirun.yaml").is_file() or (
        not is_run(path) and bool(sweep_run_dirs(path)))


def sweep_run_dirs(path: Path) -> list[Path]:
    """The job directories of a multirun, in job order (Hydra names them 0, 1, ...)."""
    subdirs = [p for p in Path(path).iterdir() if p.is_dir() and is_run(p)]
    return sorted(subdirs, key=lambda p: (0, int(p.name), "") if p.name.isdigit()
                  else (1, 0, p.name))


def load_run(path: Path) -> Run:
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"{path} is not a directory")
    if not is_run(path):
        raise ReportError(
            f"{path} holds no run: neither ledger.json nor eval/ is there (a run directory is what "
            f"`python -m factory.run` writes; a sweep directory holds multirun.yaml)")
    ledger = _json(path / "ledger.json") or {}
    evals = [_json(p) for p in sorted((path / "eval").glob("*.json"))] if (path / "eval").is_dir() \
        else []
    environment = _json(path / "env.json") or _json(path / "environment.json") or {}
    return Run(dir=path, config=_yaml(path / "config.yaml") or {},
               stages=list(ledger.get("stages", [])), evals=evals,
               metrics=read_metrics(path / "metrics.jsonl"),
               overrides=list(_yaml(path / ".hydra" / "overrides.yaml") or []),
               environment=environment)


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl's rows, keeping the last line per (stage, step): after a resume the steps
    between the last checkpoint and the kill are logged twice (factory/metrics.py). Non-finite
    values, which the logger writes as strings, come back as floats."""
    if not Path(path).is_file():
        return []
    rows: dict[tuple, dict] = {}
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill mid-write
            continue
        for k, v in row.items():
            if isinstance(v, str) and v in ("nan", "inf", "-inf"):
                row[k] = float(v)
        rows.pop((row.get("stage"), row.get("step")), None)  # re-insert: file order of the last
        rows[(row.get("stage"), row.get("step"))] = row
    return list(rows.values())


def made_cost(entry: dict) -> dict:
    """What the entry's artifact cost to make: its own cost, or for a reused stage (which cost
    nothing in this run) the cost recorded when the artifact was made (`original`)."""
    src = (entry.get("original") or {}) if entry.get("reused") else entry
    return {"device": src.get("device", entry.get("device", "?")),
            "device_count": src.get("device_count", entry.get("device_count", 0)),
            **{k: src.get(k, 0.0) for k in ("wall_s", "device_hours", "tokens", "flops")}}


def finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write under a temporary name in the same folder, then rename: a reader never sees half a
    report, and a failed build leaves the previous one in place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json(path: Path):
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ReportError(f"{path} is not valid JSON ({err})") from err


def _yaml(path: Path):
    if not path.is_file():
        return None
    return yaml.safe_load(path.read_text())
