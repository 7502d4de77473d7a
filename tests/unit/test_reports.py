"""reports/: the Table-21 rows and their order, cost attribution (reuse, teacher-side in full and
amortised, projected H100-hours), Pass@k curves, sweep ranking and swept keys, self-contained
HTML, the CLI's errors, and the Hydra callback that must never raise.

Run directories are written by the project's own writers (factory.ledger.Ledger,
factory.evaluation.write_eval, factory.metrics.MetricsLogger, the resolved config as factory.run
writes it), with costs and counts chosen so every expected number can be worked out by hand."""

import logging
import re
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from factory.config import LoggerConfig
from factory.evaluation import pass_at_k, write_eval
from factory.inspect import CONF_DIR, compose
from factory.ledger import Ledger, LedgerEntry
from factory.metrics import MetricsLogger
from reports import tables
from reports.artifacts import ReportError, load_run, read_metrics
from reports.build import build, main
from reports.callback import ReportCallback

pytestmark = pytest.mark.unit

UTIL = 0.4
N = 64  # samples per problem


@pytest.fixture(scope="module")
def config_yaml():
    return OmegaConf.to_yaml(compose([f"trainer.h100_utilization={UTIL}"]), resolve=True)


def eval_result(model: str, mode: str, correct: list[int], ks=(1, 8, 64), task="arith") -> dict:
    """What factory.evaluation.evaluate returns (plus the eval stage's model/task/baseline),
    for problems with `correct` right answers out of N samples each."""
    per_problem = [{"id": f"p{i}", "n": N, "c": c,
                    "pass@k": {str(k): pass_at_k(N, c, k) for k in ks}, "mean_tokens": 10.0}
                   for i, c in enumerate(correct)]
    return {
        "mode": mode, "n_samples": N, "n_problems": len(correct), "ks": list(ks),
        "pass@k": {str(k): float(np.mean([p["pass@k"][str(k)] for p in per_problem]))
                   for k in ks},
        "pass@1": float(np.mean([c / N for c in correct])),
        "think_follow": 0.75 if mode == "think" else 1.0, "mean_response_tokens": 10.0,
        "truncated": 0.0, "generated_tokens": 10 * N * len(correct), "seconds": 1.0,
        "sampling": {}, "thinking_budget": None, "seed": 0, "per_problem": per_problem,
        "samples_preview": [], "model": model, "task": task,
        "guess_baseline": {str(k): 0.001 * k for k in ks},
    }


def entry(stage, arm, hours, flops=1e15, teacher_side=False, reused=False, artifact=None):
    """A ledger entry as factory.pipeline writes it: a reused stage costs 0 in this run and
    carries the cost recorded when its artifact was made."""
    cost = {"device": "cpu", "device_count": 2, "wall_s": hours * 1800, "device_hours": hours,
            "tokens": 1000, "flops": flops}
    artifact = artifact or f"/store/{stage.replace('/', '-')}"
    if reused:
        return LedgerEntry(stage=stage, arm=arm, teacher_side=teacher_side, artifact=artifact,
                           reused=True, device="cpu", device_count=2, wall_s=0.0,
                           device_hours=0.0, tokens=0, flops=0.0, original={**cost, "notes": {}})
    return LedgerEntry(stage=stage, arm=arm, teacher_side=teacher_side, artifact=artifact,
                       reused=False, **cost)


# every row's stages, with device-hours a power of two so sums are exact
STAGES = [
    entry("teacher/pretrain", "teacher", 1.0), entry("teacher/sft", "teacher", 2.0),
    entry("student/base", "base", 4.0, flops=2e15),
    entry("teacher/generate", "distill", 8.0, flops=4e15, teacher_side=True,
          artifact="/store/dataset/offpolicy"),
    entry("teacher/logits", "teacher", 16.0, teacher_side=True, artifact="/store/cache/logits"),
    entry("distill/off_policy", "distill", 32.0),
    entry("distill/on_policy", "distill", 64.0, reused=True),
    entry("four_stage/cold_start", "four_stage", 128.0),
    entry("four_stage/reasoning_rl", "four_stage", 256.0),
    entry("four_stage/fusion", "four_stage", 1024.0),
    entry("eval/grpo/think", "eval", 512.0),
    # an eval entry that names the stage whose model it evaluated: exact attribution
    LedgerEntry(stage="eval/special/think", arm="eval", teacher_side=False, artifact="/store/e",
                reused=False, device="cpu", device_count=2, wall_s=1.0, device_hours=1.0,
                tokens=10, flops=1e9, notes={"model_stage": "four_stage/fusion"}),
]
# label -> device-hours of the stages that made it: teacher = pretrain + sft; off_policy =
# generation + logits (teacher-side) + off-policy; on_policy adds its reused stage at its original
# cost; grpo (the reasoning_rl stage) = cold start + RL; special = up to fusion, as its eval names
EXPECTED_HOURS = {"teacher": 3.0, "base": 4.0, "off_policy": 56.0, "on_policy": 120.0,
                  "cold_start": 128.0, "grpo": 384.0, "special": 1408.0}


