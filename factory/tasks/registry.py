"""Task cards to Task objects: `build_task(cfg.task)` is the one way stages get a task."""

from __future__ import annotations

from factory.errors import ConfigError
from factory.tasks import Task


def build_task(task_cfg) -> Task:
    kind = task_cfg.kind
    if kind == "arith":
        from factory.tasks.arith import ArithTask

        return ArithTask(task_cfg)
    raise ConfigError(f"task {task_cfg.name!r} has kind {kind!r}, which no task implements; "
                      f"valid kinds: arith")
