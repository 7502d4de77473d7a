"""`pipeline=compare` end to end at the smallest sizes: the teacher bank's data stages, both arms
from one base student, every table row evaluated, teacher-side cost flagged in the ledger, and a
rerun that reuses every artifact. (The default-size run is tests/integration/test_default_run_slow.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from factory.inspect import compose
from factory.run import run
from tiny_sizes import COMPARE_TINY as TINY

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]

ROWS = {"teacher", "base", "off_policy", "on_policy", "cold_start", "reasoning_rl", "fusion",
        "general_rl"}


def test_compare_trains_both_arms_from_one_base_and_reuses_everything(tmp_path):
    cfg = compose(TINY + [f"artifacts_dir={tmp_path / 'store'}"])
    first = run(cfg, tmp_path / "run1")
    assert set(first["models"]) == ROWS
    for label in ROWS:
        for mode in ("think", "no_think"):
            row = first["models"][label][mode]
            saved = json.loads((tmp_path / "run1" / "eval" / f"{label}-{mode}.json").read_text())
            assert saved["pass@1"] == row["pass@1"] and len(saved["per_problem"]) == 4

    ledger = json.loads((tmp_path / "run1" / "ledger.json").read_text())
    stages = {e["stage"]: e for e in ledger["stages"]}
    # the bank's data is teacher-side cost charged to the distillation arm
    for name in ("teacher/generate", "teacher/record"):
        assert stages[name]["teacher_side"] and stages[name]["arm"] == "distill"
        assert stages[name]["tokens"] > 0 and stages[name]["flops"] > 0
    assert not any(e["teacher_side"] for n, e in stages.items()
                   if n not in ("teacher/generate", "teacher/record"))
    assert {stages[n]["arm"] for n in ("distill/off_policy", "distill/on_policy")} == {"distill"}
    assert {e["arm"] for n, e in stages.items() if n.startswith("four_stage/")} == {"four_stage"}
    # both arms start from the one base student
    base_key = Path(stages["student/base"]["artifact"]).name
    for name in ("distill/off_policy", "four_stage/cold_start"):
        manifest = json.loads((Path(stages[name]["artifact"]) / "manifest.json").read_text())
        assert manifest["inputs"]["upstream"]["student/base"] == base_key

    provenance = json.loads(
        (Path(stages["teacher/generate"]["artifact"]) / "provenance.json").read_text())
    assert provenance["rejection_sampling"] is False  # the arm gets the teacher, not answers
    assert set(provenance["counts"]) == {"think", "no_think"}
    env = json.loads((tmp_path / "run1" / "env.json").read_text())
    assert env["torch"] and env["python"]

    second = run(cfg, tmp_path / "run2")
    ledger2 = json.loads((tmp_path / "run2" / "ledger.json").read_text())
    assert all(e["reused"] for e in ledger2["stages"])
    assert second["models"] == first["models"]
