"""The arith task: determinism, the difficulty knob, trace correctness, disjoint splits, grading,
the guessing baseline and the pretraining corpus."""

from __future__ import annotations

import re
import time

import pytest

from factory.config import TaskConfig
from factory.errors import ConfigError
from factory.tasks import Problem
from factory.tasks.arith import ArithTask, guess_baseline, last_integer, make_problem

pytestmark = pytest.mark.unit

STEP = re.compile(r"^(-?\d+)([+\-*])(\d+)=(-?\d+)$")  # one operation per trace line


def task(**overrides) -> ArithTask:
    return ArithTask(TaskConfig(name="arith", kind="arith", **{"n_test": 200, **overrides}))


def evaluate(expression: str) -> int:
    assert re.fullmatch(r"[\d+\-*()]+", expression), expression
    return eval(expression)  # digits, + - * and parentheses only (checked above)


def check_step(line: str) -> int:
    m = STEP.match(line)
    assert m, f"not a single-operation step: {line!r}"
    a, op, b, result = int(m[1]), m[2], int(m[3]), int(m[4])
    assert {"+": a + b, "-": a - b, "*": a * b}[op] == result, line
    return result


def test_worked_example():
    p = make_problem([37, 45, 38, 18], ("+", "*", "-"))
    assert p.prompt == "Compute (37+45)*38-18."
    assert p.reasoning == "37+45=82\n82*8=656\n82*30=2460\n656+2460=3116\n3116-18=3098"
    assert p.answer == "3098" == str((37 + 45) * 38 - 18)
    # a one-digit (or round) multiplier is one line; negative partial sums read as subtraction
    assert make_problem([37, 45, 3], ("+", "*")).reasoning == "37+45=82\n82*3=246"
    negative = make_problem([5, 9, 23], ("-", "*"))
    assert negative.reasoning == "5-9=-4\n-4*3=-12\n-4*20=-80\n-12-80=-92"
    assert make_problem([2, 3, 4], ("*", "+")).prompt == "Compute 2*3+4."
    assert make_problem([2, 3, 4], ("-", "-")).prompt == "Compute 2-3-4."
    assert make_problem([2, 3, 4, 5], ("+", "*", "*")).prompt == "Compute (2+3)*4*5."
    assert make_problem([2, 3, 4, 5], ("*", "-", "*")).prompt == "Compute (2*3-4)*5."


def test_deterministic_by_seed():
    a, b = task(seed=3), task(seed=3)
    assert a.problems("test") == b.problems("test")
    assert a.problems("train", 500) == b.problems("train", 500)
    assert task(seed=4).problems("test") != a.problems("test")
    # a prefix is stable however much was asked for before
    assert a.problems("train", 100) == b.problems("train", 1000)[:100]


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4])
def test_difficulty_is_the_number_of_operations(difficulty):
    problems = task(difficulty=difficulty, max_operand=7, max_first_operand=50).problems("train", 300)
    positions = set()
    for p in problems:
        expr = p.meta["expression"]
        assert sum(expr.count(op) for op in "+-*") == difficulty
        assert expr.count("*") == 1  # one multiplication, by a digit: what spreads the answers
        assert re.search(r"\*[2-9](?!\d)", expr)
        operands = [int(x) for x in re.findall(r"\d+", expr)]
        assert len(operands) == difficulty + 1 and 1 <= operands[0] <= 50
        assert all(1 <= x <= 9 for x in operands[1:])  # added ones <= 7, the multiplier 2-9
        multiplicand = p.reasoning.split("\n")[[i for i, line in enumerate(p.reasoning.split("\n"))
                                                 if "*" in line][0]].split("*")[0]
        assert 1 <= abs(int(multiplicand)) <= 99
        positions.add(expr.replace("(", "").replace(")", "").index("*"))
    assert len(positions) >= difficulty  # the multiplication comes at every position


def test_traces_are_correct():
    problems = task(difficulty=3).problems("train", 1000)
    for p in problems:
        lines = p.reasoning.split("\n")
        for line in lines:
            check_step(line)
        assert int(lines[-1].split("=")[-1]) == int(p.answer) == evaluate(p.meta["expression"])
        assert p.prompt == f"Compute {p.meta['expression']}."
    assert min(int(p.answer) for p in problems) < 0 < max(int(p.answer) for p in problems)


