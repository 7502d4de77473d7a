"""bench/bench_losses.py at toy sizes: a sweep writes one section per size, every variant's loss
agrees with the plain path's, and each fused variant gets its verdict lines."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_sweep_prints_a_table_and_verdicts_per_size():
    proc = subprocess.run(
        [sys.executable, "bench/bench_losses.py", "--tokens", "48,96", "--hidden", "16",
         "--vocab", "512", "--k", "8", "--chunk-sizes", "32,0", "--rounds", "1", "--threads", "1",
         "--no-doc"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    block = proc.stdout[proc.stdout.index("### "):]
    assert "tokens 48,96 x hidden 16, vocab 512, k 8, fp32, cpu" in block
    sections = re.split(r"^#### ", block, flags=re.M)[1:]
    assert [s.splitlines()[0] for s in sections] == ["48 tokens x hidden 16",
                                                    "96 tokens x hidden 16"]
    for section in sections:
        rows = {m[0]: float(m[1]) for m in re.findall(
            r"^\| (plain|fused@32|fused@auto|liger-jsd) \|.*\| ([0-9.]+) \|$", section, flags=re.M)}
        assert set(rows) == {"plain", "fused@32", "fused@auto", "liger-jsd"}
        for fused in ("fused@32", "fused@auto"):  # auto: chunk_size=0, the factory's default
            assert abs(rows[fused] - rows["plain"]) <= 1e-4 * abs(rows["plain"])
            verdict = next(line for line in section.splitlines()
                           if line.startswith(f"- {fused}:"))
            assert re.search(r"memory [0-9.]+ of plain \(target <= 0\.125\): (met|NOT met)",
                             verdict)
            assert re.search(
                r"Time [0-9.]+x liger's fused JSD \(target <= 1\.2x\): (met|NOT met)", verdict)
