"""arith: generated multi-step integer arithmetic, the tiny world's task.

A problem is an expression of `difficulty` operations on a first operand in
[1, max_first_operand], evaluated left to right and written with the fewest parentheses that say
so. Exactly one operation is a multiplication, by a digit (2-9), of an intermediate result in
[-99, 99]; the others add or subtract an integer in [1, max_operand]:

    prompt     Compute (37+5)*8-6.
    reasoning  37+5=42
               42*8=336
               336-6=330
    answer     330

The chain of thought takes one operation per line, so every line is a fact a 1M-parameter model
learns in minutes: a number of at most three digits plus or minus a digit (the defaults), or a
number of at most two digits times a digit.

Why this shape (measured on this machine; docs/design.md). The tiny teacher learns what each
line needs in a few thousand steps only when the facts are that small: adding two two-digit
numbers or a two-digit number to a three-digit one stayed 40-96% wrong after 3,000 steps, and
multiplying by two-digit numbers the long way (partial products, then their four-digit sum) was
worse. The one multiplication is what spreads the answers over about 900 values, where a guesser
drawing from the answer distribution reaches Pass@64 of 0.11-0.12 and Pass@1 of 0.002
(`guess_baseline`; the eval reports it): with answers in 0-99 it would reach 0.47 (DESIGN.md).
`max_operand=99` spreads them further (0.08) at the price of two-digit sums.

Splits: the test split is the first `n_test` distinct problems of its own random stream; the
train split is an endless stream from another seed, without any problem whose expression is in
the test split. Both are deterministic given (seed, difficulty, max_operand, max_first_operand,
n_test).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Iterator, Sequence

from factory.config import TaskConfig
from factory.errors import ConfigError
from factory.tasks import Problem

DEFAULT_N_TRAIN = 50_000  # n_train = 0 ("all"): the stream is endless, so a pool this large
DEFAULT_N_TEST = 200
FACTS_PER_DOCUMENT = 8  # lines per pretraining document

# the last integer of a response; a "-" right after a digit is an operator, not a sign
_LAST_INT = re.compile(r"(?<!\d)-?\d+")


def _sum_line(a: int, b: int) -> str:
    """The trace line for a+b; adding a negative number is written as a subtraction."""
    return f"{a}+{b}={a + b}" if b >= 0 else f"{a}-{-b}={a + b}"


def _multiply(acc: int, x: int, lines: list[str]) -> int:
    """acc*x, appending its lines: one when x has a single non-zero digit, else one partial
    product per non-zero digit (units first), then the running sum of the partial products."""
    if x < 10 or (x < 100 and x % 10 == 0):  # the common cases written out, for speed
        result = acc * x
        lines.append(f"{acc}*{x}={result}")
        return result
    if x < 100:
        units = x % 10
        p1, p2 = acc * units, acc * (x - units)
        lines.append(f"{acc}*{units}={p1}")
        lines.append(f"{acc}*{x - units}={p2}")
        lines.append(_sum_line(p1, p2))
        return p1 + p2
    partials = [int(d) * 10**i for i, d in enumerate(reversed(str(x))) if d != "0"]
    if len(partials) == 1:
        result = acc * x
        lines.append(f"{acc}*{x}={result}")
        return result
    products = [acc * m for m in partials]
    lines.extend(f"{acc}*{m}={p}" for m, p in zip(partials, products))
    total = products[0]
    for p in products[1:]:
        lines.append(_sum_line(total, p))
        total += p
    return total


def make_problem(operands: Sequence[int], ops: Sequence[str], id: str = "") -> Problem:
    """The problem for `operands[0] ops[0] operands[1] ops[1] ...`, evaluated left to right."""
    acc = operands[0]
    expr = str(acc)
    additive_top = False  # whether `expr` has a + or - outside parentheses
    lines: list[str] = []
    for op, x in zip(ops, operands[1:]):
        if op == "*":
            if additive_top:
                expr = f"({expr})"
                additive_top = False
            acc = _multiply(acc, x, lines)
        else:
            additive_top = True
            new = acc + x if op == "+" else acc - x
            lines.append(f"{acc}{op}{x}={new}")
            acc = new
        expr = f"{expr}{op}{x}"
    return Problem(
        id=id,
        prompt=f"Compute {expr}.",
        answer=str(acc),
        reasoning="\n".join(lines),
        meta={"expression": expr},
    )


MULTIPLIERS = (2, 9)  # the multiplication's operand: one digit
MULTIPLICAND_MAX = 99  # |intermediate result| a multiplication applies to


def _random_specs(
    rng: random.Random, difficulty: int, max_operand: int, max_first_operand: int
) -> Iterator[tuple[list[int], tuple[str, ...]]]:
    """An endless stream of (operands, ops): the multiplication's position uniform over the
    `difficulty` operations, the others "+" or "-" with equal odds, the first operand uniform over
    [1, max_first_operand], the others over [1, max_operand], the multiplier over 2-9. A draw
    whose multiplicand falls outside [-99, 99] (or is 0) is drawn again."""
    random_ = rng.random
    lo, hi = MULTIPLIERS
    while True:
        at = int(random_() * difficulty)
        ops = tuple("*" if i == at else "+-"[int(random_() * 2)] for i in range(difficulty))
        operands = [int(random_() * max_first_operand) + 1]
        acc = operands[0]
        for op in ops:
            if op == "*":
                if not 0 < abs(acc) <= MULTIPLICAND_MAX:
                    break
                x = lo + int(random_() * (hi - lo + 1))
                acc *= x
            else:
                x = int(random_() * max_operand) + 1
                acc = acc + x if op == "+" else acc - x
            operands.append(x)
        else:
            yield operands, ops


def guess_baseline(
    problems_train: Sequence[Problem], problems_test: Sequence[Problem], k: int
) -> float:
    """Pass@k of a guesser that ignores the question and draws k answers (with replacement)
    from the train split's empirical answer distribution p.

    Per test problem with gold answer a: 1 - (1 - p(a))^k; the mean over the test problems. It is
    the floor a student must clear for Pass@k to mean anything: with answers uniform over 0-99,
    p = 0.01 and Pass@64 = 1 - 0.99^64 = 0.47.
    """
    if not problems_train or not problems_test:
        raise ValueError("guess_baseline needs non-empty train and test problems")
    counts = Counter(p.answer for p in problems_train)
    n = len(problems_train)
    return sum(1.0 - (1.0 - counts[p.answer] / n) ** k for p in problems_test) / len(problems_test)


def last_integer(text: str) -> int | None:
    """The last integer written in `text` ("= 228", "The answer is -5." ...), None if none."""
    found = _LAST_INT.findall(text)
    return int(found[-1]) if found else None


class ArithTask:
    """The `Task` for generated arithmetic (see the module docstring)."""

    name = "arith"

    def __init__(self, cfg: TaskConfig):
        if cfg.difficulty < 1:
            raise ConfigError(
                f"task.difficulty must be >= 1 (operations per problem), got {cfg.difficulty}"
            )
        if cfg.max_operand < 1 or cfg.max_first_operand < 1:
            raise ConfigError(f"task.max_operand and task.max_first_operand must be >= 1, got "
                              f"{cfg.max_operand} and {cfg.max_first_operand}")
        self.difficulty = cfg.difficulty
        self.max_operand = cfg.max_operand
        self.max_first_operand = cfg.max_first_operand
        self.seed = cfg.seed
        self.n_train = cfg.n_train or DEFAULT_N_TRAIN
        self.n_test = cfg.n_test or DEFAULT_N_TEST
        self._test: list[Problem] | None = None
        self._test_keys: set[tuple[tuple[int, ...], tuple[str, ...]]] = set()
        self._train: list[Problem] = []
        self._train_specs: Iterator[tuple[list[int], tuple[str, ...]]] | None = None

    def _specs(self, split: str) -> Iterator[tuple[list[int], tuple[str, ...]]]:
        """The split's stream of (operands, ops), from a seed of its own."""
        # str seeds are hashed with SHA-512 by `random`: stable across processes and platforms
        rng = random.Random(f"arith/{self.seed}/{self.difficulty}/{self.max_operand}/"
                            f"{self.max_first_operand}/{split}")
        return _random_specs(rng, self.difficulty, self.max_operand, self.max_first_operand)

    def _test_split(self) -> list[Problem]:
        if self._test is None:
            # (operands, ops) determines the expression and back: the key of a problem
            self._test_keys = set()
            test: list[Problem] = []
            # the problem space can be small (difficulty 1, small operands): give up, don't hang
            max_draws = 100 * self.n_test + 10_000
            for draws, (operands, ops) in enumerate(self._specs("test")):
                if draws >= max_draws:
                    raise ConfigError(
                        f"arith: only {len(test)} distinct test problems found for n_test="
                        f"{self.n_test} (difficulty {self.difficulty}, max_operand "
                        f"{self.max_operand}, max_first_operand {self.max_first_operand}); lower "
                        f"task.n_test or widen the problem space"
                    )
                key = (tuple(operands), ops)
                if key not in self._test_keys:
                    self._test_keys.add(key)
                    test.append(make_problem(operands, ops, id=f"arith-test-{len(test)}"))
                    if len(test) == self.n_test:
                        break
            self._test = test
        return self._test

    def _train_prefix(self, n: int) -> list[Problem]:
        if self._train_specs is None:
            self._test_split()
            self._train_specs = self._specs("train")
        train, held_out = self._train, self._test_keys
        while len(train) < n:
            operands, ops = next(self._train_specs)
            if (tuple(operands), ops) not in held_out:
                train.append(make_problem(operands, ops, id=f"arith-train-{len(train)}"))
        return train[:n]

    def problems(self, split: str, n: int = 0) -> list[Problem]:
        """The first n problems of "train" (any n; 0: n_train) or "test" (n <= n_test; 0: all).

        A prefix is stable: problems("train", 100) == problems("train", 1000)[:100].
        """
        if split == "test":
            if n > self.n_test:
                raise ConfigError(
                    f"arith: asked for {n} test problems; the split has task.n_test={self.n_test}"
                )
            return self._test_split()[: n or self.n_test]
        if split == "train":
            return self._train_prefix(n or self.n_train)
        raise ValueError(f"arith has splits 'train' and 'test', not {split!r}")

    def grade(self, problem: Problem, response: str) -> bool:
        """Exact match of the last integer in the response with the gold answer."""
        got = last_integer(response)
        return got is not None and got == int(problem.answer)

    def corpus(self, n: int, seed: int = 0) -> list[str]:
        """n plain-text documents for pretraining a base model on this world's arithmetic.

        A document is FACTS_PER_DOCUMENT lines, each one step fact in the traces' notation
        ("82*30=2460", "656+2460=3116"), drawn from the traces of problems of a stream of its
        own and shuffled across problems. The base model thus learns the facts and the notation
        with the frequencies the task needs, but sees no chat markup, no question, and no chain
        from a question to its answer: how to chain steps is what post-training teaches.
        """
        rng = random.Random(f"arith-corpus/{seed}/{self.difficulty}/{self.max_operand}/"
                            f"{self.max_first_operand}")
        specs = _random_specs(rng, self.difficulty, self.max_operand, self.max_first_operand)
        facts: list[str] = []
        need = n * FACTS_PER_DOCUMENT
        while len(facts) < need:
            facts.extend(make_problem(*next(specs)).reasoning.split("\n"))
        del facts[need:]
        rng.shuffle(facts)
        return [
            "\n".join(facts[i : i + FACTS_PER_DOCUMENT]) for i in range(0, need, FACTS_PER_DOCUMENT)
        ]
