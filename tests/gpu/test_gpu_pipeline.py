"""The default pipeline (compare) on CUDA at the integration tests' smallest sizes: every stage of
both arms, the teacher bank's data stages and eval run with `trainer=gpu` (bf16 autocast), every
table row is evaluated, and the ledger charges GPU-hours to the card that ran. Skipped without
CUDA. Needs what `python -m factory.run` needs (datasets for the bank's Arrow set).

    python -m pytest -m gpu -q tests/gpu/test_gpu_pipeline.py
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the gpu tier)"),
]

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from tiny_sizes import COMPARE_TINY  # noqa: E402

ROWS = {"teacher", "base", "off_policy", "on_policy", "cold_start", "reasoning_rl", "fusion",
        "general_rl"}


def test_compare_pipeline_runs_every_stage_on_cuda(tmp_path):
    from factory.inspect import compose
    from factory.run import run

    overrides = [o for o in COMPARE_TINY if not o.startswith("trainer.")]
    cfg = compose(overrides + ["trainer=gpu", "trainer.progress=false",
                               f"artifacts_dir={tmp_path / 'store'}"])
    assert cfg.trainer.device == "cuda"
    result = run(cfg, tmp_path / "run")

    assert set(result["models"]) == ROWS
    for label in ROWS:
        for mode in ("think", "no_think"):
            saved = json.loads((tmp_path / "run" / "eval" / f"{label}-{mode}.json").read_text())
            assert saved["pass@1"] == result["models"][label][mode]["pass@1"]
            assert 0.0 <= saved["pass@k"]["1"] <= saved["pass@k"]["4"] <= 1.0, (label, mode)

    ledger = json.loads((tmp_path / "run" / "ledger.json").read_text())
    name = torch.cuda.get_device_name(0)
    trained = [e for e in ledger["stages"] if e["tokens"] > 0]
    assert trained, ledger
    for entry in trained:
        assert entry["device"] == name and entry["device_hours"] > 0, entry
        assert math.isfinite(entry["flops"]) and entry["flops"] > 0, entry
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses and all(math.isfinite(v) for v in losses)
