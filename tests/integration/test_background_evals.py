"""Evaluations on the idle core (`pipeline.eval.background`, factory/background.py): the same
numbers as evaluating in the main process, each eval recorded as built in this run, and a rerun
that reuses everything without starting a worker."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from factory.background import background_evals_apply
from factory.inspect import compose
from factory.run import run
from factory.summary import format_table
from tiny_sizes import BOOTSTRAP_TINY as SMALL

BOOTSTRAP_TINY = SMALL + ["pipeline.eval.background=true"]  # tiny_sizes turns it off

pytestmark = pytest.mark.integration
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
    assert ("wall time of this run: 400 s (its stages' times add up to 555 s: evaluations ran "
            "beside training)") in format_table(summary)
    summary.update(total_wall_s=555.0)
    assert "wall time of this run: 555 s\n" in format_table(summary) + "\n"


@pytest.mark.skipif(CORES < 2, reason="background evals need a core beside the training's")
def test_background_evals_give_the_main_process_numbers(tmp_path, caplog):
    caplog.set_level("INFO")
    on = run(compose(BOOTSTRAP_TINY + [f"artifacts_dir={tmp_path / 'on'}"]), tmp_path / "run_on")
    assert "evaluating in the background" in caplog.text
    assert "built in the background" in caplog.text
    off = run(compose(BOOTSTRAP_TINY + [f"artifacts_dir={tmp_path / 'off'}",
                                        "pipeline.eval.background=false"]), tmp_path / "run_off")
    assert on["models"] == off["models"]
    assert _evals(tmp_path / "run_on") == _evals(tmp_path / "run_off")
    assert len(_evals(tmp_path / "run_on")) == 4  # teacher and base, both modes

    # the run's wall time is its elapsed time; the stages' own times are summed apart (at these
    # sizes the worker's start-up makes elapsed the larger; at the default sizes the overlap
    # makes it the smaller: README)
    assert on["total_wall_s"] > 0 and on["stage_wall_s"] > 0
    ledger = json.loads((tmp_path / "run_on" / "ledger.json").read_text())
    assert abs(sum(e["wall_s"] for e in ledger["stages"]) - on["stage_wall_s"]) < 1e-6
    evals = [e for e in ledger["stages"] if e["stage"].startswith("eval/")]
    assert len(evals) == 4
    assert all(not e["reused"] and e["wall_s"] > 0 and e["tokens"] > 0 for e in evals)

    caplog.clear()
    again = run(compose(BOOTSTRAP_TINY + [f"artifacts_dir={tmp_path / 'on'}"]), tmp_path / "rerun")
    assert again["models"] == on["models"]
    assert "in the background" not in caplog.text  # everything reused: no worker started
    ledger = json.loads((tmp_path / "rerun" / "ledger.json").read_text())
    assert all(e["reused"] for e in ledger["stages"])


@pytest.mark.skipif(CORES < 2, reason="the worker needs a core beside the training's")
def test_the_base_student_trains_in_the_worker_beside_the_teacher(tmp_path, caplog):
    caplog.set_level("INFO")
    cfg = compose(BOOTSTRAP_TINY + [f"artifacts_dir={tmp_path / 'roots'}",
                                    "pipeline.background_roots=true"])
    beside = run(cfg, tmp_path / "run_roots")
    assert "stage student/base: building in the background" in caplog.text
    assert "stage student/base: built in the background" in caplog.text
    main = run(compose(BOOTSTRAP_TINY + [f"artifacts_dir={tmp_path / 'main'}"]),
               tmp_path / "run_main")
    assert beside["models"] == main["models"]  # same base weights, so the same numbers
    entries = {d: next(e for e in json.loads((tmp_path / d / "ledger.json").read_text())["stages"]
                       if e["stage"] == "student/base") for d in ("run_roots", "run_main")}
    entry = entries["run_roots"]
    assert not entry["reused"] and entry["wall_s"] > 0 and entry["tokens"] > 0
    weights = {d: load_file(next(Path(e["artifact"]).glob("*.safetensors")))
               for d, e in entries.items()}
    assert weights["run_roots"].keys() == weights["run_main"].keys()
    assert all(torch.equal(weights["run_roots"][k], weights["run_main"][k])
               for k in weights["run_main"])
    # its training curve is in the run's metrics, as when the main process trains it
    lines = lambda d: [(m["step"], m["loss"]) for m in map(  # noqa: E731
        json.loads, (tmp_path / d / "metrics.jsonl").read_text().splitlines())
        if m["stage"] == "student/base"]
    assert lines("run_roots") == lines("run_main") and lines("run_roots")
    assert not (tmp_path / "run_roots" / ".background").exists() or not any(
        (tmp_path / "run_roots" / ".background").iterdir())
