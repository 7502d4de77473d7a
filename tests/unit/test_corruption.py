"""Corruption is refused, naming the file and the fix, never read (issue 9, item 2).

Real files throughout: a tiny Qwen3 written by the project's own save_model into the store and
into a training checkpoint, then truncated or bit-flipped on disk. (The logit cache's shards and
manifest: tests/unit/test_logit_cache.py, test_bit_flipped_shard_is_refused_naming_the_file and
its neighbours.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from factory.config import TrainerConfig
from factory.errors import ArtifactError
from factory.ledger import StageCost
from factory.loop import StepOutput, save_model, train
from factory.models import load_model
from factory.pipeline import Pipeline, Stage
from factory.store import MANIFEST, Store, _HOST

from tiny_lm import VOCAB, tiny_model

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]


def flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def fix_names(message: str, file: Path, artifact: Path) -> bool:
    return str(file) in message and f"delete {artifact}" in message and "rerun" in message


@pytest.fixture
def model_pipeline(tmp_path):
    """A two-stage pipeline: `student` stores a model, `eval` loads it. Returns (run, calls):
    run() runs both stages in a fresh Pipeline on the same store."""
    calls = []

    def make_model(ctx):
        save_model(tiny_model(), None, ctx.out)
        return StageCost()

    def read_model(ctx):
        calls.append(ctx.name)
        load_model(ctx.upstream["student"], None, dtype="float32")
        (ctx.out / "eval.json").write_text("{}")
        return StageCost()

    def run_both(n: int = 1):
        pipeline = Pipeline(Store(tmp_path / "store"), tmp_path / f"run{n}")
        model = pipeline.run(Stage("student", "model", {"v": 1}, make_model))
        pipeline.run(Stage("eval", "eval", {"n": n}, read_model, needs=["student"]))
        return model

    return run_both, calls


def test_a_bit_flipped_model_in_the_store_is_refused_before_it_is_read(model_pipeline):
    run_both, calls = model_pipeline
    model = run_both(1)
    assert calls == ["eval"]
    weights = model.path / "model.safetensors"
    flip_a_bit(weights)
    with pytest.raises(ArtifactError) as err:
        run_both(2)  # a new eval must read the model: it is checked first
    assert calls == ["eval"]  # the eval stage never started
    assert fix_names(str(err.value), weights, model.path) and "sha256" in str(err.value)


def test_a_truncated_model_in_the_store_is_refused_at_lookup(model_pipeline):
    run_both, _ = model_pipeline
    model = run_both(1)
    weights = model.path / "model.safetensors"
    truncate(weights)
    with pytest.raises(ArtifactError, match="truncated") as err:
        run_both(1)  # even a run that would only reuse it
    assert fix_names(str(err.value), weights, model.path)


def test_a_flipped_or_truncated_manifest_is_refused(model_pipeline):
    run_both, _ = model_pipeline
    model = run_both(1)
    manifest = model.path / MANIFEST
    text = manifest.read_text()
    manifest.write_text(text.replace('"v": 1', '"v": 7'))  # still valid JSON, still parses
    with pytest.raises(ArtifactError, match="own checksum") as err:
        run_both(1)
    assert str(manifest) in str(err.value) and f"delete {model.path}" in str(err.value)
    manifest.write_text(text[: len(text) // 2])
    with pytest.raises(ArtifactError, match=r"no readable manifest\.json.*Delete the directory"):
        run_both(1)


def test_a_complete_artifact_is_checksummed_once_per_process(model_pipeline, tmp_path):
    run_both, _ = model_pipeline
    model = run_both(1)
    store = Store(tmp_path / "store")
    store.opened(model)
    flip_a_bit(model.path / "model.safetensors")
    store.opened(model)  # verified already in this process: not re-read
    with pytest.raises(ArtifactError):
        Store(tmp_path / "store").opened(model)  # another process (a fresh store) checks


def test_a_killed_writers_temporary_directory_is_removed_by_the_next_writer(tmp_path):
    store = Store(tmp_path)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = tmp_path / "model" / f".tmp-k1-{_HOST}-{gone.stdout.strip()}-abcdef"
    alive = tmp_path / "model" / f".tmp-k1-{_HOST}-{os.getpid()}-abcdef"  # a live writer
    other_host = tmp_path / "model" / ".tmp-k1-elsewhere-1-abcdef"
    for d in (dead, alive, other_host):
        d.mkdir(parents=True)
        (d / "weights.bin").write_bytes(b"half")
    with store.writing("model", "k1", {}) as (out, _):
        (out / "weights.bin").write_bytes(b"whole")
    assert not dead.exists() and alive.exists() and other_host.exists()
    assert (store.get("model", "k1").path / "weights.bin").read_bytes() == b"whole"


# --- the training loop's checkpoint ----------------------------------------------------------


def lm_step(model, step, micro):
    gen = torch.Generator().manual_seed(step)
    x_bt = torch.randint(0, VOCAB, (4, 8), generator=gen)
    logits_btv = model(input_ids=x_bt).logits[:, :-1]
    loss = F.cross_entropy(logits_btv.reshape(-1, VOCAB), x_bt[:, 1:].reshape(-1))
    return StepOutput(loss, x_bt.numel())


def train_tiny(work: Path, steps: int):
    cfg = TrainerConfig(num_threads=1, progress=False, checkpoint_every=1, log_every=1)
    return train(tiny_model(), lm_step, stage="sft", steps=steps, lr=1e-2, warmup_ratio=0.0,
                 grad_accum=1, trainer_cfg=cfg, work_dir=work)


@pytest.mark.parametrize("damage,file", [(flip_a_bit, "model.safetensors"),
                                         (truncate, "optimizer.bin"),
                                         (flip_a_bit, "custom_checkpoint_0.pkl")])
def test_a_damaged_training_checkpoint_is_refused_naming_the_file(tmp_path, damage, file):
    train_tiny(tmp_path, steps=2)
    ckpt = tmp_path / "checkpoint"
    listed = json.loads((ckpt / "checksums.json").read_text())
    assert {"model.safetensors", "optimizer.bin", "custom_checkpoint_0.pkl"} <= set(listed)
    damage(ckpt / file)
    with pytest.raises(ArtifactError) as err:
        train_tiny(tmp_path, steps=4)  # would resume from step 2
    message = str(err.value)
    assert str(ckpt / file) in message and "a training checkpoint" in message
    assert f"delete {ckpt} and rerun" in message
    shutil.rmtree(ckpt)  # the fix works: without the checkpoint the stage starts over
    assert train_tiny(tmp_path, steps=4).resumed_from == 0