def test_splits_are_disjoint():
    t = task()
    test = [p.meta["expression"] for p in t.problems("test")]
    train = {p.meta["expression"] for p in t.problems("train", 20_000)}
    assert len(set(test)) == len(test) == 200
    assert train.isdisjoint(test)
    # where the space is small the train stream draws test problems all the time: all dropped
    small = task(difficulty=1, max_first_operand=5, n_test=10)
    held_out = {p.meta["expression"] for p in small.problems("test")}
    train = [p.meta["expression"] for p in small.problems("train", 500)]
    assert held_out.isdisjoint(train) and len(set(train)) == 5 * 8 - 10  # 1-5 times 2-9
    with pytest.raises(ConfigError, match="distinct test problems"):
        task(difficulty=1, max_first_operand=5, n_test=41).problems("test")
    with pytest.raises(ConfigError):
        t.problems("test", 201)


def test_ids_are_unique_and_stable():
    t = task()
    ids = [p.id for p in t.problems("train", 1000)] + [p.id for p in t.problems("test")]
    assert len(set(ids)) == len(ids)
    assert t.problems("test")[0].id == "arith-test-0"
    assert t.problems("train", 1)[0].id == "arith-train-0"


def test_grade():
    t = task()
    p = make_problem([37, 45, 3, 18], ("+", "*", "-"))  # 228
    for good in ["228", "= 228", "The answer is 228.", "82*3=246, 246-18=228", " 228\n"]:
        assert t.grade(p, good), good
    for bad in ["", "no idea", "229", "228.5", "2280", "228 or 229", "-228"]:
        assert not t.grade(p, bad), bad
    neg = make_problem([5, 9, 3], ("-", "*"))  # -12
    assert t.grade(neg, "-12") and t.grade(neg, "so it is -12.") and not t.grade(neg, "12")
    assert last_integer("246-18") == 18  # a minus after a digit is an operator
    assert last_integer("x = -7") == -7 and last_integer("none") is None


def test_guess_baseline_is_small_at_the_default():
    t = task()  # difficulty 2, operands <= 99: the tiny world's default
    baseline = guess_baseline(t.problems("train", 20_000), t.problems("test"), k=64)
    assert 0.0 < baseline < 0.15  # measured 0.11-0.12 (answers in 0-99 would give 0.47)
    assert guess_baseline(t.problems("train", 20_000), t.problems("test"), k=1) < 0.002


def test_guess_baseline_on_answers_in_0_to_99():
    # DESIGN.md: with answers in 0-99 pure guessing reaches about 47% Pass@64
    def answers(values):
        return [Problem(id=str(i), prompt="", answer=str(v)) for i, v in enumerate(values)]

    uniform = answers(range(100))
    assert guess_baseline(uniform * 10, uniform, k=64) == pytest.approx(1 - 0.99**64)
    assert guess_baseline(uniform * 10, uniform, k=64) == pytest.approx(0.47, abs=0.01)
    assert guess_baseline(uniform, answers([1000]), k=64) == 0.0  # never seen: never guessed


def test_corpus_teaches_facts_not_solutions():
    t = task()
    docs = t.corpus(2000, seed=0)
    assert docs == t.corpus(2000, seed=0) and docs != t.corpus(2000, seed=1)
    assert len(docs) == 2000
    facts = [line for doc in docs for line in doc.split("\n")]
    for line in facts:
        check_step(line)
    text = "\n".join(docs)
    for markup in ["<|im_start|>", "<think>", "Compute", "(", "/think"]:
        assert markup not in text
    assert {line[STEP.match(line).end(1)] for line in facts} == {"+", "-", "*"}
    # shuffled across problems: no test problem's full chain appears
    assert not any(p.reasoning in text for p in t.problems("test"))


def test_generation_is_fast():
    t = task(n_test=1000)
    start = time.perf_counter()
    t.problems("train", 50_000)
    t.corpus(5_000)
    # ~0.5 s on one idle core; the bound only catches a pathological slowdown on a busy machine
    assert time.perf_counter() - start < 10.0
