"""A training process SIGKILLed mid-run resumes from its checkpoint to the uninterrupted result."""

from __future__ import annotations

import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
STEPS, CHECKPOINT_EVERY = 30, 3

SCRIPT = f'''
"""Train a tiny Qwen3 for {STEPS} steps in work_dir; write the weights and the TrainResult."""
import dataclasses, json, sys, time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import Qwen3Config, Qwen3ForCausalLM

from factory.config import TrainerConfig
from factory.loop import StepOutput, train

VOCAB, SEQ, BATCH, ACCUM = 128, 12, 4, 2


def micro_step(model, step, micro):
    time.sleep(0.03)  # slow enough for the test to kill the run between checkpoints
    tokens_bt = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(step))
    x_bt = tokens_bt[micro * BATCH // ACCUM : (micro + 1) * BATCH // ACCUM]
    logits_btv = model(input_ids=x_bt).logits[:, :-1]
    loss = F.cross_entropy(logits_btv.reshape(-1, VOCAB), x_bt[:, 1:].reshape(-1), reduction="sum")
    return StepOutput(loss / (BATCH * (SEQ - 1)), x_bt.numel(), {{}})


def main(work_dir, out):
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, intermediate_size=64))
    cfg = TrainerConfig(num_threads=1, progress=False, checkpoint_every={CHECKPOINT_EVERY})
    result = train(model, micro_step, stage="sft", steps={STEPS}, lr=1e-2, warmup_ratio=0.1,
                   grad_accum=ACCUM, trainer_cfg=cfg, work_dir=Path(work_dir))
    save_file({{k: v.contiguous() for k, v in model.state_dict().items()}}, out)
    return dataclasses.asdict(result)


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
'''


def completed_step(ckpt: Path) -> int:
    return torch.load(ckpt / "custom_checkpoint_0.pkl", weights_only=False)["step"]


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    script = tmp_path / "train_tiny.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    work = tmp_path / "work"
    ckpt = work / "checkpoint"

    cmd = [sys.executable, str(script), str(work), str(tmp_path / "resumed.safetensors")]
    victim = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not ckpt.exists():
        assert victim.poll() is None, victim.communicate()[1].decode()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL
    killed_at = completed_step(ckpt)
    assert 0 < killed_at < STEPS

    # a checkpoint write killed half-way: a temp dir claiming a later step, with a broken model
    leftover = work / "checkpoint.tmp"
    leftover.mkdir(exist_ok=True)
    (leftover / "model.safetensors").write_bytes(b"\0" * 100)
    torch.save({"step": STEPS - 1}, leftover / "custom_checkpoint_0.pkl")

    # the rerun and the uninterrupted reference run in this process (one interpreter start
    # less): the same script, seed and thread count; the rerun reads everything from disk
    main = runpy.run_path(str(script))["main"]
    resumed = main(work, str(tmp_path / "resumed.safetensors"))
    assert resumed["resumed_from"] == killed_at > 0
    assert resumed["steps"] == STEPS
    assert not leftover.exists()

    reference = main(tmp_path / "fresh", str(tmp_path / "fresh.safetensors"))
    assert reference["resumed_from"] == 0
    assert resumed["tokens"] == reference["tokens"]
    assert resumed["final_metrics"] == reference["final_metrics"]
    got = load_file(tmp_path / "resumed.safetensors")
    want = load_file(tmp_path / "fresh.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
