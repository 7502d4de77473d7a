"""Task cards to Task objects: `build_task(cfg.task)` is the one way stages get a task.

Kinds: arith (the tiny world's generated arithmetic, factory/tasks/arith.py), math and code
(benchmarks from the hub or a local JSON-lines file, factory/tasks/benchmarks.py).
"""

from __future__ import annotations

from factory.errors import ConfigError
from factory.tasks import Task

KINDS = ("arith", "math", "code")


def build_task(task_cfg) -> Task:
    kind = task_cfg.kind
    if kind == "arith":
        from factory.tasks.arith import ArithTask

        return ArithTask(task_cfg)
    if kind == "math":
        from factory.tasks.benchmarks import MathTask

        return MathTask(task_cfg)
    if kind == "code":
        from factory.tasks.benchmarks import CodeTask

        return CodeTask(task_cfg)
    raise ConfigError(f"task {task_cfg.name!r} has kind {kind!r}, which no task implements; "
                      f"valid kinds: {', '.join(KINDS)}")
