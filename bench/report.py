"""What every benchmark does with its result: print it and append it to docs/benchmarks.md."""

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
