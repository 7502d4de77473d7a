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
    # 393 GiB for the on-policy stage alone; 780 with the worker training the four-stage arm's
    # RL beside it (that applies when a core is idle beyond the training's one thread)
    if "the background stage distill/on_policy beside it: 393 GiB" in done.stderr:
        assert "error: stage four_stage/reasoning_rl needs about 780 GiB of cpu memory" \
            in done.stderr
        assert "keep training stages out of the worker (pipeline.background_training=false)" \
            in done.stderr
    else:
        assert "error: stage distill/on_policy needs about 393 GiB of cpu memory" in done.stderr
    assert "backend=vllm_server" in done.stderr  # the on-policy stage holds the teacher
    assert "trainer.check_memory=false" in done.stderr
    assert not (tmp_path / "store").exists()
