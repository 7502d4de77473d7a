"""A Hydra callback that writes the reports: the run's at the end of every job, the sweep's at the
end of every multirun (conf/hydra/callbacks/report.yaml).

Training never calls report code (STYLE.md 10): Hydra calls this after the task function has
returned, and it reads only the files the run wrote. A report that fails to build logs a warning
and returns: it never raises into Hydra and never deletes or rewrites anything but the report
files (written under temporary names and renamed), so the run's artifacts are never lost.

In a multi-process launch every process runs Hydra and so this callback; only rank 0 builds
(it is the process that wrote the run's files), read from the launcher's RANK variable since
reports never import the training code.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class ReportCallback(Callback):
    def __init__(self, rank_by: str | None = None) -> None:
        self.rank_by = rank_by

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        if OmegaConf.select(config, "dry_run"):  # a plan (dry_run.json), no results to report
            return
        run_dir = OmegaConf.select(config, "hydra.runtime.output_dir")
        self._build("run", run_dir, lambda build: build.build_run(run_dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if OmegaConf.select(config, "dry_run"):
            return
        sweep_dir = OmegaConf.select(config, "hydra.sweep.dir")
        self._build("sweep", sweep_dir, lambda build: build.build_sweep(sweep_dir, self.rank_by))

    def _build(self, what: str, directory, make) -> None:
        if int(os.environ.get("RANK", "0")) != 0:  # another rank of a multi-process launch
            return
        try:
            if directory is None:
                raise ValueError("the Hydra config names no output directory")
            from reports import build  # matplotlib loads only when a report is built

            make(build)
            log.info("%s report: %s", what, Path(directory) / "report.html")
        except Exception as err:  # noqa: BLE001 - a report must never cost the run
            log.warning("the %s report for %s was not built (%s: %s); the run's artifacts are "
                        "untouched; rebuild it with: python -m reports.build %s",
                        what, directory, type(err).__name__, err, directory)
