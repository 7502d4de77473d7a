"""The full default run (pipeline=compare), exactly as the README's quick start writes it (slow:
about 6 minutes on the 2-core Intel Xeon host of 2026-11-29, 10 on the AMD EPYC before).

Checks the floors issue 2 sets for the tiny world: the bootstrapped teacher reaches thinking-mode
Pass@1 >= 0.8 and Pass@64 >= 0.95 on 200 held-out problems (0.893 / 0.980 at the default seed
on that host; the SFT trains on until its held-out check passes, see README), the base student
sits well below it, and the guessing baseline is low; every row of the comparison is evaluated
and the report is written. Then a rerun reuses every artifact."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def test_default_run_meets_the_tiny_world_floors(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, "-m", "factory.run", f"artifacts_dir={tmp_path / 'store'}",
            f"hydra.run.dir={tmp_path / 'run'}"]
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    teacher = summary["models"]["teacher"]["think"]
    assert teacher["n_problems"] == 200 and teacher["n_samples"] == 64
    assert teacher["pass@1"] >= 0.8
    assert teacher["pass@k"]["64"] >= 0.95
    assert summary["models"]["base"]["think"]["pass@1"] < teacher["pass@1"]
    assert summary["guess_baseline"]["64"] < 0.15
    assert set(summary["models"]) == {"teacher", "base", "off_policy", "on_policy", "cold_start",
                                      "reasoning_rl", "fusion", "general_rl"}
    assert (tmp_path / "run" / "report.md").is_file()

    args[-1] = f"hydra.run.dir={tmp_path / 'rerun'}"
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ledger = json.loads((tmp_path / "rerun" / "ledger.json").read_text())
    assert all(stage["reused"] for stage in ledger["stages"])
