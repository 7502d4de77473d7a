"""`dry_run=true` on every recipe overlay in conf/experiment/: the whole plan costed offline, with
no weight loaded, no socket opened and nothing written to the artifact store; its numbers against
an independent 6·N·D formula, memory against student size and FSDP sharding."""

import json
import socket
from pathlib import Path

import pytest

from factory import flops
from factory.dry_run import plan_costs, training_devices
from factory.inspect import compose
from factory.plan import build_plan
from factory.run import run

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]
EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
SIZES = ["qwen3-0.6b", "qwen3-1.7b", "qwen3-4b", "qwen3-8b-table21", "qwen3-14b"]
H100_HOUR_FLOPS = 989e12 * 3600  # the H100's dense bf16 peak, an hour of it


@pytest.fixture
def no_network_no_weights(monkeypatch):
    """Any socket connection or weight load fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("the dry run touched the network or loaded weights")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)


@pytest.fixture(scope="module")
def costs():
    return {name: plan_costs(compose([f"experiment={name}"])) for name in EXPERIMENTS}


def test_the_size_overlays_are_all_there():
    assert set(SIZES) <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_overlay_dry_runs_offline_and_leaves_the_store_alone(
        experiment, tmp_path, no_network_no_weights, one_torch_thread, capsys):
    store = tmp_path / "store"
    cfg = compose([f"experiment={experiment}", "dry_run=true", f"artifacts_dir={store}"])
    result = run(cfg, tmp_path / "run")

    assert not store.exists(), "a dry run must not touch the artifact store"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.yaml", "dry_run.json"]
    saved = json.loads((tmp_path / "run" / "dry_run.json").read_text())
    assert saved["stages"] == result["stages"]
    # every stage a real run would execute, in order, each costed
    assert [s["stage"] for s in result["stages"]] == [s.name for s in build_plan(cfg).stages]
    assert all(s["h100_hours"] >= 0 and s["memory_gib"] >= 0 for s in result["stages"])
    assert result["total"]["h100_hours"] > 0
    trained = [s for s in result["stages"] if s["trained_tokens"]]
    assert trained and all("states" in s["memory_parts_gib"] for s in trained)
    printed = capsys.readouterr().out
    assert "projected H100-hours in total" in printed and "distill/on_policy" in printed


def test_table21_hours_agree_with_an_independent_six_n_d(costs):
    """The 8B student's off-policy and on-policy stages against 6·N·D / (peak·util), N the
    published 8.191B (REFERENCE.md) and D counted here from the overlay's numbers."""
    cfg = compose(["experiment=qwen3-8b-table21"])
    p, util, n = cfg.pipeline, cfg.trainer.h100_utilization, 8.191e9
    stages = {s["stage"]: s for s in costs["qwen3-8b-table21"]["stages"]}

    off = p.off_policy
    d_off = off.steps * off.grad_accum * off.batch_size * off.max_len
    formula = 6 * n * d_off / (H100_HOUR_FLOPS * util)
    assert 0.5 * formula < stages["distill/off_policy"]["h100_hours"] < 2 * formula

    on = p.on_policy
    d_on = on.steps * on.batch_size * on.n_per_prompt * on.max_len
    formula = 6 * n * d_on / (H100_HOUR_FLOPS * util)
    # the stage also samples (2N) and has the 22B-active teacher score (2N): more, not 10x more
    assert formula < stages["distill/on_policy"]["h100_hours"] < 10 * formula
    assert stages["distill/on_policy"]["teacher_tokens"] > 0
    total = costs["qwen3-8b-table21"]["total"]
    assert total["h100_hours"] == pytest.approx(sum(s["h100_hours"] for s in stages.values()))
    assert total["h100_hours"] > stages["distill/on_policy"]["h100_hours"] > 0


def test_memory_per_device_grows_with_student_size(costs):
    memory = [costs[name]["total"]["max_training_memory_gib"] for name in SIZES]
    assert memory == sorted(memory) and len(set(memory)) == len(memory), memory
    params = [costs[name]["params"]["student"]["total"] for name in SIZES]
    assert params == sorted(params)
    assert all(m < 80 for m in memory), "every recipe's training should fit an 80 GB H100"


def test_fsdp_splits_the_training_state_over_the_devices(costs):
    sharded = costs["qwen3-8b-table21"]
    single = plan_costs(compose(["experiment=qwen3-8b-table21", "trainer.accelerate_config=null"]))
    state = {c["devices"]["count"]: next(s for s in c["stages"]
                                         if s["stage"] == "distill/off_policy")["memory_parts_gib"]
             for c in (sharded, single)}
    assert state[1]["states"] == pytest.approx(8 * state[8]["states"])
    # 16 bytes a parameter: fp32 weights and grads, AdamW's two moments
    assert state[1]["states"] == pytest.approx(16 * 8_190_735_360 / 2**30)
    assert state[1]["activations"] > state[8]["activations"]  # one row per GPU, checkpointed
    assert any("over an 80 GB H100" in c for c in single["checks"])


def test_the_dry_run_says_what_a_real_run_still_needs(costs):
    checks = costs["qwen3-8b-table21"]["checks"]
    assert any("task.train_path" in c and "teacher/generate" in c for c in checks)
    given = plan_costs(compose(["experiment=qwen3-8b-table21", "task.train_path=/data/x.jsonl"]))
    assert not any("task.train_path" in c for c in given["checks"])


def test_devices_come_from_the_accelerate_config():
    devices = training_devices(compose(["trainer.accelerate_config=fsdp_2node"]).trainer)
    assert (devices.count, devices.fsdp, devices.checkpointing) == (16, True, True)
    assert devices.wrap_class == "Qwen3DecoderLayer"
    assert training_devices(compose([]).trainer).count == 1
    with pytest.raises(Exception, match="fsdp_2node"):
        training_devices(compose(["trainer.accelerate_config=fsdp_3node"]).trainer)


def test_the_projection_uses_the_reports_peak():
    from reports import tables

    assert flops.H100_PEAK_FLOPS == tables.H100_PEAK_FLOPS
    assert flops.projected_h100_hours(989e12 * 3600 * 0.4, 0.4) == pytest.approx(1.0)
