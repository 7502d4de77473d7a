"""Benchmark task cards (conf/task/*.yaml, factory/tasks/benchmarks.py): composed through Hydra,
built from the shared benchmark files, prompt formats, grading through the Task interface, and
the errors for offline hub ids, empty or malformed files and unmapped fields.

The real files lie beside the checkout in ../shared/data (or $CF_SHARED_DATA); the tests that
need them skip, saying so, where they are absent. No test touches the network: the module runs
with the hub offline and a private datasets cache.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import datasets
import huggingface_hub.constants
import pytest

from factory.errors import ConfigError
from factory.inspect import compose
from factory.tasks import code
from factory.tasks.benchmarks import (
    CODE_INSTRUCTION,
    MATH_SUFFIX,
    CodeTask,
    MathTask,
    extract_code,
    program_for,
)
from factory.tasks.registry import build_task

pytestmark = pytest.mark.unit

SHARED = Path(os.environ.get("CF_SHARED_DATA")
              or Path(__file__).resolve().parents[2].parent / "shared" / "data")
FILES = {"math500": "math500.jsonl", "aime24": "aime24.jsonl", "humaneval": "humaneval.jsonl.gz"}
COUNTS = {"math500": 500, "aime24": 30, "humaneval": 164}
HUB_CARDS = ["math500", "aime24", "gsm8k", "humaneval"]

_bwrap_ok, _bwrap_why = code.sandbox_status("bwrap")
needs_bwrap = pytest.mark.skipif(not _bwrap_ok,
                                 reason=f"bubblewrap sandbox unavailable: {_bwrap_why}")


@pytest.fixture(scope="module", autouse=True)
def offline_private_cache(tmp_path_factory):
    """Hub offline whatever the environment says; Arrow caches in a throwaway directory, so a
    dataset a developer has cached cannot make the offline test load it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf-datasets"))
        yield


def shared_file(name: str) -> Path:
    path = SHARED / FILES[name]
    if not path.is_file():
        pytest.skip(f"{path} is absent: the shared benchmark files live in ../shared/data beside "
                    f"the checkout, or set CF_SHARED_DATA")
    return path


def task_for(*overrides: str):
    return build_task(compose(list(overrides)).task)


@pytest.fixture(scope="module")
def shared_task():
    """The card `name` built on its shared file, once per module."""
    built = {}

    def get(name: str):
        if name not in built:
            built[name] = task_for(f"task={name}", f"task.path={shared_file(name)}")
        return built[name]

    return get


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- the shared benchmark files ---------------------------------------------------------------


@pytest.mark.parametrize("name", list(FILES))
def test_card_builds_from_shared_file_with_all_problems(name, shared_task):
    task = shared_task(name)
    problems = task.problems("test")
    assert task.name == name
    assert len(problems) == COUNTS[name]
    assert len({p.id for p in problems}) == COUNTS[name]
    assert task.problems("test", 5) == problems[:5]
    assert all(p.prompt and p.answer for p in problems)


def test_math_prompt_is_qwen3_math_format(shared_task):
    first = json.loads((shared_file("math500")).read_text().splitlines()[0])
    problem = shared_task("math500").problems("test", 1)[0]
    assert problem.prompt == (first["problem"] + "\nPlease reason step by step, and put your "
                              "final answer within \\boxed{}.")
    assert problem.id == first["unique_id"] and problem.answer == first["answer"]
    assert problem.meta["subject"] == first["subject"] and "solution" in problem.meta


def test_code_prompt_shows_the_function_in_a_python_block(shared_task):
    p = shared_task("humaneval").problems("test", 1)[0]
    assert p.id == "HumanEval/0" and p.entry_point == "has_close_elements"
    assert p.prompt.startswith(CODE_INSTRUCTION + "\n\n```python\nfrom typing import List\n")
    assert p.prompt.endswith('    """\n```')
    assert p.meta["function_prompt"].rstrip() in p.prompt
    assert "def check(candidate)" in p.tests


