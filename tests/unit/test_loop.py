"""The training loop and the metrics logger on a tiny Qwen3 (seconds on one CPU thread)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import Qwen3Config, Qwen3ForCausalLM

from factory import loop
from factory.config import LoggerConfig, TrainerConfig
from factory.errors import ArtifactError, ConfigError, NonFiniteError
from factory.loop import StepOutput, StopCheck, lr_multiplier, save_model, train
from factory.metrics import MetricsLogger

pytestmark = pytest.mark.unit

VOCAB, SEQ = 128, 12
# one thread: the 2-core test machine is shared, and torch's default thread pool then spins
CPU = TrainerConfig(num_threads=1, progress=False, checkpoint_every=0, log_every=1)


def tiny_model(seed: int = 0) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=64,
    )
    return Qwen3ForCausalLM(cfg)


def lm_micro_step(batch: int, grad_accum: int, *, fixed_data: bool = False, nan_at: int = 0):
    """Next-token CE on random tokens drawn from (step); micro-batch `micro` is a slice of them.

    The loss sums token losses and divides by the step's token count (all micro-batches), the
    loop's convention. fixed_data: the same batch every step (a memorisation task).
    """
    micro_batch = batch // grad_accum
    step_targets = batch * (SEQ - 1)

    def micro_step(model, step: int, micro: int) -> StepOutput:
        gen = torch.Generator().manual_seed(0 if fixed_data else step)
        tokens_bt = torch.randint(0, VOCAB, (batch, SEQ), generator=gen)
        x_bt = tokens_bt[micro * micro_batch : (micro + 1) * micro_batch].to(loop.current_device())
        logits_btv = model(input_ids=x_bt).logits[:, :-1]
        loss = F.cross_entropy(
            logits_btv.reshape(-1, VOCAB), x_bt[:, 1:].reshape(-1), reduction="sum"
        ) / step_targets
        if step == nan_at:
            loss = loss * float("nan")
        return StepOutput(loss, x_bt.numel(), {"micro_index": float(micro)})

    return micro_step


def run(model, micro_step, work_dir, *, steps=4, grad_accum=1, lr=1e-2, warmup_ratio=0.25,
        cfg=CPU, metrics=None, extra_state=None, stop=None, schedule_steps=None):
    return train(
        model, micro_step, stage="sft", steps=steps, lr=lr, warmup_ratio=warmup_ratio,
        grad_accum=grad_accum, trainer_cfg=cfg, work_dir=Path(work_dir), metrics=metrics,
        extra_state=extra_state, stop=stop, schedule_steps=schedule_steps,
    )


def loop_state(ckpt: Path) -> dict:
    return torch.load(ckpt / "custom_checkpoint_0.pkl", weights_only=False)


def test_loss_decreases_on_memorisation(tmp_path):
    result = run(tiny_model(), lm_micro_step(8, 2, fixed_data=True), tmp_path, steps=25,
                 grad_accum=2)
    assert result.steps == 25 and result.resumed_from == 0
    assert result.tokens == 25 * 8 * SEQ
    # from ~ln(128) = 4.85 at initialisation
    assert result.final_metrics["loss"] < 0.5 * math.log(VOCAB)


def test_grad_accum_matches_one_big_batch(tmp_path):
    # fp64: in fp32 the two summation orders differ by ~1e-9 in the gradients, and Adam's
    # g / (sqrt(v) + 1e-8) turns that into ~1e-5 weight differences where a gradient is ~0
    accumulated, big = tiny_model().double(), tiny_model().double()
    r4 = run(accumulated, lm_micro_step(8, 4), tmp_path / "a", steps=3, grad_accum=4)
    r1 = run(big, lm_micro_step(8, 1), tmp_path / "b", steps=3, grad_accum=1)
    assert r4.tokens == r1.tokens
    assert r4.final_metrics["loss"] == pytest.approx(r1.final_metrics["loss"], abs=1e-6)
    for (name, p4), p1 in zip(accumulated.named_parameters(), big.parameters()):
        assert (p4 - p1).abs().max().item() < 1e-6, name


def test_schedule_warmup_then_cosine_to_ten_percent(tmp_path):
    # 12 steps, warmup 0.25: 3 warmup steps, then a cosine over steps 4..12
    assert [lr_multiplier(s, 12, 0.25) for s in (1, 2, 3)] == pytest.approx([1 / 3, 2 / 3, 1])
    assert lr_multiplier(4, 12, 0.25) == pytest.approx(1.0)
    assert lr_multiplier(8, 12, 0.25) == pytest.approx(0.55)  # half-way: (1 + 0.1) / 2
    assert lr_multiplier(12, 12, 0.25) == pytest.approx(0.1)
    decay = [lr_multiplier(s, 12, 0.25) for s in range(4, 13)]
    assert decay == sorted(decay, reverse=True)
    assert lr_multiplier(1, 5, 0.0) == pytest.approx(1.0)  # no warmup

    # and the loop applies exactly these, one per optimizer step
    with MetricsLogger(tmp_path, LoggerConfig(mode="disabled")) as logger:
        run(tiny_model(), lm_micro_step(2, 1), tmp_path / "w", steps=12, lr=2e-3,
            metrics=logger)
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([2e-3 * lr_multiplier(s, 12, 0.25) for s in range(1, 13)])


class MemorisedShare:
    """A StopCheck measure: minus the model's CE on the memorisation batch, and its calls."""

    def __init__(self):
        self.calls: list[tuple[int, bool, bool]] = []  # (step, training mode, grad enabled)

    def __call__(self, model, step):
        self.calls.append((step, model.training, torch.is_grad_enabled()))
        x_bt = torch.randint(0, VOCAB, (8, SEQ), generator=torch.Generator().manual_seed(0))
        logits_btv = model(input_ids=x_bt).logits[:, :-1]
        return -F.cross_entropy(logits_btv.reshape(-1, VOCAB), x_bt[:, 1:].reshape(-1)).item()


