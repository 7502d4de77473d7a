"""The tiny world end to end at the smallest sizes: `factory.run.run(cfg)` with the default
pipeline, a rerun that reuses every artifact, and a run killed with SIGKILL mid-training that
resumes from its last checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from factory.inspect import compose
from tiny_sizes import BOOTSTRAP_TINY
from factory.run import run
from reports.build import build

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]

# the default pipeline at the smallest sizes that still exercise every stage
SMALL = BOOTSTRAP_TINY


def test_default_pipeline_then_a_rerun_that_reuses_everything(tmp_path):
    cfg = compose(SMALL + [f"artifacts_dir={tmp_path / 'store'}"])
    first = run(cfg, tmp_path / "run1")

    assert set(first["models"]) == {"teacher", "base"}
    for model in ("teacher", "base"):
        for mode in ("think", "no_think"):
            row = first["models"][model][mode]
            assert row["n_problems"] == 6 and row["n_samples"] == 4
            assert 0.0 <= row["pass@1"] <= row["pass@k"][4] <= 1.0
            result = json.loads((tmp_path / "run1" / "eval" / f"{model}-{mode}.json").read_text())
            assert result["pass@1"] == row["pass@1"]
            assert len(result["per_problem"]) == 6
    ledger = json.loads((tmp_path / "run1" / "ledger.json").read_text())
    stages = {e["stage"]: e for e in ledger["stages"]}
    assert {"teacher/pretrain", "teacher/sft", "student/base"} <= set(stages)
    assert not any(e["reused"] for e in stages.values())
    assert stages["teacher/sft"]["tokens"] > 0 and stages["teacher/sft"]["flops"] > 0
    # the SFT is checked on held-out problems at steps 2, 4 and 6 (tiny_sizes.CHECK_TINY); a
    # 4-step teacher does not reach 0.9, so it trains its 2 extra steps and says so
    notes = stages["teacher/sft"]["notes"]
    assert [step for step, _ in notes["checks"]] == [2, 4, 6] and notes["steps"] == 6
    assert notes["check_passed"] is False and notes["check_target"] == 0.9
    assert all(0.0 <= value < 0.9 for _, value in notes["checks"])
    metrics = [json.loads(line) for line in
               (tmp_path / "run1" / "metrics.jsonl").read_text().splitlines()]
    assert {m["stage"] for m in metrics} >= {"teacher/pretrain", "teacher/sft", "student/base"}
    checked = [(m["step"], m["check_pass@1"]) for m in metrics if "check_pass@1" in m]
    assert checked == [tuple(c) for c in notes["checks"]]
    build(tmp_path / "run1")
    report = (tmp_path / "run1" / "report.md").read_text()
    assert "teacher/sft: held-out Pass@1" in report and "NOT reached" in report
    assert (tmp_path / "run1" / "config.yaml").exists()

    start = time.perf_counter()
    second = run(cfg, tmp_path / "run2")
    assert time.perf_counter() - start < 60
    ledger2 = json.loads((tmp_path / "run2" / "ledger.json").read_text())
    assert all(e["reused"] for e in ledger2["stages"])
    assert ledger2["total"]["device_hours"] == 0
    assert second["models"] == first["models"]


def test_a_killed_run_resumes_from_its_last_checkpoint(tmp_path):
    store = tmp_path / "store"
    args = [sys.executable, "-m", "factory.run", *SMALL,
            "teacher.bootstrap.pretrain_steps=60", "trainer.checkpoint_every=5",
            "pipeline.stages=[teacher]", f"artifacts_dir={store}",
            f"hydra.run.dir={tmp_path / 'killed'}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            if list((store / ".work").glob("model-*/checkpoint/custom_checkpoint_0.pkl")):
                break
            assert proc.poll() is None, "the run ended before writing a checkpoint"
            time.sleep(0.2)
        else:
            pytest.fail("no checkpoint within 240 s")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not list((store / "model").glob("*/manifest.json")), "nothing should be complete"

    args[-1] = f"hydra.run.dir={tmp_path / 'resumed'}"
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    ledger = json.loads((tmp_path / "resumed" / "ledger.json").read_text())
    pretrain = next(e for e in ledger["stages"] if e["stage"] == "teacher/pretrain")
    assert not pretrain["reused"]
    assert pretrain["notes"]["resumed_from"] >= 5
    assert pretrain["notes"]["steps"] == 60
    assert not (store / ".work" / f"model-{Path(pretrain['artifact']).name}").exists()
