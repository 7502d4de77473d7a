"""What a run ran on, saved as `env.json` in its run directory (the report prints it): package
versions, Python, platform, device, torch threads, the git revision of this tree (and whether it
had uncommitted changes), and the start time. Reproducing a number starts here."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = ("torch", "transformers", "accelerate", "datasets", "hydra-core", "liger-kernel",
            "compact-factory")
REPO = Path(__file__).resolve().parents[1]


def cpu_threads(requested: int, processes: int = 1) -> int | None:
    """torch's intra-op threads for `trainer.num_threads`: n > 0 as given; 0 every core (None:
    leave torch's default); -1 ("auto") the cores this process's share of the machine leaves
    idle by the 1-minute load average, at least 1. Measured here (docs/benchmarks.md): on an
    idle 2-core machine two threads train the tiny teacher 1.6x faster than one, but with
    another busy process they make single ops up to 250x slower, so auto backs off to one
    thread when the other core is taken."""
    if requested > 0:
        return requested
    if requested == 0:
        return None
    if requested != -1:
        raise ValueError(f"trainer.num_threads must be -1 (auto), 0 (all cores) or a positive "
                         f"count, got {requested}")
    cores = available_cores()
    idle = int(cores - os.getloadavg()[0] + 0.5)
    return max(1, min(idle, cores) // max(processes, 1))


def available_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cores or 1


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


def cpu_model() -> str:
    """The processor's model name (Linux: /proc/cpuinfo), else what `platform` knows. Recorded
    because a CPU run's speed, and with a different vector unit its float rounding (so the tiny
    world's numbers), follow the host processor."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    env = {pkg: _version(pkg) for pkg in PACKAGES}
    env["python"] = platform.python_version()
    env["platform"] = platform.platform()
    env["cpu"] = cpu_model()
    env["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    env["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    env["torch_threads"] = torch.get_num_threads()
    revision = _git("rev-parse", "HEAD")
    if revision:
        env["git_revision"] = revision
        env["git_dirty"] = bool(_git("status", "--porcelain", "--untracked-files=no"))
    env["started"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return env
