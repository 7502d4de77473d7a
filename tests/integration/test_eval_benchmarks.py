"""`python -m factory.run pipeline=eval task=<benchmark> student=tiny` end to end on the shared
benchmark files: the tiny model scores about zero; the point is the path (prompts through the
tiny tokenizer, sampling in both modes, math-verify and the code sandbox as graders)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("CF_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.mark.parametrize("task,file", [("math500", "math500.jsonl"),
                                       ("humaneval", "humaneval.jsonl.gz")])
def test_eval_pipeline_on_a_real_benchmark(tmp_path, task, file):
    if not (DATA / file).exists():
        pytest.skip(f"{DATA / file} is absent (the shared benchmark files are not committed)")
    if task == "humaneval" and shutil.which("bwrap") is None:
        pytest.skip("bubblewrap is not installed: the code grader refuses to run untrusted code")
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "factory.run", "pipeline=eval", f"task={task}",
            f"task.path={DATA / file}", "student=tiny", "pipeline.pretrain.steps=3",
            "pipeline.eval.n_problems=3", "pipeline.eval.n_samples=2", "pipeline.eval.ks=[1,2]",
            "pipeline.eval.max_new_tokens=16", "pipeline.pretrain_corpus_size=200",
            # at these sizes the background worker's start-up costs more than the evals
            "pipeline.eval.background=false", "trainer.num_threads=1", "trainer.progress=false",
            f"artifacts_dir={tmp_path / 'store'}", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for mode in ("think", "no_think"):
        result = json.loads((run_dir / "eval" / f"base-{mode}.json").read_text())
        assert result["task"] == task and result["mode"] == mode
        assert len(result["per_problem"]) == 3
        assert all(p["n"] == 2 for p in result["per_problem"])
        assert 0.0 <= result["pass@1"] <= 1.0
