"""The worker on the idle core (`pipeline.eval.background`, factory/background.py): the same
weights and numbers as the main process alone, each of its stages recorded as built in this run,
and a rerun that reuses everything without starting a worker."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from factory.background import background_evals_apply, plan_keys
from factory.inspect import compose
from factory.plan import build_plan
from factory.run import run
from factory.summary import format_table
from tiny_sizes import BOOTSTRAP_TINY as SMALL

BOOTSTRAP_TINY = SMALL + ["pipeline.eval.background=true"]  # tiny_sizes turns it off

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
CORES = len(os.sched_getaffinity(0))


def _evals(run_dir):
    out = {}
    for f in sorted((run_dir / "eval").glob("*.json")):
        result = json.loads(f.read_text())
        out[f.name] = {k: result[k] for k in ("pass@1", "pass@k", "per_problem",
                                              "generated_tokens")}
    return out


def test_when_background_evals_apply():
    cfg = compose(BOOTSTRAP_TINY)
    assert background_evals_apply(cfg, world=1, threads=1) == (CORES > 1)
    assert not background_evals_apply(cfg, world=1, threads=None)  # torch takes every core
    assert not background_evals_apply(cfg, world=2, threads=1)  # several training processes
    assert not background_evals_apply(compose(BOOTSTRAP_TINY + ["pipeline.eval.background=false"]),
                                      world=1, threads=1)


def test_the_printed_wall_time_says_when_stages_overlapped():
    summary = {"models": {}, "guess_baseline": None, "cost": {}, "total_wall_s": 400.0,
               "stage_wall_s": 555.0}
    assert ("wall time of this run: 400 s (its stages' times add up to 555 s: stages ran on "
            "two processes at once)") in format_table(summary)
    summary.update(total_wall_s=555.0)
    assert "wall time of this run: 555 s\n" in format_table(summary) + "\n"


@pytest.mark.skipif(CORES < 2, reason="the worker needs a core beside the training's")
def test_the_worker_builds_what_the_main_process_builds(tmp_path, caplog):
    """Two lanes (the default): the base student trains in the worker beside the teacher's
    bootstrap and every model is evaluated there; the weights, curves and numbers are the ones
    the main process alone makes."""
    caplog.set_level("INFO")
    on = run(compose(BOOTSTRAP_TINY + [f"artifacts_dir={tmp_path / 'on'}"]), tmp_path / "run_on")
    assert "stage student/base: building in the background" in caplog.text
    assert "stage student/base: built in the background" in caplog.text
    assert "evaluating in the background" in caplog.text
    off = run(compose(BOOTSTRAP_TINY + [f"artifacts_dir={tmp_path / 'off'}",
                                        "pipeline.eval.background=false"]), tmp_path / "run_off")
    assert on["models"] == off["models"]
    assert _evals(tmp_path / "run_on") == _evals(tmp_path / "run_off")
    assert len(_evals(tmp_path / "run_on")) == 4  # teacher and base, both modes

    entries = {d: {e["stage"]: e for e in json.loads((tmp_path / d / "ledger.json").read_text())[
        "stages"]} for d in ("run_on", "run_off")}
    base = {d: e["student/base"] for d, e in entries.items()}
    assert not base["run_on"]["reused"] and base["run_on"]["wall_s"] > 0
    assert base["run_on"]["tokens"] == base["run_off"]["tokens"] > 0
    weights = {d: load_file(next(Path(e["artifact"]).glob("*.safetensors")))
               for d, e in base.items()}
    assert weights["run_on"].keys() == weights["run_off"].keys()
    assert all(torch.equal(weights["run_on"][k], weights["run_off"][k])
               for k in weights["run_off"])
    # its training curve is in the run's metrics, as when the main process trains it
    lines = lambda d: [(m["step"], m["loss"]) for m in map(  # noqa: E731
        json.loads, (tmp_path / d / "metrics.jsonl").read_text().splitlines())
        if m["stage"] == "student/base"]
    assert lines("run_on") == lines("run_off") and lines("run_on")
    assert not (tmp_path / "run_on" / ".background").exists() or not any(
        (tmp_path / "run_on" / ".background").iterdir())

    # the run's wall time is its elapsed time; the stages' own times are summed apart (at these
    # sizes the worker's start-up makes elapsed the larger; at the default sizes the overlap
    # makes it the smaller: README)
    assert on["total_wall_s"] > 0 and on["stage_wall_s"] > 0
    assert abs(sum(e["wall_s"] for e in entries["run_on"].values()) - on["stage_wall_s"]) < 1e-6
    evals = [e for name, e in entries["run_on"].items() if name.startswith("eval/")]
    assert len(evals) == 4
    assert all(not e["reused"] and e["wall_s"] > 0 and e["tokens"] > 0 for e in evals)

    # the keys the worker is given before any artifact exists are the store's
    cfg = compose(BOOTSTRAP_TINY + [f"artifacts_dir={tmp_path / 'on'}"])
    keys = plan_keys(build_plan(cfg).stages)
    assert keys == {name: Path(e["artifact"]).name for name, e in entries["run_on"].items()}
    assert list(entries["run_on"]) == list(keys)  # the ledger in plan order

    caplog.clear()
    again = run(compose(BOOTSTRAP_TINY + [f"artifacts_dir={tmp_path / 'on'}"]), tmp_path / "rerun")
    assert again["models"] == on["models"]
    assert "in the background" not in caplog.text  # everything reused: no worker started
    ledger = json.loads((tmp_path / "rerun" / "ledger.json").read_text())
    assert all(e["reused"] for e in ledger["stages"])


@pytest.mark.skipif(CORES < 2, reason="the worker needs a core beside the training's")
def test_evaluations_only_keep_training_in_the_main_process(tmp_path, caplog):
    caplog.set_level("INFO")
    run(compose(BOOTSTRAP_TINY + [f"artifacts_dir={tmp_path}", "pipeline.stages=[teacher,eval]",
                                  "pipeline.background_training=false"]), tmp_path / "run")
    assert "evaluating in the background" in caplog.text
    assert "building in the background" not in caplog.text


@pytest.mark.skipif(CORES < 2, reason="the worker needs a core beside the training's")
def test_a_stage_killed_in_the_worker_kills_the_run_and_resumes(tmp_path):
    """The main process takes the teacher's bootstrap first, so the base student trains in the
    worker; a SIGKILL there at its second checkpoint kills the whole run (as a kill of the run
    would), the rerun resumes the base from that checkpoint, and the weights are the ones an
    uninterrupted run in one process makes."""
    small = BOOTSTRAP_TINY + ["pipeline.pretrain.steps=6", "trainer.checkpoint_every=2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FACTORY_KILL_AT": "student/base:checkpoint:2"}
    cmd = [sys.executable, "-m", "factory.run", *small, f"artifacts_dir={tmp_path / 'store'}"]
    killed = subprocess.run([*cmd, f"hydra.run.dir={tmp_path / 'killed'}"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert "stage student/base: building in the background" in killed.stdout + killed.stderr
    env.pop("FACTORY_KILL_AT")
    resumed = subprocess.run([*cmd, f"hydra.run.dir={tmp_path / 'resumed'}"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    base = next(e for e in json.loads((tmp_path / "resumed" / "ledger.json").read_text())[
        "stages"] if e["stage"] == "student/base")
    assert not base["reused"] and base["notes"]["resumed_from"] == 4

    run(compose(small + [f"artifacts_dir={tmp_path / 'one'}", "pipeline.eval.background=false"]),
        tmp_path / "one")
    one = next(e for e in json.loads((tmp_path / "one" / "ledger.json").read_text())["stages"]
               if e["stage"] == "student/base")
    weights = [load_file(next(Path(e["artifact"]).glob("*.safetensors"))) for e in (base, one)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[1])
