"""What every benchmark does with its result: print it and append it to docs/benchmarks.md."""

import platform
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def publish(section: str, append: bool = True) -> None:
    print(section)
    if not append:
        return
    DOC.parent.mkdir(parents=True, exist_ok=True)
    with open(DOC, "a") as f:
        f.write(("\n" if DOC.exists() and DOC.stat().st_size else "") + section)
    print(f"appended to {DOC}")


def cpu_model() -> str:
    """The CPU's model name, for the machine line of a benchmark table."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