@pytest.mark.parametrize("name,stride", [("math500", 20), ("aime24", 1)])
def test_math_golds_grade_correct_and_wrong_answers_wrong(name, stride, shared_task):
    task = shared_task(name)
    problems = task.problems("test")[::stride]  # every 20th of MATH-500: subjects and levels
    for p in problems:
        assert task.grade(p, f"So the answer is $\\boxed{{{p.answer}}}$."), (p.id, p.answer)
    for p in problems[:10]:
        assert not task.grade(p, "So the answer is $\\boxed{1000001}$."), p.id
        assert not task.grade(p, "I cannot solve this."), p.id


def test_aime_integer_answers_match_without_leading_zeros(shared_task):
    task = shared_task("aime24")
    p = next(p for p in task.problems("test") if p.answer.startswith("0"))  # e.g. "025"
    assert task.grade(p, f"\\boxed{{{int(p.answer)}}}")
    assert not task.grade(p, f"\\boxed{{{int(p.answer) + 1}}}")


@needs_bwrap
def test_humaneval_canonical_solutions_pass_and_return_none_fails(shared_task):
    task = shared_task("humaneval")
    problems = task.problems("test", 3)
    whole = [(p, f"Here it is:\n```python\n{p.meta['function_prompt']}{p.answer}```")
             for p in problems]
    wrong = [(p, f"```python\ndef {p.entry_point}(*args):\n    return None\n```")
             for p in problems]
    assert task.grade_many(whole + wrong) == [True] * 3 + [False] * 3
    assert task.grade(*whole[0])
    assert task.grade(problems[1], problems[1].answer)  # a body alone: appended to the prompt


# --- code extraction ----------------------------------------------------------------------------


def test_extract_code_takes_the_last_python_block_or_the_whole_response():
    response = ("```python\ndef f():\n    return 1\n```\nbetter:\n"
                "```python\ndef f():\n    return 2\n```")
    assert extract_code(response) == "def f():\n    return 2\n"
    assert extract_code("```\nx = 1\n```") == "x = 1\n"
    assert extract_code("```python\ny = 2\n```\nrun:\n```bash\npython y.py\n```") == "y = 2\n"
    assert extract_code("def f():\n    return 3") == "def f():\n    return 3"


def test_program_for_prepends_the_prompt_to_a_body_and_its_imports_to_a_function():
    prompt = "from typing import List\n\n\ndef total(xs: List[int]) -> int:\n    \"\"\"Sum.\"\"\"\n"
    body = "    return sum(xs)\n"
    assert program_for(prompt, "total", body) == prompt + body
    function = "```python\ndef total(xs: List[int]) -> int:\n    return sum(xs)\n```"
    assert program_for(prompt, "total", function) == (
        "from typing import List\ndef total(xs: List[int]) -> int:\n    return sum(xs)\n")


# --- generic and gsm8k-style files ----------------------------------------------------------


def test_jsonl_card_with_a_custom_field_mapping(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [
        {"uid": "q1", "question": "What is 2+3?", "target": 5, "source": "hand"},
        {"uid": "q2", "question": "What is 1/2 + 1/4?", "target": "\\frac{3}{4}", "source": "hand"},
    ])
    task = task_for("task=jsonl", f"task.path={path}", "task.problem_field=question",
                    "task.answer_field=target", "task.id_field=uid")
    assert isinstance(task, MathTask) and task.name == "jsonl"
    p1, p2 = task.problems("test")
    assert (p1.id, p1.answer, p1.prompt) == ("q1", "5", "What is 2+3?" + MATH_SUFFIX)
    assert p1.meta == {"source": "hand"}
    assert task.grade(p1, "2+3 = \\boxed{5}") and not task.grade(p1, "\\boxed{6}")
    assert task.grade(p2, "\\boxed{0.75}") and not task.grade(p2, "\\boxed{0.5}")


def test_jsonl_card_as_a_code_task(tmp_path):
    path = tmp_path / "code.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps({"name": "inc", "sig": "def inc(x):\n", "ref": "    return x + 1\n",
                            "tests": "def check(c):\n    assert c(1) == 2\n"}) + "\n")
    task = task_for("task=jsonl", "task.kind=code", f"task.path={path}", "task.problem_field=sig",
                    "task.answer_field=ref", "task.tests_field=tests",
                    "task.entry_point_field=name", "task.id_field=null")
    assert isinstance(task, CodeTask)
    (p,) = task.problems("test")
    assert (p.id, p.entry_point, p.answer) == ("jsonl-test-0", "inc", "    return x + 1\n")
    assert task.program(p, p.answer) == "def inc(x):\n    return x + 1\n"