def test_stop_check_ends_training_at_the_first_passing_check(tmp_path):
    memorise = lm_micro_step(8, 1, fixed_data=True)
    # the reference never passes: it trains all 40 steps and records every check
    never = MemorisedShare()
    ref = run(tiny_model(), memorise, tmp_path / "ref", steps=40, schedule_steps=30,
              stop=StopCheck("neg_ce", never, target=0.0, every=5, after=10))
    assert ref.steps == 40 and ref.passed is False
    assert [s for s, _ in ref.checks] == [10, 15, 20, 25, 30, 35, 40]
    assert all(not training and not grad for _, training, grad in never.calls)
    values = dict(ref.checks)
    target = values[25] - 1e-6  # reached first at step 25 (the CE only falls on this batch)
    assert values[20] < target

    measure = MemorisedShare()
    stopped_model = tiny_model()
    result = run(stopped_model, memorise, tmp_path / "w", steps=40, schedule_steps=30,
                 stop=StopCheck("neg_ce", measure, target=target, every=5, after=10))
    assert result.passed is True and result.steps == 25
    # checks measure, they do not steer: the same values as the run that never stopped
    assert result.checks == [(s, values[s]) for s in (10, 15, 20, 25)]
    assert result.final_metrics["neg_ce"] == values[25]
    assert measure(stopped_model.eval(), 25) == values[25]  # the weights are step 25's

    # a rerun finds the passed check in the checkpoint: no training, no new check
    again = MemorisedShare()
    rerun = run(tiny_model(seed=1), memorise, tmp_path / "w", steps=40, schedule_steps=30,
                stop=StopCheck("neg_ce", again, target=target, every=5, after=10))
    assert rerun.resumed_from == 25 and rerun.passed is True and again.calls == []
    assert rerun.checks == result.checks


def test_steps_past_the_schedule_stay_at_its_final_lr(tmp_path):
    assert lr_multiplier(13, 12, 0.25) == lr_multiplier(40, 12, 0.25) == pytest.approx(0.1)
    with MetricsLogger(tmp_path, LoggerConfig(mode="disabled")) as logger:
        run(tiny_model(), lm_micro_step(2, 1), tmp_path / "w", steps=16, schedule_steps=12,
            lr=2e-3, metrics=logger)
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([2e-3 * lr_multiplier(s, 12, 0.25) for s in range(1, 13)]
                                + [2e-4] * 4)
    with pytest.raises(ConfigError, match="schedule"):
        run(tiny_model(), lm_micro_step(2, 1), tmp_path / "x", steps=4, schedule_steps=5)
    with pytest.raises(ConfigError, match="every"):
        StopCheck("x", MemorisedShare(), target=0.0, every=0)


