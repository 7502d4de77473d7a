"""Kill anywhere, lose nothing; the same seed gives the same numbers (issue 9, items 1, 2 and 5).

`python -m factory.run` (a real process, the smallest compare sizes) is SIGKILLed at one point
after another -- teacher generation, cache writing, two training stages, an eval, the report --
through the FACTORY_KILL_AT hook (factory/faults.py: a real SIGKILL at a named point, so no
timing race), each rerun continuing in the same store. After every kill no partial artifact is
in the store as complete; every rerun reuses what was complete and resumes the training stage
from its checkpoint; the final numbers equal an uninterrupted run's. Then a corrupted model in
that store is refused by the CLI with a message, not a stack trace.

The uninterrupted reference runs in this process (`run`, one process) and again as a subprocess
into another store on two lanes (the worker training too, factory/background.py): the two must
agree to the last bit (metrics.jsonl losses, eval Pass@k), and the run
directory must hold the resolved config, the environment with the git revision, and a report
printing it.

Cost on a 2-core machine: three runs' compute (~20 s each at these sizes) plus nine interpreter
starts (~8 s each).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from factory.inspect import compose
from factory.run import run
from factory.store import MANIFEST, Store, read_manifest
from tiny_sizes import COMPARE_TINY

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]

REPO = Path(__file__).resolve().parents[2]
# checkpoint every step, so a kill after step 1 resumes from it; small shards, so a kill between
# shards leaves some written; every step's loss logged, to compare them all; one eval mode
# (eval is half of a tiny run's compute); evals in the background worker, as by default, so
# kills also land while it runs (and must not leave it behind)
# The killed runs train in the main process in plan order (the worker only evaluates), so each
# rerun finishes the stage the run before it left; the eval is killed with no worker, after the
# training, for the same reason (tests/integration/test_background_evals.py kills a stage in the
# worker). The uninterrupted reference runs in one process, the same-seed run on two lanes: the
# numbers must not depend on the lanes.
OVERRIDES = COMPARE_TINY + ["trainer.checkpoint_every=1", "trainer.log_every=1",
                            "pipeline.cache.shard_tokens=64", "pipeline.eval.modes=[think]",
                            "pipeline.eval.background=true", "pipeline.background_training=false"]
LANES = ("pipeline.background_training=true",)

# (FACTORY_KILL_AT, the stage it interrupts, what the kill leaves behind, extra overrides), in
# the plan's order
KILLS = [
    ("teacher/generate:built", "teacher/generate", "unpublished", ()),
    ("teacher/record:shard:2", "teacher/record", "shards", ()),
    ("distill/off_policy:checkpoint:1", "distill/off_policy", "checkpoint", ()),
    ("four_stage/reasoning_rl:checkpoint:1", "four_stage/reasoning_rl", "checkpoint", ()),
    ("eval/off_policy/think:built", "eval/off_policy/think", "unpublished",
     ("pipeline.eval.background=false",)),
    ("report:md", None, "report", ()),
]


def factory_run(store: Path, run_dir: Path, kill_at: str | None = None,
                extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    env.pop("FACTORY_KILL_AT", None)
    if kill_at:
        env["FACTORY_KILL_AT"] = kill_at
    cmd = [sys.executable, "-m", "factory.run", *OVERRIDES, *extra, f"artifacts_dir={store}",
           f"hydra.run.dir={run_dir}"]
    return subprocess.run(cmd, env=env, cwd=run_dir.parent, capture_output=True, text=True,
                          timeout=600)


def numbers(summary: dict) -> dict:
    """What a run measured (Pass@k, ThinkFollow, lengths per model and mode, the guessing
    baseline), as summary.json holds it; not its wall times."""
    return json.loads(json.dumps({k: summary[k] for k in ("models", "guess_baseline")}))


def ledger(run_dir: Path) -> dict[str, dict]:
    return {e["stage"]: e for e in json.loads((run_dir / "ledger.json").read_text())["stages"]}


def losses(*run_dirs: Path) -> dict[tuple[str, int], float]:
    """(stage, step) -> loss over the runs' metrics.jsonl, the last line winning, and the
    worker's lines a killed run had not yet copied into it (.background/<stage>/)."""
    out = {}
    for d in run_dirs:
        for path in [d / "metrics.jsonl", *sorted(d.glob(".background/*/metrics.jsonl"))]:
            for line in path.read_text().splitlines() if path.exists() else []:
                row = json.loads(line)
                out[(row["stage"], row["step"])] = row["loss"]
    return out


def published(store: Path) -> list[Path]:
    return [p for p in store.glob("*/*") if p.is_dir() and not p.parent.name.startswith(".")
            and not p.name.startswith(".")]


