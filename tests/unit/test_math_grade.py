"""Math answer extraction and symbolic grading (math-verify underneath)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from factory.tasks.math import extract_answer, grade

pytestmark = pytest.mark.unit


def boxed(ans: str) -> str:
    return "Let me work it out.\n\nSo the answer is $\\boxed{" + ans + "}$."


EQUIVALENT = [
    # (answer the model writes, gold)
    ("0.5", r"\frac{1}{2}"),
    (r"\frac{1}{2}", "0.5"),
    (r"\dfrac{1}{2}", r"\frac12"),
    (r"\tfrac{3}{4}", "0.75"),
    ("1/2", r"\frac{1}{2}"),
    (r"\frac{14}{3}", r"\dfrac{14}{3}"),
    (r"4.6666666667", r"\frac{14}{3}"),
    (r"\sqrt{2}/2", r"\frac{\sqrt{2}}{2}"),
    (r"\frac{\sqrt2}{2}", r"\frac{\sqrt{2}}{2}"),
    (r"\frac{1}{\sqrt{2}}", r"\frac{\sqrt{2}}{2}"),
    (r"2\sqrt{3}+1", r"1+2\sqrt{3}"),
    (r"\{2,1\}", r"\{1,2\}"),
    (r"\{1, 2\}", r"\{2,1\}"),
    ("7, 5, 3", "3, 5, 7"),
    (r"\{1+\sqrt{5},1-\sqrt{5},-2\}", r"\{1\pm\sqrt{5},-2\}"),
    ("(1,2)", "(1, 2)"),
    (r"(3,\frac{\pi}{2})", r"\left( 3, \frac{\pi}{2} \right)"),
    ("(6, 31, -1)", "(6,31,-1)"),
    ("[2, 5)", "[2,5)"),
    (r"(-\infty,0]", r"(-\infty, 0]"),
    (r"(0, 9) \cup (9, 36)", r"(0,9) \cup (9,36)"),
    (r"[-2,7]", r"x \in [-2,7]"),
    (r"10\%", r"10\%"),
    ("10%", r"10\%"),
    ("10", r"10\%"),
    ("0.1", r"10\%"),
    (r"5\text{ cm}", "5"),
    ("5", r"5 \text{ cm}"),
    (r"5 \mbox{ cm}^2", "5"),
    (r"90^\circ", "90"),
    ("90", r"90^\circ"),
    (r"90^{\circ}", r"90^\circ"),
    ("90°", r"90^\circ"),
    (r"\frac{270}{7}", r"\frac{270}7\text{ degrees}"),
    (r"\text{(C)}", r"\text{(C)}"),
    ("C", r"\text{(C)}"),
    ("(C)", r"\text{(C)}"),
    (r"\textbf{(C)}", r"\text{(C)}"),
    (r"\text{Evelyn}", r"\text{Evelyn}"),
    ("x=5", "5"),
    ("5", "x = 5"),
    ("y = 2x + 3", "y=2x+3"),
    ("10080", r"10,\!080"),
    ("10,080", r"10,\!080"),
    (r"\$18.90", "18.9"),
    ("6.72e-5", ".0000672"),
    (r"6.72\times 10^{-5}", ".0000672"),
    ("25", "025"),
    ("4210_5", "4210_{5}"),
    ("52", "52_8"),
    ("204", "204"),
    ("-3", "-3"),
    ("\u22123", "-3"),  # unicode minus
    (r"x^2+2x+1", "(x+1)^2"),
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}"),
    (r"6 - 5i", "6-5i"),
]

WRONG = [
    ("0.51", r"\frac{1}{2}"),
    (r"\frac{1}{3}", "0.3"),
    ("4.67", r"\frac{14}{3}"),
    (r"\sqrt{3}/2", r"\frac{\sqrt{2}}{2}"),
    (r"\{1,3\}", r"\{1,2\}"),
    ("(2,1)", "(1, 2)"),
    ("(2,5)", "[2, 5)"),
    ("11", r"10\%"),
    ("6", r"5\text{ cm}"),
    ("B", r"\text{(C)}"),
    ("3", r"\text{(C)}"),
    (r"\text{odd}", r"\text{even}"),
    ("205", "204"),
    ("x^2+2x", "(x+1)^2"),
    ("91", r"90^\circ"),
    ("52_7", "52_8"),  # a base subscript that differs
]


@pytest.mark.parametrize("answer,gold", EQUIVALENT)
def test_equivalent_forms_grade_correct(answer, gold):
    assert grade(boxed(answer), gold)


@pytest.mark.parametrize("answer,gold", WRONG)
def test_wrong_answers_grade_wrong(answer, gold):
    assert not grade(boxed(answer), gold)


def test_integer_gold_and_int_type():
    assert grade(boxed("204"), 204)
    assert not grade(boxed("205"), 204)


def test_last_boxed_wins_and_nested_braces():
    assert grade(r"First try \boxed{3}. Hmm, no: \boxed{4}.", "4")
    assert not grade(r"First try \boxed{4}. Hmm, no: \boxed{3}.", "4")
    resp = r"so $\boxed{\frac{\sqrt{\frac{1}{4}}}{2}}$"
    assert extract_answer(resp) == r"\frac{\sqrt{\frac{1}{4}}}{2}"
    assert grade(resp, r"\frac14")
    assert extract_answer(r"\boxed{\{1, 2\}}") == r"\{1, 2\}"
    assert extract_answer(r"\boxed{\left( 3, \frac{\pi}{2} \right)}") == r"\left( 3, \frac{\pi}{2} \right)"
    assert extract_answer(r"\fbox{7}") == "7"
    assert extract_answer(r"the answer is \boxed 7") == "7"
    # a truncated last box does not count; the last complete one does
    assert extract_answer(r"\boxed{5} and finally \boxed{\frac{1") == "5"


def test_without_boxed_the_final_answer_line_is_used():
    assert extract_answer("We compute.\nThe final answer is $\\frac{1}{2}$.") == r"\frac{1}{2}"
    assert grade("We compute.\nThe final answer is $\\frac{1}{2}$.", "0.5")
    assert grade("Step 1...\nAnswer: 42", "42")
    assert grade("The answer is 17.", "17")
    assert grade("blah blah\n\n**Final Answer:** 3/4", r"\frac34")
    assert grade("some reasoning\nso we get\n42\n", "42")  # last line
    assert not grade("some reasoning\nso we get\n41\n", "42")


@pytest.mark.parametrize(
    "response",
    [None, "", "   \n  ", 42, b"\\boxed{1}", "}}}{{{\\boxed{{{", r"\boxed{}", r"\boxed{\frac{", "asdf qwer zxcv",
     r"\boxed{\frac{1}{0}}", r"\boxed{\\\\\\}", "\\boxed{" + "(" * 500 + "}", "x" * 300_000, "\x00\x01\x02"],
)
def test_garbage_is_false_not_an_exception(response):
    assert grade(response, "1") is False


@pytest.mark.parametrize("gold", [None, "", "   ", r"\frac{", [], object()])
def test_garbage_gold_is_false(gold):
    assert grade(boxed("1"), gold) is False


def test_pathological_power_towers_are_refused_fast():
    t0 = time.monotonic()
    assert not grade(boxed(r"9^{9^{9^{9}}}"), "1")
    assert not grade(boxed("2^{123456789}"), "1")
    assert not grade(boxed("9**9**9**9"), "1")
    assert time.monotonic() - t0 < 5


def test_grade_works_from_worker_threads():
    # math-verify's timeouts use signal.alarm, which raises off the main thread; grade() switches
    # them off there instead of failing
    pairs = [(boxed(a), g) for a, g in EQUIVALENT[:12]] + [(boxed(a), g) for a, g in WRONG[:6]]
    expected = [True] * 12 + [False] * 6
    errors = []

    def run(p):
        try:
            return grade(*p)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            raise

    with ThreadPoolExecutor(max_workers=2) as pool:
        got = list(pool.map(run, pairs))
    assert errors == []
    assert got == expected
    t = threading.Thread(target=lambda: errors.append(grade(boxed(r"9^{9^{9^{9}}}"), "1")))
    t.start()
    t.join(10)
    assert errors == [False]


def test_does_not_cancel_the_callers_alarm():
    # math-verify's SIGALRM timeout would cancel a pending timer such as pytest-timeout's
    import signal

    fired = []
    old = signal.signal(signal.SIGALRM, lambda *a: fired.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 100.0)
        assert grade(boxed(r"\frac{1}{2}"), "0.5")
        assert signal.getitimer(signal.ITIMER_REAL)[0] > 90
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert fired == []
