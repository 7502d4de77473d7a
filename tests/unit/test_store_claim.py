"""Processes sharing a store make each artifact once: `Store.claim` serialises the makers of one
key (a real second process holds the lock), and a recipe knob that only the SFT reads does not
remake the pretrained model (the card's `bootstrap` section is not a stage input)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

from factory.inspect import compose
from factory.pipeline import stage_key
from factory.plan import build_plan
from factory.store import Store

REPO = Path(__file__).resolve().parents[2]


def test_claim_waits_for_the_process_making_the_same_artifact(tmp_path):
    held = tmp_path / "held"
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import pathlib, time, sys
        sys.path.insert(0, {str(REPO)!r})
        from factory.store import Store
        with Store({str(tmp_path / 'store')!r}).claim("model", "abc"):
            pathlib.Path({str(held)!r}).write_text(str(time.time()))
            time.sleep(1.5)
            pathlib.Path({str(held)!r}).write_text("released " + str(time.time()))
    """)])
    try:
        deadline = time.time() + 30
        while not held.exists() and time.time() < deadline:
            time.sleep(0.02)
        assert held.exists(), "the child never took the lock"
        store = Store(tmp_path / "store")
        with store.claim("model", "abc"):
            # the child had released before this process got in
            assert held.read_text().startswith("released")
        with store.claim("model", "other"):  # another key is not blocked
            pass
    finally:
        child.wait(timeout=30)
    assert child.returncode == 0


def test_claim_without_hold_takes_no_lock(tmp_path):
    store = Store(tmp_path / "store")
    with store.claim("model", "k"):
        with store.claim("model", "k", hold=False):  # would deadlock if it locked
            pass


def _keys(overrides):
    plan = build_plan(compose(["pipeline=bootstrap", *overrides]))
    stages = {s.name: s for s in plan.stages}
    pre = stage_key(stages["teacher/pretrain"], {})
    sft = stage_key(stages["teacher/sft"], {"teacher/pretrain": pre})
    return pre, sft


def test_an_sft_knob_keeps_the_pretrained_teacher():
    pre, sft = _keys([])
    pre2, sft2 = _keys(["teacher.bootstrap.sft_steps=7", "teacher.bootstrap.think_ratio=0.75"])
    assert pre2 == pre and sft2 != sft
    pre3, _ = _keys(["teacher.bootstrap.pretrain_steps=7"])
    assert pre3 != pre


def test_the_lock_file_goes_once_the_artifact_is_published(tmp_path):
    store = Store(tmp_path / "store")
    lock = tmp_path / "store" / ".work" / "model-k.lock"
    with store.claim("model", "k"):
        assert lock.exists()
    assert lock.exists()  # nothing published: the next maker needs it
    with store.claim("model", "k"):
        store.path("model", "k").mkdir(parents=True)
    assert not lock.exists()
