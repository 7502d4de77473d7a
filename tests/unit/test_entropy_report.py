"""The entropy-control experiment's summary (scripts/entropy_control.py): band occupancy of single
steps and of the trailing mean that estimates the policy's entropy."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

_SPEC = importlib.util.spec_from_file_location(
    "entropy_control", Path(__file__).resolve().parents[2] / "scripts" / "entropy_control.py")
entropy_control = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(entropy_control)


def test_trailing_mean_by_hand():
    assert entropy_control.trailing_mean([1.0, 3.0, 5.0, 7.0], window=2) == [1.0, 2.0, 4.0, 6.0]
    assert entropy_control.trailing_mean([2.0, 4.0, 9.0], window=5) == [2.0, 3.0, 5.0]
    assert entropy_control.trailing_mean([]) == []


def test_summary_counts_single_steps_and_the_trailing_mean():
    # a noisy run around the floor: every other step dips out, the 2-step mean never does
    ent = [0.09, 0.07, 0.09, 0.07, 0.09, 0.07]
    rows = [{"step": i, "entropy": e, "accuracy": 0.5, "entropy_coef": 0.1}
            for i, e in enumerate(ent)]
    s = entropy_control.summary(rows, 0.075, 0.2, window=2)
    assert entropy_control.summary(rows, 0.075, 0.2, window=1)["smooth_in_band"] == 0.5
    assert s["in_band"] == pytest.approx(0.5)
    assert s["smooth_in_band"] == pytest.approx(1.0)
    assert s["coef_last"] == 0.1 and s["accuracy_last"] == 0.5
