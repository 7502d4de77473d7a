"""The README's real-scale rung as written: `python -m factory.run experiment=qwen3-8b-table21
dry_run=true` prints every line the README quotes (so the README cannot drift from the code),
writes dry_run.json and no report, and touches no artifact store."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
COMMAND = "python -m factory.run experiment=qwen3-8b-table21 dry_run=true"


def readme_block() -> list[str]:
    """The output block quoted under the README's "Real scale" heading."""
    section = (REPO / "README.md").read_text().split("## Real scale", 1)[1].split("\n## ", 1)[0]
    assert COMMAND in section, "the README no longer shows the dry-run command"
    blocks, lang, lines = [], None, []
    for line in section.splitlines():
        if line.startswith("```"):
            if lang is None:
                lang, lines = line[3:].strip(), []
            else:
                blocks.append((lang, lines))
                lang = None
        elif lang is not None:
            lines.append(line)
    output = [lines for lang, lines in blocks if not lang]  # untagged fences: printed output
    assert output, "the README's Real scale section quotes no output"
    return [line for line in output[0] if line.strip()]


def test_the_readme_dry_run_prints_what_the_readme_says(tmp_path):
    done = subprocess.run(
        [sys.executable, *COMMAND.split()[1:], f"hydra.run.dir={tmp_path / 'run'}",
         f"artifacts_dir={tmp_path / 'store'}"],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = done.stdout.splitlines()
    missing = [line for line in readme_block() if line not in printed]
    assert not missing, f"README lines the dry run no longer prints: {missing}"
    saved = json.loads((tmp_path / "run" / "dry_run.json").read_text())
    assert f"projected H100-hours in total: {saved['total']['h100_hours']:.1f}" in printed
    assert not (tmp_path / "store").exists()
    assert not (tmp_path / "run" / "report.md").exists()  # the callback skips dry runs
