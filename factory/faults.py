"""A test hook: SIGKILL the run at a named point, to prove a killed run loses nothing.

    FACTORY_KILL_AT=<stage>:<point>[:<n>] python -m factory.run ...

kills the run (a real SIGKILL: no handler, no cleanup, no flush of anything unwritten) the
n-th time (default: the first) `point(<point>)` is reached while the pipeline builds `<stage>`,
or `point(<point>, stage=<stage>)` is called outside a stage. Unset, every call is a dictionary
lookup and returns. tests/integration/test_kill_resume.py kills `python -m factory.run` at each
point and reruns it.

The points, in the order a run reaches them:

    <stage>:built        the stage's files are all in its temporary directory, unpublished
                         (factory/pipeline.py)
    <stage>:published    the artifact is renamed into place, the ledger not yet written
    <stage>:checkpoint   the training loop has just published a checkpoint (factory/loop.py)
    <stage>:shard        the logit cache writer has just renamed a shard into place, before
                         its manifest (teachers/cache.py)
    report:md            the report's Markdown is written, its HTML not yet (reports/build.py)
"""

from __future__ import annotations

import os
import signal
import sys

ENV = "FACTORY_KILL_AT"

_current_stage = ""  # the stage the pipeline is building ("" between stages)
_hits: dict[str, int] = {}
# in the background worker (factory/background.py): the main process, killed first, so the
# point kills the whole run wherever the stage was being built
run_process: int | None = None


def enter_stage(name: str) -> None:
    """Called by the pipeline when it starts building a stage (names the points inside it)."""
    global _current_stage
    _current_stage = name


def point(name: str, stage: str | None = None) -> None:
    """Kill this process here if FACTORY_KILL_AT names this point (module docstring)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    where = f"{_current_stage if stage is None else stage}:{name}"
    want, _, nth = spec.rpartition(":") if spec.count(":") >= 2 else (spec, "", "1")
    if where != want:
        return
    _hits[where] = _hits.get(where, 0) + 1
    if _hits[where] == int(nth):
        sys.stdout.flush()
        sys.stderr.flush()
        if run_process is not None:
            os.kill(run_process, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