def assert_store_consistent(store: Path) -> None:
    """Every directory at an artifact's place is complete: its manifest reads and every file
    matches its checksum. Anything partial is under a temporary name."""
    s = Store(store)
    for path in published(store):
        s.verify(s.get(path.parent.name, path.name))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, in this process."""
    root = tmp_path_factory.mktemp("reference")
    cfg = compose(OVERRIDES + [f"artifacts_dir={root / 'store'}", "pipeline.eval.background=false"])
    summary = run(cfg, root / "run")
    return {"dir": root / "run", "numbers": numbers(summary), "losses": losses(root / "run")}


def test_same_seed_same_numbers_and_the_run_records_how_it_was_made(reference, tmp_path):
    run_dir = tmp_path / "run"
    done = factory_run(tmp_path / "store", run_dir, extra=LANES)  # the reference: one lane
    assert done.returncode == 0, done.stderr[-3000:]
    assert "building in the background" in done.stdout + done.stderr  # training on both lanes
    assert numbers(json.loads((run_dir / "summary.json").read_text())) == reference["numbers"]
    assert losses(run_dir) == reference["losses"]
    assert len(reference["losses"]) >= 20  # every step of every training stage

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["seed"] == 0 and config["artifacts_dir"] == str(tmp_path / "store")
    assert config["trainer"]["on_nonfinite"] == "stop"  # resolved: schema defaults included
    env = json.loads((run_dir / "env.json").read_text())
    for package in ("torch", "transformers", "accelerate", "hydra-core"):
        assert env[package] and env[package] != "not installed"
    report = (run_dir / "report.md").read_text()
    if (REPO / ".git").exists():
        revision = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                  text=True, check=True).stdout.strip()
        assert env["git_revision"] == revision and revision in report
    assert env["torch"] in report and "transformers" in report


def test_kill_anywhere_lose_nothing(reference, tmp_path):
    store = tmp_path / "store"
    runs = []
    resumed = []
    for i, (kill_at, stage, leaves, extra) in enumerate(KILLS):
        run_dir = tmp_path / f"run{i}"
        runs.append(run_dir)
        complete = {str(p) for p in published(store)}
        killed = factory_run(store, run_dir, kill_at, extra)
        assert killed.returncode == -signal.SIGKILL, (kill_at, killed.stderr[-3000:])
        assert_store_consistent(store)
        entries = ledger(run_dir) if (run_dir / "ledger.json").exists() else {}
        # this rerun reused what the runs before finished, rebuilt what they did not
        assert all(e["reused"] == (e["artifact"] in complete) for e in entries.values())
        _, previous, previous_leaves, _ = KILLS[i - 1] if i else (None, None, None, None)
        if i > 0:
            assert entries[previous]["reused"] is False
            if previous_leaves == "checkpoint":
                assert entries[previous]["notes"]["resumed_from"] == 1
                resumed.append(previous)
        if stage is None:
            assert (run_dir / "report.md").exists() and not (run_dir / "report.html").exists()
            continue
        entries = ledger(run_dir)
        assert stage not in entries  # killed before its ledger entry
        kind = {"teacher/generate": "dataset", "teacher/record": "cache"}.get(
            stage, "eval" if stage.startswith("eval/") else "model")
        temporary = list((store / kind).glob(".tmp-*"))
        if leaves == "unpublished":  # every file written, only the rename missing
            assert any((t / "eval.json").exists() or (t / "data").exists() for t in temporary)
            assert not any((t / MANIFEST).exists() for t in temporary)
        if leaves == "shards":  # two shards renamed into place, no cache manifest
            [t] = temporary
            assert len(list(t.glob("shard-*.arrow"))) == 2
            assert not (t / "cache_manifest.json").exists()
        if leaves == "checkpoint":
            [work] = [w for w in (store / ".work").iterdir() if w.is_dir()]  # not lock files
            assert (work / "checkpoint" / "checksums.json").exists()

    assert resumed == ["distill/off_policy", "four_stage/reasoning_rl"]

    final_dir = tmp_path / "final"
    final = factory_run(store, final_dir)
    assert final.returncode == 0, final.stderr[-3000:]
    assert all(e["reused"] for e in ledger(final_dir).values())
    assert (final_dir / "report.html").exists()
    assert numbers(json.loads((final_dir / "summary.json").read_text())) == reference["numbers"]
    assert losses(*runs) == reference["losses"]  # every step, whichever run trained it
    assert_store_consistent(store)
    assert not [p for p in store.glob("*/.tmp-*")]  # reruns cleared the killed writers' dirs
    assert not [w for w in (store / ".work").iterdir() if w.is_dir()]  # no stage left to resume

    # a model corrupted in the store is refused before it is read: message, no stack trace
    entries = ledger(final_dir)
    model = Path(entries["distill/off_policy"]["artifact"])
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    shutil.rmtree(entries["eval/off_policy/think"]["artifact"])  # must be rebuilt from it
    refused = factory_run(store, tmp_path / "corrupt")
    assert refused.returncode == 2
    assert "Traceback" not in refused.stderr
    message = refused.stderr[refused.stderr.index("error: "):]
    assert str(weights) in message and f"delete {model}" in message and "rerun" in message
    assert read_manifest(model)  # the manifest itself is intact: the file is what is refused
