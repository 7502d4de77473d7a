"""Errors before compute (issue 9, item 3; docs/errors.md): each case is refused by `run` or its
preflight (factory/preflight.py) before any weight loads or any stage runs, with a message that
names the value and the fix. Unknown keys and wrong types fail earlier, at composition:
tests/unit/test_config_tree.py::test_typos_and_wrong_types_fail_naming_the_key."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from factory.errors import CardError, CompatibilityError, ConfigError
from factory.inspect import compose
from factory.preflight import preflight
from factory.run import run
from factory.tasks import code

pytestmark = pytest.mark.unit

# evaluations in the main process: whether a background worker applies depends on the idle cores
BIG = ["student=qwen3-14b", "teacher=qwen3-32b", "trainer=cpu", "pipeline.eval.background=false"]


def refused(overrides, error=ConfigError) -> str:
    with pytest.raises(error) as err:
        preflight(compose(overrides))
    return str(err.value)


def test_a_14b_student_on_this_cpu_is_refused_with_the_estimate_and_the_options(tmp_path):
    with pytest.raises(ConfigError) as err:
        run(compose(BIG + [f"artifacts_dir={tmp_path / 'store'}"]), tmp_path / "run")
    message = str(err.value)
    assert "stage distill/on_policy needs about 393 GiB of cpu memory" in message
    assert "qwen3-14b's training state, 16 bytes x 14.8B params" in message
    assert "the in-process teacher qwen3-32b's weights: 61 GiB" in message
    assert "GiB is available system memory (psutil)" in message
    for option in ("student=qwen3-0.6b", "trainer=gpu", "trainer.accelerate_config=fsdp",
                   "dry_run=true", "backend=vllm_server", "trainer.check_memory=false"):
        assert option in message
    assert not (tmp_path / "store").exists()  # nothing ran: the store was never opened
    assert not (tmp_path / "run" / "env.json").exists()


def test_the_tiny_world_passes_and_reports_its_estimates(tmp_path):
    estimates = preflight(compose([f"artifacts_dir={tmp_path}"]))
    assert 0 < estimates["memory"]["need_gib"] < estimates["memory"]["available_gib"]
    assert 0 < estimates["disk"]["cache_gib_at_most"] < estimates["disk"]["free_gib"]


def test_a_background_evaluation_counts_beside_the_largest_training_stage(tmp_path,
                                                                          monkeypatch):
    from factory import preflight as pf

    cfg = compose([f"artifacts_dir={tmp_path}"])
    alone = pf.check_memory(cfg)
    both = pf.check_memory(cfg, background=True)
    stages = {s["stage"]: s for s in pf.plan_costs(cfg)["stages"]}
    top_eval = max((s for s in stages if s.startswith("eval/")),
                   key=lambda s: pf._stage_need(stages[s]))
    assert both["stage"] == alone["stage"] and not alone["stage"].startswith("eval/")
    assert both["background"]["stage"] == top_eval
    assert both["need_gib"] == pytest.approx(
        alone["need_gib"] + pf._stage_need(stages[top_eval]) / pf.GIB)

    # memory for the training stage alone, not for an evaluation beside it: refused, and told
    # how to evaluate afterwards instead
    between = (alone["need_gib"] + both["need_gib"]) / 2 * pf.GIB
    monkeypatch.setattr(pf, "available_memory", lambda device: (between, "free in this test"))
    assert pf.check_memory(cfg)["need_gib"] == alone["need_gib"]
    with pytest.raises(ConfigError) as err:
        pf.check_memory(cfg, background=True)
    message = str(err.value)
    assert f"the background evaluation {top_eval} beside it" in message
    assert "pipeline.eval.background=false" in message


def test_training_in_the_worker_counts_the_two_largest_training_stages(tmp_path):
    from factory import preflight as pf

    cfg = compose([f"artifacts_dir={tmp_path}"])
    stages = {s["stage"]: s for s in pf.plan_costs(cfg)["stages"]}
    need = {name: pf._stage_need(row) / pf.GIB for name, row in stages.items()}
    first, second = sorted((n for n in need if not n.startswith("eval/")), key=need.get)[-2:][::-1]
    estimate = pf.check_memory(cfg, background=True, background_training=True)
    assert {estimate["stage"], estimate["background"]["stage"]} == {first, second}
    assert estimate["need_gib"] == pytest.approx(need[first] + need[second])
    evals_only = pf.check_memory(cfg, background=True)  # an evaluation is smaller than a training
    assert evals_only["need_gib"] < estimate["need_gib"]


def test_vocab_mismatch_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(CompatibilityError) as err:
        run(compose(["student=qwen3-4b", f"artifacts_dir={tmp_path / 'store'}"]), tmp_path / "r")
    message = str(err.value)
    assert "student qwen3-4b has vocab 151936 but teacher tiny-moe has 128" in message
    assert "teacher=qwen3-30b-a3b" in message and "student=tiny" in message
    assert not (tmp_path / "store").exists()


def test_an_unreachable_pretrained_source_is_refused_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    message = refused(["pipeline=eval", "student=qwen3-0.6b", "teacher=qwen3-30b-a3b",
                       "student.pretrained=Qwen/not-a-cached-checkpoint"], CardError)
    assert "cannot reach pretrained source 'Qwen/not-a-cached-checkpoint' (HF_HUB_OFFLINE is set)"\
        in message
    assert "hf download Qwen/not-a-cached-checkpoint --local-dir DIR" in message
    assert "student.pretrained=/path/to/local/dir" in message


def test_a_local_directory_that_is_not_a_hugging_face_model_is_refused(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"not a checkpoint")
    message = refused(["pipeline=eval", "student=qwen3-0.6b", "teacher=qwen3-30b-a3b",
                       f"student.pretrained={tmp_path}"], CardError)
    assert f"'{tmp_path}' is not a Hugging Face model directory (no config.json)" in message
    assert "student.pretrained=/path/to/local/dir" in message


def test_k_above_n_in_pass_at_k_is_refused():
    message = refused(["pipeline.eval.n_samples=8", "pipeline.eval.ks=[1,8,64]"])
    assert "pipeline.eval.ks=[1, 8, 64] asks for Pass@k at k=64 but pipeline.eval.n_samples=8" \
        in message
    assert "Raise pipeline.eval.n_samples to at least 64 or drop [64]" in message


def test_top_k_above_the_vocabulary_is_refused():
    message = refused(["pipeline.cache.k=200"])
    assert "pipeline.cache.k=200 is larger than teacher tiny-moe's vocabulary (128 tokens)" \
        in message
    assert "at most 128" in message and "pipeline.cache.mode=sampled" in message


GOOD_ROW = '{"unique_id": "a", "problem": "1+1?", "answer": "2"}\n'


@pytest.mark.parametrize("content,expected", [
    ("", "{path} is empty: it holds no JSON lines"),
    (GOOD_ROW + '\n{"problem": "2+2?", "answer": \n', "{path}:3 is not valid JSON"),
    (GOOD_ROW + '{"unique_id": "b", "problem": "2+2?"}\n',
     "{path}:2 has no such field: 'answer' (mapped by task.answer_field)"),
], ids=["empty", "malformed", "missing-field"])
def test_an_empty_or_malformed_task_file_is_refused_naming_the_line(tmp_path, content, expected):
    path = tmp_path / "task.jsonl"
    path.write_text(content)
    message = refused(["pipeline=eval", "pipeline.eval.n_problems=1", "task=math500",
                       f"task.path={path}"])
    assert expected.format(path=path) in message


def test_a_cache_larger_than_the_free_disk_is_refused(tmp_path):
    message = refused([f"artifacts_dir={tmp_path / 'store'}",
                       "pipeline.generate.n_prompts=1000000000"])
    assert "the logit cache may need up to" in message and "TiB" not in message
    assert "1000000000 prompts x 1 per prompt x 128 new tokens at most" in message
    assert f"GiB is free at {tmp_path}" in message
    assert "pipeline.generate.n_prompts" in message and "artifacts_dir" in message


def test_the_disk_check_skips_a_cache_the_store_already_holds(tmp_path):
    from factory.pipeline import stage_key
    from factory.plan import build_plan

    cfg = compose([f"artifacts_dir={tmp_path}", "pipeline.generate.n_prompts=1000000000"])
    keys = {}
    for stage in build_plan(cfg).stages:
        keys[stage.name] = stage_key(stage, keys)
    (tmp_path / "cache" / keys["teacher/record"]).mkdir(parents=True)  # recorded by a past run
    assert preflight(cfg)["disk"] is None


def test_a_code_task_without_its_sandbox_is_refused_unless_opted_out(tmp_path):
    path = tmp_path / "code.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps({"task_id": "t0", "prompt": "def inc(x):\n",
                            "canonical_solution": "    return x + 1\n", "entry_point": "inc",
                            "test": "def check(c):\n    assert c(1) == 2\n"}) + "\n")
    overrides = ["pipeline=eval", "pipeline.eval.n_problems=1", "task=humaneval",
                 f"task.path={path}"]
    saved = code.get_config()
    code.configure(bwrap_path="/nonexistent/bin/bwrap")
    try:
        message = refused(overrides)
        assert "task 'humaneval' grades generated code" in message
        assert "/nonexistent/bin/bwrap" in message and "apt-get install bubblewrap" in message
        assert "task.sandbox=process" in message
        preflight(compose(overrides + ["task.sandbox=process"]))  # the user opted out: passes
    finally:
        code.configure(**{f: getattr(saved, f) for f in saved.__dataclass_fields__})


def test_bad_guard_settings_are_refused_before_compute():
    assert "trainer.on_nonfinite must be one of stop, skip, got 'ignore'" in refused(
        ["trainer.on_nonfinite=ignore"])
    assert "trainer.loss_spike_factor must be 0 (off) or > 1" in refused(
        ["trainer.loss_spike_factor=0.5"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where there is no GPU")
def test_a_gpu_trainer_without_a_gpu_is_refused():
    assert "trainer.device=cuda but torch" in refused(["trainer=gpu"])
