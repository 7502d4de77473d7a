"""Guarded numerics in the training loop (issue 9, item 4; factory/guards.py).

A NaN/inf loss or gradient, or a loss spike, stops the stage naming the step or, with
trainer.on_nonfinite=skip, drops the step; weights that are not finite are never checkpointed;
the last good checkpoint is kept. (NaN loss with the default "stop":
tests/unit/test_loop.py::test_nan_loss_raises_and_keeps_the_last_checkpoint.)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from factory.config import LoggerConfig, TrainerConfig
from factory.errors import ConfigError, NonFiniteError
from factory.guards import MAX_CONSECUTIVE_SKIPS, SPIKE_MIN_HISTORY
from factory.loop import StepOutput, train
from factory.metrics import MetricsLogger

from tiny_lm import VOCAB, tiny_model

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]


class NaNGrad(torch.autograd.Function):
    """The identity forward, a NaN gradient backward: a finite loss with a broken gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def lm_step(bad: dict[int, str] | None = None, seen: list | None = None):
    """Next-token CE on a fixed batch; `bad` maps a step to nan | grad_nan | spike."""
    bad = bad or {}

    def micro_step(model, step, micro):
        if seen is not None:  # the weights this step starts from
            seen.append((step, {k: v.clone() for k, v in model.state_dict().items()}))
        x_bt = torch.randint(0, VOCAB, (4, 8), generator=torch.Generator().manual_seed(0))
        logits_btv = model(input_ids=x_bt).logits[:, :-1]
        loss = F.cross_entropy(logits_btv.reshape(-1, VOCAB), x_bt[:, 1:].reshape(-1))
        what = bad.get(step)
        if what == "nan":
            loss = loss * float("nan")
        elif what == "grad_nan":
            loss = NaNGrad.apply(loss)
        elif what == "spike":
            loss = loss * 100.0
        return StepOutput(loss, x_bt.numel())

    return micro_step


def run(work: Path, micro_step, steps: int, model=None, metrics=None, **cfg):
    trainer = TrainerConfig(num_threads=1, progress=False, checkpoint_every=1, log_every=1, **cfg)
    return train(model or tiny_model(), micro_step, stage="sft", steps=steps, lr=1e-3,
                 warmup_ratio=0.0, grad_accum=1, trainer_cfg=trainer, work_dir=work,
                 metrics=metrics)


def checkpoint_step(work: Path) -> int:
    return torch.load(work / "checkpoint" / "custom_checkpoint_0.pkl", weights_only=False)["step"]


def test_a_nan_gradient_stops_the_stage_naming_the_step(tmp_path):
    with pytest.raises(NonFiniteError) as err:
        run(tmp_path, lm_step({4: "grad_nan"}), steps=6)
    message = str(err.value)
    assert "non-finite gradient norm at step 4 of 6" in message and "grad_norm=nan" in message
    assert f"last good checkpoint (step 3) is kept in {tmp_path / 'checkpoint'}" in message
    assert "trainer.on_nonfinite=skip" in message
    assert checkpoint_step(tmp_path) == 3


def test_skip_drops_the_bad_step_and_goes_on(tmp_path, caplog):
    seen = []
    with caplog.at_level(logging.WARNING, logger="factory.loop"):
        with MetricsLogger(tmp_path, LoggerConfig(mode="disabled")) as logger:
            result = run(tmp_path / "w", lm_step({3: "nan", 5: "grad_nan"}, seen), steps=6,
                         metrics=logger, on_nonfinite="skip")
    assert result.steps == 6 and result.final_metrics["skipped_steps"] == 2
    weights = dict(seen)
    for skipped in (3, 5):  # no update: the next step starts from the same weights
        for name, w in weights[skipped].items():
            assert torch.equal(w, weights[skipped + 1][name]), (skipped, name)
    assert any(not torch.equal(w, weights[3][n]) for n, w in weights[2].items())  # 2 did update
    skips = [r.getMessage() for r in caplog.records if "skipped step" in r.getMessage()]
    assert len(skips) == 2 and "skipped step 3 of 6: non-finite loss" in skips[0]
    assert "skipped step 5 of 6: non-finite gradient norm" in skips[1]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4, 5, 6]
    assert lines[2]["loss"] == "nan" and lines[-1]["skipped_steps"] == 2
    stored = load_file(tmp_path / "w" / "checkpoint" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in stored.values())


def test_too_many_bad_steps_in_a_row_stop_even_with_skip(tmp_path):
    every = {s: "nan" for s in range(3, 30)}
    with pytest.raises(NonFiniteError) as err:
        run(tmp_path, lm_step(every), steps=30, on_nonfinite="skip")
    step = 2 + MAX_CONSECUTIVE_SKIPS
    assert f"at step {step} of 30" in str(err.value) and "the run has diverged" in str(err.value)
    assert checkpoint_step(tmp_path) == step - 1  # skipped steps still checkpoint good weights


def test_a_loss_spike_stops_or_is_skipped(tmp_path):
    spike_at = SPIKE_MIN_HISTORY + 2
    with pytest.raises(NonFiniteError) as err:
        run(tmp_path / "a", lm_step({spike_at: "spike"}), steps=spike_at + 1,
            loss_spike_factor=3.0)
    message = str(err.value)
    assert "loss spike (above trainer.loss_spike_factor=3 x the running median" in message
    assert f"at step {spike_at} of {spike_at + 1}" in message
    result = run(tmp_path / "b", lm_step({spike_at: "spike"}), steps=spike_at + 1,
                 loss_spike_factor=3.0, on_nonfinite="skip")
    assert result.final_metrics["skipped_steps"] == 1
    off = run(tmp_path / "c", lm_step({spike_at: "spike"}), steps=spike_at + 1)  # factor 0: off
    assert "skipped_steps" not in off.final_metrics


def test_weights_that_are_not_finite_are_never_checkpointed(tmp_path):
    model = tiny_model()
    model.register_parameter("unused", torch.nn.Parameter(torch.zeros(3)))  # no gradient
    inner = lm_step()

    def corrupting(m, step, micro):
        if step == 3:  # a finite loss and gradient, but the weights go bad
            m.unused.data.fill_(float("inf"))
        return inner(m, step, micro)

    with pytest.raises(NonFiniteError) as err:
        run(tmp_path, corrupting, steps=5, model=model)
    assert "weights hold NaN or inf after step 3" in str(err.value)
    assert "last good checkpoint (step 2)" in str(err.value)
    assert checkpoint_step(tmp_path) == 2
    stored = load_file(tmp_path / "checkpoint" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in stored.values())


@pytest.mark.parametrize("field,value,match", [
    ("on_nonfinite", "ignore", "trainer.on_nonfinite must be one of stop, skip"),
    ("loss_spike_factor", 0.5, "trainer.loss_spike_factor must be 0 .* or > 1"),
])
def test_guard_settings_are_checked(tmp_path, field, value, match):
    with pytest.raises(ConfigError, match=match):
        run(tmp_path, lm_step(), steps=1, **{field: value})