def test_metrics_jsonl_lines(tmp_path):
    cfg = TrainerConfig(num_threads=1, progress=False, checkpoint_every=0, log_every=2)
    with MetricsLogger(tmp_path, LoggerConfig(mode="disabled"), "run", {}) as logger:
        result = run(tiny_model(), lm_micro_step(4, 2), tmp_path / "w", steps=5, grad_accum=2,
                     cfg=cfg, metrics=logger)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4, 5]  # every log_every, and the last step
    for line in lines:
        assert line["stage"] == "sft"
        assert {"time", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"} <= line.keys()
        assert line["tokens"] == line["step"] * 4 * SEQ
        assert line["micro_index"] == 0.5  # the stage's metric, averaged over micro-batches 0, 1
        assert line["tokens_per_s"] > 0 and math.isfinite(line["grad_norm"])
    assert lines[-1]["loss"] == pytest.approx(result.final_metrics["loss"])

    quiet = tmp_path / "rank1"
    MetricsLogger(quiet, LoggerConfig(mode="offline"), enabled=False).log("sft", 1, {"x": 1.0})
    assert not quiet.exists()  # a non-main process writes nothing and never starts wandb


def test_wandb_offline_writes_a_run_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # any network use would fail
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with MetricsLogger(tmp_path, LoggerConfig(mode="offline"), "t", {"lr": 1e-3}) as m:
            m.log("sft", 1, {"loss": 2.0})
    assert not [w for w in caught if "wandb" in str(w.message) and "failed" in str(w.message)]
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == 2.0


def test_wandb_failure_warns_once_and_keeps_jsonl(tmp_path, monkeypatch):
    def broken_init(*args):
        raise OSError("no wandb today")

    monkeypatch.setattr("factory.metrics._wandb_init", broken_init)
    with pytest.warns(RuntimeWarning, match="no wandb today") as caught:
        with MetricsLogger(tmp_path, LoggerConfig(mode="online")) as m:
            m.log("sft", 1, {"loss": 1.0})
            m.log("sft", 2, {"loss": 0.5})
    assert len(caught) == 1
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_nan_loss_raises_and_keeps_the_last_checkpoint(tmp_path):
    cfg = TrainerConfig(num_threads=1, progress=False, checkpoint_every=2, log_every=1)
    model = tiny_model()
    with pytest.raises(NonFiniteError, match=r"stage 'sft'.*loss at step 5 of 8"):
        run(model, lm_micro_step(4, 2, nan_at=5), tmp_path, steps=8, grad_accum=2, cfg=cfg)
    ckpt = tmp_path / "checkpoint"
    assert loop_state(ckpt)["step"] == 4
    assert not (tmp_path / "checkpoint.tmp").exists()
    weights = load_file(ckpt / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert all(torch.isfinite(p).all() for p in model.parameters())  # no NaN update applied

    # without the fault, the same work dir resumes from step 4
    result = run(tiny_model(), lm_micro_step(4, 2), tmp_path, steps=8, grad_accum=2, cfg=cfg)
    assert result.resumed_from == 4 and result.steps == 8


class Counter:
    """Stage state that must survive a resume (as an RL controller would)."""

    def __init__(self) -> None:
        self.calls = 0

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = state["calls"]


def test_resume_in_process_is_exact_and_restores_extra_state(tmp_path):
    cfg = TrainerConfig(num_threads=1, progress=False, checkpoint_every=3, log_every=1)
    reference = tiny_model()
    ref_result = run(reference, lm_micro_step(4, 2), tmp_path / "ref", steps=7, grad_accum=2,
                     cfg=cfg)

    class Crash(Exception):
        pass

    counter = Counter()
    inner = lm_micro_step(4, 2)

    def crashing(model, step, micro):
        if step == 5:
            raise Crash
        counter.calls += 1
        return inner(model, step, micro)

    with pytest.raises(Crash):
        run(tiny_model(), crashing, tmp_path / "w", steps=7, grad_accum=2, cfg=cfg,
            extra_state=counter)

    resumed_counter = Counter()

    def counting(model, step, micro):
        resumed_counter.calls += 1
        return inner(model, step, micro)

    resumed = tiny_model(seed=1)  # different init: the checkpoint's weights must win
    result = run(resumed, counting, tmp_path / "w", steps=7, grad_accum=2, cfg=cfg,
                 extra_state=resumed_counter)
    assert result.resumed_from == 3
    assert resumed_counter.calls == 3 * 2 + 4 * 2  # restored at step 3, then steps 4..7
    assert result.tokens == ref_result.tokens
    assert result.final_metrics["loss"] == ref_result.final_metrics["loss"]
    for (name, p), q in zip(resumed.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name

    # a finished run resumes to "done" at once; another stage or step count is refused
    again = run(tiny_model(), inner, tmp_path / "w", steps=7, grad_accum=2, cfg=cfg,
                extra_state=Counter())
    assert again.resumed_from == 7 and again.final_metrics == result.final_metrics
    with pytest.raises(ArtifactError, match="cannot be resumed"):
        run(tiny_model(), inner, tmp_path / "w", steps=9, grad_accum=2, cfg=cfg,
            extra_state=Counter())


def test_interrupted_swap_recovers_the_previous_checkpoint(tmp_path):
    run(tiny_model(), lm_micro_step(2, 1), tmp_path, steps=2)
    # killed between "checkpoint -> checkpoint.old" and "checkpoint.tmp -> checkpoint"
    (tmp_path / "checkpoint").rename(tmp_path / "checkpoint.old")
    (tmp_path / "checkpoint.tmp").mkdir()
    (tmp_path / "checkpoint.tmp" / "model.safetensors").write_bytes(b"half a file")
    result = run(tiny_model(), lm_micro_step(2, 1), tmp_path, steps=2)
    assert result.resumed_from == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_save_model_round_trips_atomically(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="t0")), unk_token="t0"
    )
    out = tmp_path / "student"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier save")
    model = tiny_model(seed=3)
    assert save_model(model, tokenizer, out) == out
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]  # no .tmp / .old left
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    loaded = Qwen3ForCausalLM.from_pretrained(out)
    for (name, p), q in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(p, q), name


def test_current_rank_single_process():
    assert loop.current_rank() == loop.Rank(index=0, world=1)