def test_gsm8k_style_file_takes_the_gold_after_the_hashes(tmp_path):
    rows = [
        {"question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
         "answer": "In May: 48/2 = <<48/2=24>>24.\nIn all 48+24 = <<48+24=72>>72.\n#### 72"},
        {"question": "How many grams in 1.6 kg?", "answer": "1.6*1000 = 1600\n#### 1,600"},
    ]
    test_file = write_jsonl(tmp_path / "test.jsonl", rows)
    train_file = write_jsonl(tmp_path / "train.jsonl", rows[:1])
    task = task_for("task=gsm8k", f"task.path={test_file}", f"task.train_path={train_file}")
    p1, p2 = task.problems("test")
    assert (p1.id, p1.answer, p2.answer) == ("gsm8k-test-0", "72", "1600")
    assert p1.reasoning.endswith("<<48+24=72>>72.") and "####" not in p1.reasoning
    assert p1.prompt == rows[0]["question"] + MATH_SUFFIX
    assert task.grade(p1, "She sold \\boxed{72} clips.") and not task.grade(p1, "\\boxed{24}")
    assert task.grade(p2, "\\boxed{1600}")
    assert [p.answer for p in task.problems("train")] == ["72"]


def test_answer_without_the_delimiter_names_the_line(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "#### 1"},
                                              {"question": "q", "answer": "just 2"}])
    with pytest.raises(ConfigError, match=r"g\.jsonl:2.*'####'.*task\.answer_delimiter"):
        task_for("task=gsm8k", f"task.path={path}").problems("test")


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", HUB_CARDS)
def test_offline_hub_id_without_path_is_a_clear_error(name):
    task = task_for(f"task={name}")
    with pytest.raises(ConfigError) as info:
        task.problems("test")
    msg = str(info.value)
    assert f"task {name!r}" in msg and "HF_HUB_OFFLINE" in msg
    assert "task.path=/path/to/file.jsonl" in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__  # `from None`


def test_offline_hub_train_split_says_to_set_train_path(tmp_path):
    path = write_jsonl(tmp_path / "test.jsonl", [{"question": "q", "answer": "#### 1"}])
    with pytest.raises(ConfigError, match=r"openai/gsm8k \(main\).*task\.train_path=/path/to"):
        task_for("task=gsm8k", f"task.path={path}").problems("train")


def test_benchmark_without_training_data_refuses_train(shared_task):
    with pytest.raises(ConfigError, match=r"'aime24' has no training split.*arith.*train_path"):
        shared_task("aime24").problems("train")


def test_jsonl_card_without_a_path_says_to_set_one():
    with pytest.raises(ConfigError, match=r"'jsonl' has no data: set task\.path="):
        task_for("task=jsonl").problems("test")


@pytest.mark.parametrize("content", ["", "\n  \n"], ids=["empty", "blank-lines"])
def test_empty_file_names_the_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(ConfigError, match=rf"{path}.*is empty"):
        task_for("task=math500", f"task.path={path}").problems("test")


@pytest.mark.parametrize("bad,why", [('{"problem": "x", "answer": ', "not valid JSON"),
                                     ('["problem", "answer"]', "JSON list, not an object")])
def test_malformed_line_names_file_and_line(tmp_path, bad, why):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"problem": "1+1?", "answer": "2"}\n\n' + bad + "\n")
    with pytest.raises(ConfigError, match=rf"{path}:3 .*{why}"):
        task_for("task=jsonl", f"task.path={path}", "task.id_field=null").problems("test")


def test_missing_field_names_it_the_fields_there_and_the_override(tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", [{"problem": "1+1?", "ans": "2", "unique_id": "a"}])
    with pytest.raises(ConfigError) as info:
        task_for("task=math500", f"task.path={path}").problems("test")
    msg = str(info.value)
    assert f"{path}:1" in msg and "'answer'" in msg and "task.answer_field=" in msg
    assert "['ans', 'problem', 'unique_id']" in msg


def test_unknown_kind_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="valid kinds: arith, math, code"):
        task_for("task=jsonl", "task.kind=essay")
