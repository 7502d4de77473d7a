"""Multi-process helpers and the sharding arithmetic, in one process: a rank is simulated by
making `current_rank()` answer (r, world), and DDP's gradient average is taken by hand. The real
two-process run is tests/integration/test_multiprocess.py."""

from __future__ import annotations

import os
import random
from datetime import datetime

import pytest
import torch
from omegaconf import OmegaConf
from transformers import Qwen3Config, Qwen3ForCausalLM

from factory import processes
from factory.errors import ConfigError
from factory.processes import Rank
from factory.stages import lm
from factory.stages.lm import IGNORE, PretrainData, SFTData

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]

VOCAB = 64


def test_shards_are_disjoint_and_cover_the_global_batch():
    rows = list(range(7))
    shares = [processes.shard(rows, Rank(r, 3)) for r in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    assert processes.shard(rows, Rank(0, 1)) == rows
    assert processes.shard(torch.arange(4), Rank(1, 2)).tolist() == [1, 3]


def test_a_micro_batch_smaller_than_the_world_is_refused_naming_the_setting():
    processes.check_shardable("the SFT batch_size", 2, Rank(0, 2))
    with pytest.raises(ConfigError, match=r"the SFT batch_size: 1 rows .* 2 processes.*at least 2"):
        processes.check_shardable("the SFT batch_size", 1, Rank(0, 2))


def test_one_process_is_rank_zero_of_one():
    assert processes.current_rank() == Rank(0, 1) and processes.current_rank().main
    assert processes.broadcast({"a": 1}) == {"a": 1}
    assert processes.all_sum([3, 4]) == [3, 4]


def test_the_launch_time_resolver_reads_rank_zeros_time(monkeypatch):
    """hydra.run.dir's resolver: every process formats the time rank 0 broadcast."""
    launched = datetime(2030, 1, 2, 3, 4, 5)
    monkeypatch.setenv(processes.LAUNCH_TIME_ENV, repr(launched.timestamp()))
    processes.register_launch_time()
    cfg = OmegaConf.create({"dir": "outputs/${launch_time:%Y-%m-%d}/${launch_time:%H-%M-%S}"})
    assert cfg.dir == "outputs/2030-01-02/03-04-05"


def test_one_process_leaves_the_launch_time_alone(monkeypatch):
    monkeypatch.delenv(processes.LAUNCH_TIME_ENV, raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    processes.agree_launch_time()
    assert processes.LAUNCH_TIME_ENV not in os.environ


# ---------------------------------------------------------------------------- sharding arithmetic


def tiny_model() -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, intermediate_size=32)).double()


def sft_examples(n: int = 10) -> list[dict]:
    """Examples of different lengths whose first tokens (the prompt) take no loss."""
    rng = random.Random(0)
    out = []
    for _ in range(n):
        length, prompt = rng.randint(4, 12), rng.randint(1, 3)
        ids = [rng.randrange(3, VOCAB) for _ in range(length)]
        out.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    return out


def step_as(data, model, world: int, monkeypatch, grad_accum: int):
    """Per rank of `world`: the summed micro-batch losses, mean metrics and gradients of step 1;
    then what DDP makes of them: the losses and metrics averaged over ranks, and the gradients."""
    losses, metrics, grads = [], [], []
    for r in range(world):
        monkeypatch.setattr(lm, "current_rank", lambda r=r: Rank(r, world))
        model.zero_grad()
        loss, ce = 0.0, 0.0
        for micro in range(grad_accum):
            out = data.micro_step(model, 1, micro)
            out.loss.backward()
            loss += out.loss.item()
            ce += out.metrics["ce"] / grad_accum
        losses.append(loss)
        metrics.append(ce)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    return sum(losses) / world, sum(metrics) / world, torch.stack(grads).mean(0)


@pytest.mark.parametrize("make", ["sft", "pretrain"])
def test_two_ranks_average_to_the_gradient_of_one(make, monkeypatch):
    """Rows r::2 of the global batch on rank r, each normalised by the global step's tokens x 2:
    DDP's average is the one-process gradient, with micro-batches of unequal token counts."""
    model = tiny_model()
    if make == "sft":
        data = SFTData(sft_examples(), batch_size=4, seed=0, pad_id=0, grad_accum=2)
    else:
        blocks = torch.randint(3, VOCAB, (12, 9), generator=torch.Generator().manual_seed(0))
        data = PretrainData(blocks, batch_size=4, seed=0, grad_accum=2)
    one = step_as(data, model, 1, monkeypatch, grad_accum=2)
    two = step_as(data, model, 2, monkeypatch, grad_accum=2)
    # fp64 weights, but the cross-entropy's log-softmax runs in fp32 (causal_lm_loss)
    assert two[0] == pytest.approx(one[0], rel=1e-6)  # the logged loss
    assert two[1] == pytest.approx(one[1], rel=1e-6)  # the per-token ce metric
    torch.testing.assert_close(two[2], one[2], rtol=1e-5, atol=1e-8)
    if make == "sft":  # the shards really differ in size: the normalisation is doing the work
        rows = data.rows(1, 0)
        assert sum(data.targets[i] for i in rows[0::2]) != sum(data.targets[i] for i in rows[1::2])


def test_a_non_publishing_writer_leaves_nothing_in_the_store(tmp_path):
    """Another rank's build of a distributed stage writes into scratch that is removed."""
    from factory.store import Store

    store = Store(tmp_path)
    with store.writing("model", "k1", {}, publish=False) as (out, _):
        (out / "weights.bin").write_bytes(b"rank 1")
    assert store.get("model", "k1") is None
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]
