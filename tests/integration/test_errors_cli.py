"""The CLI refuses a run that cannot fit before any compute, printing the message alone (issue 9,
item 3; docs/errors.md): a real `python -m factory.run` on this machine's memory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_a_14b_student_on_a_cpu_is_refused_by_the_cli_with_the_estimate(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "factory.run", "student=qwen3-14b", "teacher=qwen3-32b",
         "trainer=cpu", f"artifacts_dir={tmp_path / 'store'}", f"hydra.run.dir={tmp_path / 'run'}"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    # 393 GiB for the stage alone; 454 with the teacher's evaluation in a background worker
    # beside it (that applies when a core is idle beyond the training's one thread)
    beside = "the background evaluation eval/teacher/think beside it: 61 GiB" in done.stderr
    need = 454 if beside else 393
    assert f"error: stage distill/on_policy needs about {need} GiB of cpu memory" in done.stderr
    assert "trainer.check_memory=false" in done.stderr
    assert not (tmp_path / "store").exists()
