"""`python -m factory.run [overrides]`: compose, derive, run the stages, return the summary.

With no arguments this is the embedded tiny world on a CPU. Every error a user can cause is a
FactoryError and is printed as its message alone, before any compute where it can be known.

Under a multi-process launch (`accelerate launch --multi_gpu --num_processes N -m factory.run`,
or torchrun) every process runs this same entry point: they agree on the run directory before
Hydra starts, training stages shard their batches, and only rank 0 writes (factory/processes.py).
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from factory.background import Worker, background_evals_apply, replay_metrics, run_stages
from factory.config import check_schema, register
from factory.dry_run import dry_run
from factory.environment import cpu_threads, environment
from factory.errors import FactoryError
from factory.metrics import MetricsLogger
from factory.pipeline import Pipeline
from factory.plan import build_plan
from factory.preflight import preflight
from factory.processes import agree_launch_time, init_processes, register_launch_time
from factory.inspect import describe_pair
from factory.stages.evaluate import read_eval
from factory.store import Store, write_json_atomic
from factory.summary import format_table, summarize
from students.compat import check_pair

log = logging.getLogger("factory")
register()
register_launch_time()  # ${launch_time:...} in hydra.run.dir (conf/config.yaml)


def run(cfg: DictConfig, run_dir: str | Path | None = None) -> dict:
    check_schema(cfg)  # a key added with '+' past the typed nodes, before anything else
    run_dir = Path(run_dir or HydraConfig.get().runtime.output_dir)
    rank = init_processes(cfg.trainer.device)
    if not rank.main:  # rank 0 logs for the run; the others' warnings still show
        logging.getLogger().setLevel(logging.WARNING)
    if rank.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    check_pair(cfg.student, cfg.teacher)  # before any weight loads
    if cfg.dry_run:  # the plan, costed from the cards: nothing loads, the store is not touched
        return dry_run(cfg, run_dir, announce=rank.main)
    threads = cpu_threads(cfg.trainer.num_threads, rank.world) if cfg.trainer.device == "cpu" \
        else None
    # memory (with the background worker's stage beside training when there is one), disk, data,
    # sources: refused before any compute
    background_on = background_evals_apply(cfg, rank.world, threads)
    preflight(cfg, background=background_on,
              background_training=background_on and cfg.pipeline.background_training)
    info = describe_pair(cfg)
    for role in ("student", "teacher"):
        p = info[role]["params"]
        log.info("%s %s: %d params (%d active), %.3g train FLOPs/token", role, info[role]["name"],
                 p["total"], p["active"], info[role]["flops_per_token"]["train"])
    if threads:
        torch.set_num_threads(threads)
        log.info("torch threads: %d (trainer.num_threads=%d)", threads, cfg.trainer.num_threads)
    torch.manual_seed(cfg.seed)
    if rank.main:
        write_json_atomic(run_dir / "plan.json", info)
        write_json_atomic(run_dir / "env.json", {**environment(), "processes": rank.world})

    plan = build_plan(cfg)
    metrics = MetricsLogger(run_dir, cfg.logger, run_name=run_dir.name,
                            config_dict=OmegaConf.to_container(cfg, resolve=True),
                            enabled=rank.main)
    pipeline = Pipeline(Store(cfg.artifacts_dir), run_dir, metrics)
    worker = Worker(cfg, run_dir, threads) if background_on else None
    finished, start = False, time.perf_counter()
    try:
        run_stages(plan.stages, pipeline, worker,
                   train_in_worker=cfg.pipeline.background_training,
                   on_adopt=lambda stage: replay_metrics(run_dir, stage.name, metrics))
        finished = True
    finally:
        if worker:
            worker.close(wait=finished)
        metrics.close()

    evals = {s.name: read_eval(pipeline.artifacts[s.name]) for s in plan.stages if s.kind == "eval"}
    # the same on every rank: rank 0's ledger; each rank's own clock
    summary = summarize(evals, pipeline.ledger, wall_s=time.perf_counter() - start)
    if rank.main:
        (run_dir / "eval").mkdir(exist_ok=True)
        for name in evals:
            label = name.removeprefix("eval/").replace("/", "-")
            shutil.copyfile(pipeline.artifacts[name].path / "eval.json",
                            run_dir / "eval" / f"{label}.json")
        write_json_atomic(run_dir / "summary.json", summary)
        print(format_table(summary))
    return summary


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def _hydra_main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except FactoryError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    """`python -m factory.run`: the processes of a launch take one launch time (so Hydra gives
    them one run directory), then Hydra composes the config and calls `run`."""
    agree_launch_time()
    _hydra_main()


if __name__ == "__main__":
    main()
