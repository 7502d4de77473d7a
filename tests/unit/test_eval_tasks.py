"""`pipeline.eval.tasks`: extra task cards composed into the config (an overlay's defaults, or
`+task@pipeline.eval.tasks.NAME=NAME`) add an eval stage per model, mode and task; the run's
own task keeps its stage names; the summary keeps the tasks apart."""

import pytest

from factory.errors import ConfigError
from factory.inspect import compose
from factory.plan import build_plan
from factory.summary import format_table, summarize

pytestmark = pytest.mark.unit
EXTRA = ["+task@pipeline.eval.tasks.aime24=aime24", "+task@pipeline.eval.tasks.humaneval=humaneval",
         "pipeline.eval.tasks.aime24.path=/data/aime24.jsonl"]


def eval_stages(cfg) -> dict:
    return {s.name: s for s in build_plan(cfg).stages if s.name.startswith("eval/")}


def test_no_extra_tasks_leaves_the_eval_stages_as_they_were():
    stages = eval_stages(compose(["pipeline=eval"]))
    assert sorted(stages) == ["eval/base/no_think", "eval/base/think"]


def test_every_model_and_mode_is_evaluated_on_every_task():
    cfg = compose(["pipeline=bootstrap", *EXTRA])
    stages = eval_stages(cfg)
    for model in ("teacher", "base"):
        for mode in ("think", "no_think"):
            assert stages[f"eval/{model}/{mode}"].inputs["task"]["name"] == "arith"
            for task in ("aime24", "humaneval"):
                stage = stages[f"eval/{model}/{task}/{mode}"]
                assert stage.inputs["task"]["name"] == task and stage.inputs["mode"] == mode
    assert len(stages) == 2 * 2 * 3
    # each extra task is a full card of its own, with its own overrides
    assert stages["eval/base/aime24/think"].inputs["task"]["path"] == "/data/aime24.jsonl"
    assert stages["eval/base/humaneval/think"].inputs["task"]["kind"] == "code"


def test_a_task_evaluated_twice_is_refused():
    cfg = compose(["pipeline=eval", "task=math500", "+task@pipeline.eval.tasks.again=math500"])
    with pytest.raises(ConfigError, match="pipeline.eval.tasks.again is task 'math500'"):
        build_plan(cfg)


def test_the_summary_keeps_tasks_apart():
    def result(task, p):
        return {"model": "base", "task": task, "mode": "think", "pass@1": p, "pass@k": {"1": p},
                "think_follow": 1.0, "mean_response_tokens": 3, "per_problem": [{}],
                "n_samples": 1}

    class NoLedger:
        entries = []

    one = summarize({"a": result("arith", 0.5)}, NoLedger())
    assert list(one["models"]) == ["base"]
    two = summarize({"a": result("arith", 0.5), "b": result("aime24", 0.25)}, NoLedger())
    assert two["models"]["base (arith)"]["think"]["pass@1"] == 0.5
    assert two["models"]["base (aime24)"]["think"]["pass@1"] == 0.25
    assert "base (aime24)" in format_table(two)
