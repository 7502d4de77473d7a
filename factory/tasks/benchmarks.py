"""Benchmark tasks: MATH-500, AIME 2024, GSM8K, HumanEval, and any JSON-lines file of your own.

A card (conf/task/*.yaml) names where the rows come from and which column holds what:

    source / subset / split   hub dataset, loaded with `datasets.load_dataset(source, subset)`
    path                      a local .jsonl or .jsonl.gz file instead (`task.path=...`), loaded
                              with `datasets.load_dataset("json", data_files=path)`
    train_split / train_path  where training prompts come from; None for the held-out
                              benchmarks, which then refuse problems("train")
    *_field                   the column mapping (problem, answer, tests, entry point, id);
                              `answer_delimiter` takes the gold after it (gsm8k: "####") and
                              keeps the text before it as the problem's reasoning

Two kinds, one class each:

    math  prompt: the problem + MATH_SUFFIX (Qwen3's math evaluation prompt)
          grade:  factory.tasks.math.grade(response, gold): the last \\boxed{} vs the gold, by
                  math-verify
    code  prompt: CODE_INSTRUCTION + the function prompt in a ```python block
          grade:  the last ```python block of the response (or the whole response), with the
                  function prompt prepended when it does not define the entry point, run with
                  the tests in the sandbox (factory.tasks.code.check); `grade_many` runs many
                  in parallel (code.check_many)

Local files are checked line by line before `datasets` reads them, so an empty file, a line that
is not a JSON object or a row without a mapped field fails naming the file, the line and the
override that fixes it. Offline (HF_HUB_OFFLINE=1) with a hub source that is not in the local
datasets cache, the error says to set `task.path=/path/to/file.jsonl`.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from factory.config import TaskConfig
from factory.errors import ConfigError
from factory.tasks import Problem

# Qwen3 technical report / Qwen2.5-Math evaluation: the math prompt asks for a boxed answer
MATH_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."
CODE_INSTRUCTION = (
    "Complete the following Python function. Return the whole function in a ```python code block."
)

# a fenced block and its language tag: ```python\n ... ``` (every fence pairs, whatever its tag)
_FENCED = re.compile(r"```[ \t]*([\w+-]*)[ \t]*\n(.*?)```", re.DOTALL)
_PYTHON_TAGS = ("python", "python3", "py", "")
_IMPORT_LINE = re.compile(r"^(?:import\s|from\s+(?!__future__)\S+\s+import\s)")


def math_prompt(problem: str) -> str:
    return problem + MATH_SUFFIX


def code_prompt(function_prompt: str) -> str:
    return f"{CODE_INSTRUCTION}\n\n```python\n{function_prompt.rstrip()}\n```"


def extract_code(response: str) -> str:
    """The last ```python (or untagged) fenced block of `response`; the whole response if none."""
    blocks = [body for tag, body in _FENCED.findall(response) if tag.lower() in _PYTHON_TAGS]
    return blocks[-1] if blocks else response


def defines(program: str, name: str) -> bool:
    return re.search(rf"^\s*(?:async\s+)?def\s+{re.escape(name)}\s*\(", program, re.M) is not None


def program_for(function_prompt: str, entry_point: str, response: str) -> str:
    """The program to test for a code response.

    A response that defines the entry point is the whole function: the prompt's imports go first
    (models often drop `from typing import List`; importing twice is harmless). One that does not
    is a body to append to the prompt (HumanEval's completion format).
    """
    code = extract_code(response)
    if not defines(code, entry_point):
        return function_prompt + code
    imports = [line for line in function_prompt.splitlines() if _IMPORT_LINE.match(line)]
    return "\n".join([*imports, code]) if imports else code


# ------------------------------------------------------------------------------------------
# loading rows
# ------------------------------------------------------------------------------------------


class _Rows:
    """A split's rows (a datasets.Dataset) and how to name one of them in an error."""

    def __init__(self, dataset, where: Callable[[int], str]):
        self.dataset = dataset
        self.where = where


def _check_jsonl(task: str, path: Path, required: dict[str, str]) -> list[int]:
    """Read `path` (gzip if .gz) as JSON lines; each non-blank line must be an object with every
    `required` field (field -> the override that maps it) non-null. The non-blank line numbers."""
    if not path.is_file():
        raise ConfigError(f"task {task!r}: no such file {str(path)!r}; point task.path (or "
                          f"task.train_path) at a .jsonl or .jsonl.gz file")
    opener = gzip.open if path.suffix == ".gz" else open
    lines: list[int] = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ConfigError(
                        f"task {task!r}: {path}:{lineno} is not valid JSON ({err.msg}, column "
                        f"{err.colno}); the file must hold one JSON object per line"
                    ) from None
                if not isinstance(row, dict):
                    raise ConfigError(f"task {task!r}: {path}:{lineno} is a JSON "
                                      f"{type(row).__name__}, not an object with named fields")
                for field, key in required.items():
                    if row.get(field) is None:
                        raise _missing(task, f"{path}:{lineno}", field, key, row)
                lines.append(lineno)
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise ConfigError(f"task {task!r}: cannot read {path}: {err}") from None
    if not lines:
        raise ConfigError(f"task {task!r}: {path} is empty: it holds no JSON lines")
    return lines


def _missing(task: str, where: str, field: str, key: str, row) -> ConfigError:
    have = "has it null" if field in row else "has no such field"
    return ConfigError(f"task {task!r}: {where} {have}: {field!r} (mapped by {key}); its fields "
                       f"are {sorted(row)}; set {key}=<one of them>")


def _load_local(task: str, path: str, required: dict[str, str]) -> _Rows:
    import datasets

    file = Path(path).expanduser()
    lines = _check_jsonl(task, file, required)
    try:
        ds = datasets.load_dataset("json", data_files=str(file), split="train")
    except Exception as err:  # noqa: BLE001 - e.g. a field whose type changes between lines
        raise ConfigError(f"task {task!r}: datasets cannot read {file} as JSON lines: "
                          f"{type(err).__name__}: {err}") from None
    return _Rows(ds, lambda i: f"{file}:{lines[i]}")


def _load_hub(task: str, source: str, subset: str | None, split: str,
              required: dict[str, str], override: str) -> _Rows:
    """The hub split; on failure the error names `override`, the key of a local file instead."""
    import datasets

    name = source if subset is None else f"{source} ({subset})"
    try:
        ds = datasets.load_dataset(source, subset, split=split)
    except Exception as err:  # noqa: BLE001 - the hub client's errors vary by version and cause
        if datasets.config.HF_HUB_OFFLINE:
            why = f"HF_HUB_OFFLINE is set and {name} is not in the local datasets cache"
        else:
            first_line = (str(err).splitlines() or [""])[0]
            why = (f"cannot load {name} [{split}] from the Hugging Face Hub "
                   f"({type(err).__name__}: {first_line})")
        raise ConfigError(f"task {task!r}: {why}; load it from a local file instead with "
                          f"{override}=/path/to/file.jsonl (.jsonl or .jsonl.gz)") from None
    for field, key in required.items():
        if field not in ds.column_names:
            raise ConfigError(f"task {task!r}: {name} [{split}] has no field {field!r} (mapped "
                              f"by {key}); its fields are {sorted(ds.column_names)}; set "
                              f"{key}=<one of them>")
    return _Rows(ds, lambda i: f"{name} [{split}] row {i}")


def _required(cfg: TaskConfig, code: bool) -> dict[str, str]:
    """field -> the override that maps it, for the fields a row must have."""
    keys = {"problem_field": cfg.problem_field, "answer_field": cfg.answer_field,
            "id_field": cfg.id_field}
    if code:
        keys |= {"tests_field": cfg.tests_field, "entry_point_field": cfg.entry_point_field}
    elif cfg.answer_field is None:
        raise ConfigError(f"task {cfg.name!r}: a math task needs a gold answer; set "
                          f"task.answer_field=<the column holding it>")
    return {field: f"task.{key}" for key, field in keys.items() if field is not None}


class _Splits:
    """Loads a card's test and train rows on first use and turns them into Problems."""

    def __init__(self, cfg: TaskConfig, code: bool,
                 make: Callable[[dict, str, Callable[[], str]], Problem]):
        self.cfg = cfg
        self.required = _required(cfg, code)
        self.make = make  # (row, id, where) -> Problem
        self.cache: dict[str, list[Problem]] = {}

    def _rows(self, split: str) -> _Rows:
        cfg, name = self.cfg, self.cfg.name
        if split == "test":
            if cfg.path:
                return _load_local(name, cfg.path, self.required)
            if cfg.source:
                return _load_hub(name, cfg.source, cfg.subset, cfg.split, self.required,
                                 "task.path")
            raise ConfigError(f"task {name!r} has no data: set task.path=/path/to/file.jsonl "
                              f"(.jsonl or .jsonl.gz) or task.source=<hub dataset id>")
        if cfg.train_path:
            return _load_local(name, cfg.train_path, self.required)
        if cfg.train_split and cfg.source:
            return _load_hub(name, cfg.source, cfg.subset, cfg.train_split, self.required,
                             "task.train_path")
        raise ConfigError(
            f"task {name!r} has no training split: it is a held-out benchmark (the arith task is "
            f"the one with training data); to train on prompts of your own, set "
            f"task.train_path=/path/to/train.jsonl"
        )

    def problems(self, split: str, n: int) -> list[Problem]:
        if split not in ("train", "test"):
            raise ValueError(f"task {self.cfg.name!r} has splits 'train' and 'test', not {split!r}")
        if split not in self.cache:
            rows = self._rows(split)
            cap = self.cfg.n_test if split == "test" else self.cfg.n_train
            count = min(cap or len(rows.dataset), len(rows.dataset))
            id_field = self.cfg.id_field
            problems = []
            for i, row in enumerate(rows.dataset.select(range(count))):
                for field, key in self.required.items():  # hub rows: checked here, by row
                    if row[field] is None:
                        raise _missing(self.cfg.name, rows.where(i), field, key, row)
                pid = str(row[id_field]) if id_field else f"{self.cfg.name}-{split}-{i}"
                problems.append(self.make(row, pid, lambda i=i: rows.where(i)))
            self.cache[split] = problems
        return self.cache[split][: n or None]


def _meta(row: dict, mapped: Iterable[str | None]) -> dict:
    """The row's other scalar fields (MATH-500's solution, subject and level; AIME's url)."""
    skip = set(mapped)
    return {k: v for k, v in row.items()
            if k not in skip and isinstance(v, (str, int, float, bool))}


# ------------------------------------------------------------------------------------------
# the tasks
# ------------------------------------------------------------------------------------------


class MathTask:
    """A `Task` of problems with one final answer, graded by math-verify (MATH-500, AIME, GSM8K).

    problems(split, n): the first n of the split (0 or more than it has: all), in file order;
    "test" holds the first task.n_test rows (0: all), "train" those of train_path/train_split.
    """

    def __init__(self, cfg: TaskConfig):
        self.name = cfg.name
        self.cfg = cfg
        self._splits = _Splits(cfg, code=False, make=self._problem)

    def _problem(self, row: dict, pid: str, where: Callable[[], str]) -> Problem:
        cfg = self.cfg
        answer = str(row[cfg.answer_field]).strip()
        reasoning = None
        if cfg.answer_delimiter is not None:
            head, sep, gold = answer.rpartition(cfg.answer_delimiter)
            if not sep:
                raise ConfigError(f"task {cfg.name!r}: {where()}: the answer has no "
                                  f"{cfg.answer_delimiter!r} before its gold "
                                  f"(task.answer_delimiter); it reads {answer[-80:]!r}")
            answer, reasoning = gold.strip(), head.strip()
            if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", answer):
                answer = answer.replace(",", "")  # "1,600": thousands, not a pair
        return Problem(
            id=pid,
            prompt=math_prompt(str(row[cfg.problem_field])),
            answer=answer,
            reasoning=reasoning,
            meta=_meta(row, [cfg.problem_field, cfg.answer_field, cfg.id_field]),
        )

    def problems(self, split: str, n: int = 0) -> list[Problem]:
        return self._splits.problems(split, n)

    def grade(self, problem: Problem, response: str) -> bool:
        from factory.tasks.math import grade

        return grade(response, problem.answer)


class CodeTask:
    """A `Task` of Python functions to complete, graded by running their tests (HumanEval).

    A problem's `answer` is the reference solution (the canonical completion), its `tests` the
    test program defining check(candidate), and meta["function_prompt"] the function's signature
    and docstring (what the prompt shows, and what a body-only response is appended to).
    `grade` raises code.SandboxUnavailableError where task.sandbox cannot run (see
    factory/tasks/code.py): a run never scores code it did not execute.
    """

    def __init__(self, cfg: TaskConfig):
        from factory.tasks.code import SANDBOX_MODES

        if cfg.sandbox not in SANDBOX_MODES:
            raise ConfigError(f"task.sandbox must be one of {list(SANDBOX_MODES)}, "
                              f"got {cfg.sandbox!r}")
        if not cfg.code_timeout_s > 0:
            raise ConfigError(f"task.code_timeout_s must be > 0, got {cfg.code_timeout_s}")
        self.name = cfg.name
        self.cfg = cfg
        self._splits = _Splits(cfg, code=True, make=self._problem)

    def _problem(self, row: dict, pid: str, where: Callable[[], str]) -> Problem:
        cfg = self.cfg
        function_prompt = str(row[cfg.problem_field])
        return Problem(
            id=pid,
            prompt=code_prompt(function_prompt),
            answer=str(row[cfg.answer_field]) if cfg.answer_field else "",
            tests=str(row[cfg.tests_field]),
            entry_point=str(row[cfg.entry_point_field]),
            meta={"function_prompt": function_prompt,
                  **_meta(row, [cfg.problem_field, cfg.answer_field, cfg.tests_field,
                                cfg.entry_point_field, cfg.id_field])},
        )

    def problems(self, split: str, n: int = 0) -> list[Problem]:
        return self._splits.problems(split, n)

    def program(self, problem: Problem, response: str) -> str:
        """The program `grade` runs for `response` (see `program_for`)."""
        return program_for(problem.meta["function_prompt"], problem.entry_point, response)

    def grade(self, problem: Problem, response: str) -> bool:
        from factory.tasks import code

        program = self.program(problem, response)
        return code.check(program, problem.tests, problem.entry_point, self.cfg.code_timeout_s,
                          sandbox=self.cfg.sandbox).passed

    def grade_many(self, pairs: Sequence[tuple[Problem, str]],
                   max_workers: int | None = None) -> list[bool]:
        """`grade` over (problem, response) pairs, the sandboxed runs in parallel (a thread pool
        of max_workers, default the CPU count; code.check_many). Verdicts in input order."""
        from factory.tasks import code

        items = [(self.program(p, r), p.tests, p.entry_point) for p, r in pairs]
        results = code.check_many(items, self.cfg.code_timeout_s, max_workers,
                                  sandbox=self.cfg.sandbox)
        return [r.passed for r in results]
