"""Training metrics: one JSON line per logged step in `metrics.jsonl`, mirrored to wandb.

`metrics.jsonl` is the record reports read (STYLE.md 10); wandb is a convenience on top of it.
After a resume, the steps between the last checkpoint and the crash are logged twice (the file
is append-only): a reader keeps the last line per (stage, step).

A wandb failure (no network, a broken install, a full disk in its directory) must never cost a
training run, so every wandb call is guarded: the first failure prints one warning and the logger
carries on with the JSON lines alone.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Optional

from factory.config import LoggerConfig


class MetricsLogger:
    """Appends `{"stage", "step", "time", **metrics}` to `run_dir/metrics.jsonl`, and to wandb.

    One logger serves the whole run (every stage). `enabled=False` makes every call a no-op: pass
    `accelerator.is_main_process` so that only rank 0 writes. wandb runs when
    `logger_cfg.mode` is "online" or "offline"; "disabled" does not import it.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        logger_cfg: LoggerConfig,
        run_name: Optional[str] = None,
        config_dict: Optional[dict[str, Any]] = None,
        enabled: bool = True,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.path = self.run_dir / "metrics.jsonl"
        self._file = None
        self._wandb_run = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        if logger_cfg.mode != "disabled":
            self._wandb_run = self._guard(
                "init", lambda: _wandb_init(self.run_dir, logger_cfg, run_name, config_dict)
            )

    def log(self, stage: str, step: int, metrics: dict[str, float]) -> None:
        """Write one line for `step` of `stage` (steps count completed optimizer steps)."""
        if not self.enabled:
            return
        record = {"stage": stage, "step": step, "time": time.time()}
        record.update({k: _jsonable(v) for k, v in metrics.items()})
        self.replay(record)

    def replay(self, record: dict[str, Any]) -> None:
        """Write one line as logged (by `log`, or by another process of the run, whose stage,
        step and time it keeps), and send it to wandb."""
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb_run is not None:
            # wandb wants one monotonic step across the run while every stage counts from 1, so
            # the stage's step goes in as a metric and wandb keeps its own counter
            stage = record["stage"]
            data = {f"{stage}/{k}": v for k, v in record.items() if k not in ("stage", "time")}
            self._guard("log", lambda: self._wandb_run.log(data))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb_run is not None:
            run, self._wandb_run = self._wandb_run, None
            self._guard("finish", run.finish)

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _guard(self, what: str, fn):
        """Run a wandb call; on failure warn once, drop wandb, keep the JSON lines."""
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - any wandb failure must not stop training
            warnings.warn(
                f"wandb {what} failed ({type(e).__name__}: {e}); continuing with "
                f"{self.path} only",
                RuntimeWarning,
                stacklevel=3,
            )
            self._wandb_run = None
            return None


def _wandb_init(run_dir: Path, cfg: LoggerConfig, run_name, config_dict):
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    return wandb.init(
        mode=cfg.mode,
        dir=str(run_dir),
        project=cfg.project,
        entity=cfg.entity,
        name=run_name,
        config=config_dict,
        reinit="finish_previous",
    )


def _jsonable(v: Any) -> Any:
    """Plain Python numbers for json; NaN/inf as strings (json.dumps would write invalid JSON)."""
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v
