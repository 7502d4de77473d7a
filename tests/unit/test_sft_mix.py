"""The bootstrap SFT's mode mix: `think_ratio` of the examples in /think, spread evenly."""

import pytest

from factory.stages.models import mode_schedule

MODES = ("think", "no_think")


def test_no_ratio_alternates_and_half_is_the_same_alternation():
    assert mode_schedule(6, MODES) == ["think", "no_think"] * 3
    assert mode_schedule(6, MODES, 0.5) == mode_schedule(6, MODES)


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.75, 0.9, 1.0])
def test_ratio_is_exact_over_whole_periods_and_spread(ratio):
    got = mode_schedule(400, MODES, ratio)
    assert got.count("think") == round(400 * ratio)
    if 0 < ratio < 1:  # never more than ceil(1/(1-r)) thinks in a row
        run, longest = 0, 0
        for m in got:
            run = run + 1 if m == "think" else 0
            longest = max(longest, run)
        assert longest <= -(-1 // (1 - ratio)) + 1


def test_ratio_outside_unit_interval_is_refused():
    with pytest.raises(ValueError, match="think_ratio"):
        mode_schedule(4, MODES, 1.5)
