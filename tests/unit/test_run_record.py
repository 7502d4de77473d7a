"""What a run records about how it was made (issue 9, item 5): env.json holds the package
versions and the git revision (factory/environment.py), and the report prints the revision,
marked when the tree had uncommitted changes. The end-to-end check (a real run's config.yaml,
env.json and report.md): tests/integration/test_kill_resume.py."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from factory.environment import REPO, environment
from factory.ledger import Ledger, LedgerEntry
from reports.build import build_run

pytestmark = pytest.mark.unit


def test_environment_records_versions_and_the_git_revision():
    env = environment()
    for package in ("torch", "transformers", "accelerate", "datasets", "hydra-core"):
        assert env[package] != "not installed"
    if (REPO / ".git").exists():
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
        assert env["git_revision"] == head and isinstance(env["git_dirty"], bool)
    # the host processor: a CPU run's speed and float rounding follow it
    if Path("/proc/cpuinfo").is_file() and "model name" in Path("/proc/cpuinfo").read_text():
        assert f": {env['cpu']}\n" in Path("/proc/cpuinfo").read_text()
    assert env["cpu"] and env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


@pytest.mark.parametrize("dirty,shown", [(False, "| git revision | 0123abc |"),
                                         (True, "| git revision | 0123abc (with uncommitted "
                                                "changes) |")])
def test_the_report_prints_the_recorded_revision(tmp_path, dirty, shown):
    Ledger(tmp_path).add(LedgerEntry(stage="student/base", arm="base", teacher_side=False,
                                     artifact="/store/model/x", reused=False, device="cpu",
                                     device_count=1, wall_s=1.0, device_hours=1 / 3600,
                                     tokens=10, flops=1.0))
    (tmp_path / "env.json").write_text(json.dumps({"torch": "2.13.0", "git_dirty": dirty,
                                                   "git_revision": "0123abc"}))
    report = build_run(tmp_path).read_text()
    assert shown in report.replace("`", "")
