"""Tasks: prompts, gold answers and a verifier, behind one small interface.

A task hands out `Problem`s by split and grades a response (the assistant's visible answer, the
text after the think block). Training stages, the teacher bank and evaluation see only this.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Problem:
    id: str
    prompt: str  # the user message, without mode flags or chat markup
    answer: str  # gold answer as text
    reasoning: str | None = None  # a verified chain of thought, where the task has one
    tests: str | None = None  # code tasks: the test program
    entry_point: str | None = None  # code tasks: the function under test
    meta: dict = field(default_factory=dict, compare=False, hash=False)


class Task(Protocol):
    name: str

    def problems(self, split: str, n: int = 0) -> list[Problem]:
        """The first n problems of a split ("train" or "test"; n = 0: all), deterministic."""

    def grade(self, problem: Problem, response: str) -> bool:
        """Whether `response` (the answer text after the think block) solves `problem`."""
