"""`python -m factory.run [overrides]`: compose, derive, run the stages, return the summary.

With no arguments this is the embedded tiny world on a CPU. Every error a user can cause is a
FactoryError and is printed as its message alone, before any compute where it can be known.
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from factory.config import register
from factory.environment import environment
from factory.errors import FactoryError
from factory.metrics import MetricsLogger
from factory.pipeline import Pipeline
from factory.plan import build_plan
from factory.inspect import describe_pair
from factory.stages.evaluate import read_eval
from factory.store import Store, write_json_atomic
from factory.summary import format_table, summarize
from students.compat import check_pair

log = logging.getLogger("factory")
register()


def run(cfg: DictConfig, run_dir: str | Path | None = None) -> dict:
    run_dir = Path(run_dir or HydraConfig.get().runtime.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    check_pair(cfg.student, cfg.teacher)  # before any weight loads
    info = describe_pair(cfg)
    write_json_atomic(run_dir / "plan.json", info)
    for role in ("student", "teacher"):
        p = info[role]["params"]
        log.info("%s %s: %d params (%d active), %.3g train FLOPs/token", role, info[role]["name"],
                 p["total"], p["active"], info[role]["flops_per_token"]["train"])
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    torch.manual_seed(cfg.seed)
    write_json_atomic(run_dir / "env.json", environment())

    plan = build_plan(cfg)
    metrics = MetricsLogger(run_dir, cfg.logger, run_name=run_dir.name,
                            config_dict=OmegaConf.to_container(cfg, resolve=True))
    pipeline = Pipeline(Store(cfg.artifacts_dir), run_dir, metrics)
    try:
        for stage in plan.stages:
            pipeline.run(stage)
    finally:
        metrics.close()

    evals = {}
    (run_dir / "eval").mkdir(exist_ok=True)
    for name, artifact in pipeline.artifacts.items():
        if artifact.kind == "eval":
            evals[name] = read_eval(artifact)
            label = name.removeprefix("eval/").replace("/", "-")
            shutil.copyfile(artifact.path / "eval.json", run_dir / "eval" / f"{label}.json")
    summary = summarize(evals, pipeline.ledger)
    write_json_atomic(run_dir / "summary.json", summary)
    print(format_table(summary))
    return summary


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except FactoryError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
