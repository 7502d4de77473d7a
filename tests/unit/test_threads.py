"""`trainer.num_threads`: a count as given, 0 torch's default (every core), -1 the idle cores."""

import os

import pytest

from factory.environment import cpu_threads


def test_explicit_and_all_cores():
    assert cpu_threads(3) == 3
    assert cpu_threads(0) is None


def test_auto_is_within_the_cores_and_backs_off_with_load():
    cores = len(os.sched_getaffinity(0))
    expected = lambda: max(1, min(int(cores - os.getloadavg()[0] + 0.5), cores))  # noqa: E731
    before = expected()
    got = cpu_threads(-1)
    assert 1 <= got <= cores
    assert got in {before, expected()}  # the load average moves every 5 s
    assert cpu_threads(-1, processes=cores * 2) == 1  # each process's share, at least one


def test_other_negative_values_are_refused():
    with pytest.raises(ValueError, match="num_threads"):
        cpu_threads(-2)
