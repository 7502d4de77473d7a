"""A run evaluated on two benchmarks at once (`pipeline.eval.tasks`, as the real-scale overlays
use it) on the shared benchmark files: the tiny base student on MATH-500 and AIME'24, each
result under its own task, file and summary row."""

import json
import os
from pathlib import Path

import pytest

from factory.inspect import compose
from factory.run import run

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("CF_SHARED_DATA", REPO.parent / "shared" / "data"))


def test_one_run_evaluates_every_task(tmp_path, one_torch_thread):
    for file in ("math500.jsonl", "aime24.jsonl"):
        if not (DATA / file).exists():
            pytest.skip(f"{DATA / file} is absent (the shared benchmark files are not committed)")
    cfg = compose([
        "pipeline=eval", "student=tiny", "task=math500", f"task.path={DATA / 'math500.jsonl'}",
        "+task@pipeline.eval.tasks.aime24=aime24",
        f"pipeline.eval.tasks.aime24.path={DATA / 'aime24.jsonl'}",
        "pipeline.pretrain.steps=3", "pipeline.eval.modes=[think]", "pipeline.eval.n_problems=3",
        "pipeline.eval.n_samples=2", "pipeline.eval.ks=[1,2]", "pipeline.eval.max_new_tokens=16",
        "trainer.num_threads=1", "trainer.progress=false", f"artifacts_dir={tmp_path / 'store'}"])
    summary = run(cfg, tmp_path / "run")

    for task, file in (("math500", "base-think.json"), ("aime24", "base-aime24-think.json")):
        result = json.loads((tmp_path / "run" / "eval" / file).read_text())
        assert result["task"] == task and result["model"] == "base"
        assert len(result["per_problem"]) == 3
        assert summary["models"][f"base ({task})"]["think"]["pass@1"] == result["pass@1"]
    ledger = json.loads((tmp_path / "run" / "ledger.json").read_text())
    assert {e["stage"] for e in ledger["stages"]} == {
        "student/base", "eval/base/think", "eval/base/aime24/think"}
