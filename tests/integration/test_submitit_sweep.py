"""A sweep through Hydra's submitit launcher on this machine (`hydra/launcher=submitit_local`,
the local twin of `submitit_slurm`): two runs of the tiny world at the smallest sizes, each a
submitit job in its own process, then the sweep report built over both by the report callback
in the launching process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_sizes import BOOTSTRAP_TINY

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
# the bootstrap sizes with pipeline=eval (the base student and its evaluation, no teacher
# bootstrap) and one mode: the smallest run that still trains, evaluates and reports
TINY = [o for o in BOOTSTRAP_TINY if not o.startswith(("pipeline=", "pipeline.eval.modes"))] + [
    "pipeline=eval", "pipeline.eval.modes=[think]", "pipeline.eval.n_samples=2",
    "pipeline.eval.n_problems=2", "task.n_test=2", "pipeline.eval.ks=[1,2]",
    "pipeline.eval.max_new_tokens=16"]


def test_a_two_job_sweep_through_submitit_local(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                        reason="pip install hydra-submitit-launcher (the dev and slurm extras)")
    sweep, store = tmp_path / "sweep", tmp_path / "store"
    overrides = {o.split("=", 1)[0]: o for o in TINY}  # the last value of a key wins
    done = subprocess.run(
        [sys.executable, "-m", "factory.run", "-m", "hydra/launcher=submitit_local",
         "seed=0,1", *overrides.values(), f"artifacts_dir={store}", f"hydra.sweep.dir={sweep}"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "was not built" not in done.stdout + done.stderr, done.stderr[-3000:]

    # submitit ran each run as its own job, with its own logs
    jobs = [p for p in (sweep / ".submitit").iterdir() if p.name != "%j"]
    assert len(jobs) == 2
    assert all(list(job.glob("*_result.pkl")) for job in jobs)
    for run in ("0", "1"):
        run_dir = sweep / run
        for name in ("config.yaml", "ledger.json", "summary.json", "report.md", "report.html"):
            assert (run_dir / name).is_file(), f"{run_dir / name}"
        assert json.loads((run_dir / "summary.json").read_text())["models"]["base"]["think"]
        ledger = json.loads((run_dir / "ledger.json").read_text())
        assert {e["stage"] for e in ledger["stages"]} == {"student/base", "eval/base/think"}
        assert not any(e["reused"] for e in ledger["stages"])  # the seeds share no artifact
    # both runs' models and evaluations are in the store
    assert len(list(store.glob("model/*/manifest.json"))) == 2
    assert len(list(store.glob("eval/*/manifest.json"))) == 2
    # the sweep report, written in the launching process once both jobs returned
    report = (sweep / "report.md").read_text()
    assert (sweep / "report.html").is_file()
    assert "## Runs ranked" in report and "Swept: seed." in report
    assert "[run 0: tiny from tiny-moe on arith](0/report.html)" in report
    assert "[run 1: tiny from tiny-moe on arith](1/report.html)" in report
