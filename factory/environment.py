"""What a run ran on, saved as `env.json` in its run directory (the report prints it): package
versions, Python, platform, device, torch threads, the git revision of this tree (and whether it
had uncommitted changes), and the start time. Reproducing a number starts here."""

from __future__ import annotations

import datetime
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = ("torch", "transformers", "accelerate", "datasets", "hydra-core", "liger-kernel",
            "compact-factory")
REPO = Path(__file__).resolve().parents[1]


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                             timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None  # not a git checkout (an installed wheel), or git missing
    return out.stdout.strip()


def environment() -> dict:
    env = {pkg: _version(pkg) for pkg in PACKAGES}
    env["python"] = platform.python_version()
    env["platform"] = platform.platform()
    env["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    env["torch_threads"] = torch.get_num_threads()
    revision = _git("rev-parse", "HEAD")
    if revision:
        env["git_revision"] = revision
        env["git_dirty"] = bool(_git("status", "--porcelain", "--untracked-files=no"))
    env["started"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return env