def write_run(run_dir: Path, config_yaml: str, stages=STAGES, evals=None, metrics=()):
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(config_yaml)
    ledger = Ledger(run_dir)
    for e in stages:
        ledger.add(e)
    for r in evals or []:
        write_eval(r, run_dir / "eval" / f"{r['model']}-{r['mode']}.json")
    with MetricsLogger(run_dir, LoggerConfig(mode="disabled")) as log:
        for stage, step, values in metrics:
            log.log(stage, step, values)
    return run_dir


def md_table(md: str, heading: str) -> tuple[list[str], list[list[str]]]:
    """The first Markdown table after `## heading`: its header and rows, cells stripped."""
    lines = md.split(f"## {heading}", 1)[1].splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    cells = [[c.strip() for c in re.split(r"(?<!\\)\|", ln)[1:-1]] for ln in lines[start:end]]
    return cells[0], cells[2:]


def test_rows_are_ordered_by_arm_and_every_number_comes_from_the_files(tmp_path, config_yaml):
    labels = ["grpo", "mystery", "on_policy", "special", "base", "cold_start", "teacher",
              "off_policy"]
    evals = [eval_result(lb, mode, [i, N // 2, N], ks=(1, 8, 64))
             for i, lb in enumerate(labels) for mode in ("no_think", "think")]
    run = write_run(tmp_path / "run", config_yaml, evals=evals)
    build(run)
    md = (run / "report.md").read_text()
    header, rows = md_table(md, "Comparison")

    assert [r[0] for r in rows] == ["teacher", "base", "off_policy", "on_policy", "cold_start",
                                    "grpo", "mystery", "special", "guessing"]
    assert header[2:4] == ["arith think Pass@1 (Pass@64), %", "arith no_think Pass@1 (Pass@64), %"]
    by_label = {r[0]: r for r in rows}
    for r in evals:
        row = by_label[r["model"]]
        col = 2 if r["mode"] == "think" else 3
        assert row[col] == f"{100 * r['pass@1']:.1f} ({100 * r['pass@k']['64']:.1f})"
        assert row[col + 2] == f"{100 * r['think_follow']:.1f}"
    h100 = lambda flops: flops / (989e12 * UTIL) / 3600  # noqa: E731
    assert header[6:10] == ["CPU core-h, teacher-side in full",
                            "CPU core-h, teacher-side amortised",
                            "projected H100-h, in full", "projected H100-h, amortised"]
    for label, hours in EXPECTED_HOURS.items():
        full, amortised, proj, proj_amortised = by_label[label][6:10]
        assert float(full) == hours and float(amortised) == hours  # one run: nothing shared
        assert float(proj) == pytest.approx(float(proj_amortised))
    # the flops behind the distillation rows: generation 4e15 + logits 1e15 + off-policy 1e15
    assert float(by_label["off_policy"][8]) == pytest.approx(h100(6e15), rel=1e-3)
    assert float(by_label["grpo"][8]) == pytest.approx(h100(2e15), rel=1e-3)
    assert by_label["mystery"][6:10] == ["—"] * 4  # no stage made it: no cost claimed
    assert by_label["guessing"][2] == f"{0.1:.1f} ({6.4:.1f})"
    assert "On arith in think mode, the distilled student (on_policy)" in md

    _, cost_rows = md_table(md, "Cost breakdown")
    reused = next(r for r in cost_rows if r[0] == "distill/on_policy")
    assert reused[3] == "yes" and float(reused[6]) == 0.0 and float(reused[7]) == 64.0
    assert "- on_policy: teacher/generate + teacher/logits + distill/off_policy + " \
           "distill/on_policy" in md
    for name in ("pass_at_k", "cost"):
        assert (run / "plots" / f"{name}.png").stat().st_size > 1000


def test_teacher_side_cost_is_amortised_over_the_runs_that_share_it(tmp_path, config_yaml):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text("hydra:\n  overrides:\n    task: ['loss=fkl,rkl']\n")
    evals = [eval_result("off_policy", "think", [1, 2])]
    shared = [e for e in STAGES if e.stage in ("teacher/generate", "distill/off_policy")]
    write_run(sweep / "0", config_yaml, stages=shared, evals=evals)
    reused = [entry("teacher/generate", "distill", 8.0, flops=4e15, teacher_side=True,
                    reused=True, artifact="/store/dataset/offpolicy"),
              entry("distill/off_policy", "distill", 32.0, artifact="/store/other")]
    write_run(sweep / "1", config_yaml, stages=reused, evals=evals)
    build(sweep)
    for job in ("0", "1"):
        header, rows = md_table((sweep / job / "report.md").read_text(), "Comparison")
        row = dict(zip(header, next(r for r in rows if r[0] == "off_policy")))
        assert float(row["CPU core-h, teacher-side in full"]) == 40.0  # 32 + 8
        assert float(row["CPU core-h, teacher-side amortised"]) == 36.0  # 32 + 8 / 2 runs
    assert "/store/dataset/offpolicy: shared by 2 runs" in (sweep / "report.md").read_text()


def test_stages_that_trained_until_a_check_passed_are_named_with_the_outcome(tmp_path,
                                                                            config_yaml):
    checked = {"check_target": 0.9, "check_passed": True, "checks": [[1000, 0.71], [1250, 0.93]]}
    failed = {"check_target": 0.9, "check_passed": False, "checks": [[1000, 0.2], [4000, 0.61]]}
    sft = entry("teacher/sft", "teacher", 2.0)
    sft.notes = checked
    other = entry("other/sft", "teacher", 1.0, reused=True)
    other.original["notes"] = failed
    run = write_run(tmp_path / "run", config_yaml,
                    stages=[entry("teacher/pretrain", "teacher", 1.0), sft, other],
                    evals=[eval_result("teacher", "think", [N, N // 2])])
    build(run)
    md = (run / "report.md").read_text()
    assert ("- teacher/sft: held-out Pass@1 0.930 after 1250 steps (2 checks), target 0.9 reached"
            in md)
    assert ("- other/sft: held-out Pass@1 0.610 after 4000 steps (2 checks), target 0.9 NOT "
            "reached" in md)
    assert "teacher/pretrain: held-out" not in md


def test_pass_at_k_curve_is_the_unbiased_estimator_of_the_eval_file():
    r = eval_result("base", "think", [0, 1, 5, 63, 64])
    ks, curve = tables.pass_at_k_curve(r)
    assert ks == list(range(1, 65))
    for k in r["ks"]:
        assert curve[k - 1] == pytest.approx(r["pass@k"][str(k)], abs=1e-12)
    assert curve[0] == pytest.approx(r["pass@1"])
    assert all(a <= b + 1e-12 for a, b in zip(curve, curve[1:]))
    assert tables.headline_k(r) == 64
    assert tables.headline_k(eval_result("base", "think", [1], ks=(1, 4))) == 4


def test_a_sweep_ranks_its_runs_with_the_swept_keys_as_columns(tmp_path, config_yaml, capsys):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text(
        "hydra:\n  overrides:\n    task: ['loss=fkl,rkl,jsd', 'pipeline.eval.ks=[1,4]']\n")
    jobs = {"0": ("fkl", [8, 8]), "1": ("rkl", [32, 32]), "2": ("jsd", None)}  # 2: no student
    for job, (loss, correct) in jobs.items():
        evals = [eval_result("base", "think", [4, 4])]
        if correct is not None:
            evals.append(eval_result("on_policy", "think", correct))
        run = write_run(sweep / job, config_yaml, evals=evals)
        (run / ".hydra").mkdir()
        (run / ".hydra" / "overrides.yaml").write_text(f"- loss={loss}\n- pipeline.eval.ks=[1,4]\n")
    build(sweep)
    header, rows = md_table((sweep / "report.md").read_text(), "Runs ranked")
    assert header[:4] == ["rank", "run", "loss", "on_policy/think/pass@1, %"]
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [
        ("1", "1", "rkl", "50.0"), ("2", "0", "fkl", "12.5"), ("3", "2", "jsd", "—")]
    for job in jobs:
        assert (sweep / job / "report.html").is_file()

    runs = [load_run(sweep / j) for j in jobs]
    cheapest = tables.rank(runs, tables.Metric.parse("base/device_hours"))
    assert [v for _, v in cheapest] == [4.0, 4.0, 4.0]  # lower first; ties keep job order
    assert [r.name for r, _ in cheapest] == ["0", "1", "2"]
    assert main([str(sweep), "--rank-by", "pass@1"]) == 2
    assert "expected MODEL/MODE/FIELD" in capsys.readouterr().err


def test_default_metric_is_the_distilled_students_then_the_first_student_row(tmp_path,
                                                                               config_yaml):
    def run_with(*labels):
        path = tmp_path / "_".join(labels)
        return load_run(write_run(path, config_yaml,
                                  evals=[eval_result(lb, "think", [1]) for lb in labels]))

    assert tables.default_metric([run_with("teacher", "base", "off_policy", "on_policy")]) \
        == "on_policy/think/pass@1"
    assert tables.default_metric([run_with("teacher", "base", "grpo")]) == "base/think/pass@1"


@pytest.mark.parametrize("override,sweeps", [
    ("loss=fkl,rkl", True), ("seed=range(0,3)", True), ("+extra=choice(a,b)", True),
    ("pipeline.eval.ks=[1,4]", False), ("student=tiny", False), ("task.name='a,b'", False),
])
def test_sweep_overrides_are_told_from_list_values(override, sweeps):
    assert tables.is_sweep_override(override) is sweeps


def test_metrics_keep_the_last_line_per_stage_and_step(tmp_path):
    with MetricsLogger(tmp_path, LoggerConfig(mode="disabled")) as log:
        log.log("a", 1, {"loss": 3.0})
        log.log("a", 2, {"loss": float("nan")})
        log.log("a", 1, {"loss": 2.0})  # a resumed run logs step 1 again
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [2, 1]
    assert np.isnan(rows[0]["loss"]) and rows[1]["loss"] == 2.0


def test_the_html_report_is_self_contained(tmp_path, config_yaml):
    run = write_run(tmp_path / "run", config_yaml,
                    evals=[eval_result("base", m, [3, 9]) for m in ("think", "no_think")],
                    metrics=[("student/base", s, {"loss": 4.0 / s, "kl": 1.0 / s})
                             for s in (1, 2, 3)])
    build(run)
    html = (run / "report.html").read_text()
    srcs = re.findall(r'<img[^>]*\ssrc="([^"]*)"', html)
    assert len(srcs) == 3  # pass@k, training curves, cost
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r"<(script|link|iframe)\b|url\(|https?://", html)
    assert '<table id="comparison">' in html
    assert (run / "plots" / "training.png").is_file()


def test_the_cli_refuses_a_directory_without_a_run(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "holds neither a run" in capsys.readouterr().err
    (tmp_path / "eval").mkdir()
    (tmp_path / "ledger.json").write_text("{not json")
    assert main([str(tmp_path)]) == 2
    assert "ledger.json is not valid JSON" in capsys.readouterr().err
    with pytest.raises(ReportError):
        load_run(tmp_path / "absent")


def test_the_callback_warns_and_never_raises_or_touches_the_artifacts(tmp_path, caplog):
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "ledger.json").write_text("{cut short")
    cfg = OmegaConf.create({"hydra": {"runtime": {"output_dir": str(run)},
                                      "sweep": {"dir": str(tmp_path / "nothing")}}})
    with caplog.at_level(logging.WARNING, logger="reports.callback"):
        ReportCallback().on_job_end(cfg, job_return=None)
        ReportCallback().on_multirun_end(cfg)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "run report" in warnings[0] and "python -m reports.build" in warnings[0]
    assert (run / "ledger.json").read_text() == "{cut short"
    assert sorted(p.name for p in run.iterdir()) == ["eval", "ledger.json"]


def test_the_callback_config_instantiates_the_callback():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = hydra_compose("config", overrides=["hydra/callbacks=report"],
                            return_hydra_config=True)
    callback = instantiate(cfg.hydra.callbacks.report)
    assert isinstance(callback, ReportCallback) and callback.rank_by is None
