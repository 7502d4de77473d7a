"""`python -m reports.build DIR [--rank-by METRIC]`: the report of a run or of a Hydra multirun.

Reads only the files a run wrote (reports/artifacts.py) and writes into DIR `report.md`, a
self-contained `report.html` and `plots/*.png`. For a multirun directory (multirun.yaml at the
top, one run per job folder) it writes every run's report, with the teacher-side cost amortised
over the runs that share it, and the sweep's report: one row per run ranked by METRIC
(reports/tables.py `Metric`; default: the distilled student's thinking Pass@1 where a run has
one, else the first student row's), the swept keys as columns.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import platform
import sys
from pathlib import Path

import yaml

from factory import faults
from reports import plots, tables
from reports.artifacts import (ReportError, Run, is_run, is_sweep, load_run, made_cost,
                               sweep_run_dirs, write_atomic)
from reports.document import Document

PACKAGES = ("torch", "transformers", "accelerate", "datasets", "hydra-core", "liger-kernel",
            "compact-factory")
HEADLINE_KEYS = ("student.name", "teacher.name", "task.name", "pipeline.name", "seed",
                 "trainer.name", "trainer.h100_utilization")


def build(path: str | Path, rank_by: str | None = None) -> list[Path]:
    """Write the report(s) for a run or a sweep directory; the paths of the report.md files."""
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"{path} is not a directory")
    if is_run(path):
        return [build_run(path)]
    if is_sweep(path):
        return build_sweep(path, rank_by)
    raise ReportError(f"{path} holds neither a run (ledger.json, eval/) nor a sweep "
                      f"(multirun.yaml, job folders with runs in them)")


# ---------------------------------------------------------------- one run


def build_run(path: str | Path, shares: dict[str, int] | None = None) -> Path:
    """A run's report. `shares`: teacher-side artifact -> runs sharing it; by default counted
    over the run's sweep siblings when the run sits in a multirun folder, else 1."""
    run = load_run(path)
    if shares is None:
        parent = run.dir.parent
        siblings = ([load_run(p) for p in sweep_run_dirs(parent)]
                    if (parent / "multirun.yaml").is_file() else [run])
        shares = tables.teacher_side_shares(siblings)
    doc = Document(f"compact-factory report: {_pair(run)}")
    doc.para(f"Run directory: {run.dir}. Built {_now()} from the run's files "
             f"(config.yaml, ledger.json, metrics.jsonl, eval/*.json).", note=True)
    _verdict(doc, run, shares)
    _comparison(doc, run, shares)
    plot_dir = run.dir / "plots"
    doc.heading("Pass@k")
    png = plots.pass_at_k(run, plot_dir / "pass_at_k.png")
    if png:
        doc.para("Pass@k for k = 1 up to the samples drawn per problem (at most 64), from the "
                 "per-problem counts by the unbiased estimator (Chen et al. 2021).")
        doc.image(png, run.dir, "Pass@k curves")
    else:
        doc.para("No evaluation results in eval/.", note=True)
    doc.heading("Training curves")
    png = plots.training_curves(run, plot_dir / "training.png")
    if png:
        doc.para("Every quantity the stages logged to metrics.jsonl, against the stage's step.")
        doc.image(png, run.dir, "training curves")
    else:
        doc.para("No training step ran in this run (metrics.jsonl is empty: every stage's "
                 "artifact was reused, or none trained); the curves are in the report of the run "
                 "that made the artifacts.", note=True)
    _cost(doc, run, shares, plot_dir)
    _config(doc, run)
    _environment(doc, [run])
    return _write(doc, run.dir)


def _pair(run: Run, with_name: bool = True) -> str:
    """'tiny from tiny-moe on arith (run name)': student, teacher, task."""
    cfg = run.config
    names = [(cfg.get(k) or {}).get("name") for k in ("student", "teacher", "task")]
    if not all(names):
        return run.name
    return f"{names[0]} from {names[1]} on {names[2]}" + (f" ({run.name})" if with_name else "")


def _verdict(doc: Document, run: Run, shares: dict[str, int]) -> None:
    labels = {r["model"] for r in run.evals}
    distilled = [lb for lb in ("on_policy", "off_policy") if lb in labels]
    four = [lb for lb in ("general_rl", "fusion", "reasoning_rl", "grpo", "cold_start")
            if lb in labels]
    cols = tables.columns(run.evals)
    if not (distilled and four and cols):
        return
    task, mode = cols[0]
    cell = tables.cells(run.evals)
    a, b = cell.get((distilled[0], task, mode)), cell.get((four[0], task, mode))
    if a is None or b is None:
        return
    ca, cb = tables.row_cost(run, distilled[0], shares), tables.row_cost(run, four[0], shares)
    winner = ("distillation" if a["pass@1"] > b["pass@1"] else
              "the four-stage recipe" if b["pass@1"] > a["pass@1"] else "neither arm")
    text = (f"On {task} in {mode} mode, the distilled student ({distilled[0]}) reaches Pass@1 "
            f"{_pct(a['pass@1'])}% against {_pct(b['pass@1'])}% for the four-stage student "
            f"({four[0]}): {winner} is ahead on Pass@1")
    k = tables.headline_k(a)
    if str(k) in b["pass@k"]:
        text += (f" (Pass@{k}: {_pct(a['pass@k'][str(k)])}% against "
                 f"{_pct(b['pass@k'][str(k)])}%)")
    text += f", on {a.get('n_problems', '?')} problems x {a.get('n_samples', '?')} samples."
    if ca and cb:
        unit = _device_unit(run)
        text += (f" Making them took {_num(ca.device_hours)} {unit} with the teacher-side cost "
                 f"charged in full ({_num(ca.device_hours_amortised)} amortised) against "
                 f"{_num(cb.device_hours)} {unit}.")
    doc.heading("Result")
    doc.para(text)


def _comparison(doc: Document, run: Run, shares: dict[str, int]) -> None:
    doc.heading("Comparison (Qwen3 report Table 21 style)")
    cols = tables.columns(run.evals)
    if not cols:
        doc.para("No evaluation results in eval/.", note=True)
        return
    cell = tables.cells(run.evals)
    labels = tables.ordered_labels(r["model"] for r in run.evals)
    ks = {c: tables.headline_k(next(r for (m, t, md), r in cell.items() if (t, md) == c))
          for c in cols}
    unit = _device_unit(run)
    header = (["model", "method"]
              + [f"{t} {m} Pass@1 (Pass@{ks[(t, m)]}), %" for t, m in cols]
              + [f"{t} {m} ThinkFollow, %" for t, m in cols]
              + [f"{unit}, teacher-side in full", f"{unit}, teacher-side amortised",
                 "projected H100-h, in full", "projected H100-h, amortised"])
    rows = []
    for label in labels:
        row = [label, tables.title(label)]
        for c in cols:
            r = cell.get((label, *c))
            row.append("—" if r is None else _pass_cell(r, ks[c]))
        for c in cols:
            r = cell.get((label, *c))
            row.append("—" if r is None else _pct(r["think_follow"]))
        cost = tables.row_cost(run, label, shares)
        row += (["—"] * 4 if cost is None else
                [_num(cost.device_hours), _num(cost.device_hours_amortised),
                 _num(cost.h100_hours), _num(cost.h100_hours_amortised)])
        rows.append(row)
    guess = tables.guess_baseline(run.evals)
    if guess:
        row = ["guessing", "answers drawn from the training answers"]
        for t, m in cols:
            g = guess.get(t)
            k = ks[(t, m)]
            row.append("—" if not g else
                       f"{_pct(g.get(1, float('nan')))} ({_pct(g.get(k, float('nan')))})")
        rows.append(row + ["—"] * (len(cols) + 4))
    doc.table(header, rows, id="comparison", left=2)
    first = run.evals[0]
    util = tables.utilization(run.config)
    doc.para(
        f"Pass@1 is the mean over problems of c/n, Pass@k the unbiased estimator; "
        f"{first.get('n_samples', '?')} samples per problem and mode on "
        f"{first.get('n_problems', '?')} held-out problems. ThinkFollow: the share of completions "
        f"whose think block obeys the mode flag. {unit}: measured on the device that ran "
        f"({', '.join(tables.device_kinds(run)) or '?'}; on a CPU, core-hours), the cost of "
        f"making the row's model from its arm's start (a reused stage counts at the cost "
        f"recorded when it was made; evaluation not included; which stages: the cost breakdown "
        f"below). Teacher-side cost (generation, logit recording, scoring) is charged to the "
        f"distillation rows in full, and amortised over the runs sharing the artifact. "
        + (f"Projected H100-hours are not measured: FLOPs by formula / "
           f"({tables.H100_PEAK_FLOPS / 1e12:.0f} TFLOP/s dense bf16 peak x utilisation "
           f"{util:g}, trainer.h100_utilization)." if util else
           "Projected H100-hours need trainer.h100_utilization in config.yaml; it is absent."),
        note=True)


def _cost(doc: Document, run: Run, shares: dict[str, int], plot_dir: Path) -> None:
    doc.heading("Cost breakdown")
    stages = tables.stage_breakdown(run, shares)
    if not stages:
        doc.para("No ledger.json: no stage finished.", note=True)
        return
    header = ["stage", "arm", "teacher-side", "reused", "device", "wall s to make",
              "device-h this run", "device-h to make", "tokens", "FLOPs", "projected H100-h",
              "runs sharing it (teacher-side)"]
    rows = [[s["stage"], s["arm"], "yes" if s["teacher_side"] else "", "yes" if s["reused"]
             else "", f"{s['device']} x{s['device_count']}", f"{s['wall_s']:.1f}",
             _num(s["device_hours_this_run"]), _num(s["device_hours"]), f"{s['tokens']:,}",
             f"{s['flops']:.3g}", _num(s["h100_hours"]),
             str(s["share"]) if s["teacher_side"] else ""] for s in stages]
    doc.table(header, rows, id="cost", left=5)
    paid = sum(s["device_hours_this_run"] for s in stages)
    made = sum(s["device_hours"] for s in stages)
    labels = tables.ordered_labels(r["model"] for r in run.evals)
    made_of = [f"{lb}: {' + '.join(c.stages)}" for lb in labels
               if (c := tables.row_cost(run, lb, shares)) is not None]
    doc.para(f"This run paid {_num(paid)} device-hours; its artifacts cost {_num(made)} "
             f"device-hours to make (evaluation included).")
    if made_of:
        doc.para("Stages charged to each row:", note=True)
        doc.bullets(made_of)
    checked = tables.stop_checks(run)
    if checked:
        doc.para("Stages that trained until a check passed (their step counts are budgets):",
                 note=True)
        doc.bullets(checked)
    png = plots.cost_breakdown(run, shares, plot_dir / "cost.png")
    if png:
        doc.image(png, run.dir, "cost breakdown")


def _config(doc: Document, run: Run) -> None:
    doc.heading("Config")
    flat = tables.flatten(run.config)
    rows = [[k, str(flat[k])] for k in HEADLINE_KEYS if k in flat]
    if rows:
        doc.table(["key", "value"], rows, id="config", left=2)
    if run.overrides:
        doc.para("Command-line overrides (.hydra/overrides.yaml):")
        doc.code("\n".join(run.overrides))
    doc.para("The full resolved config is config.yaml in the run directory.", note=True)


def _environment(doc: Document, runs: list[Run]) -> None:
    doc.heading("Environment")
    rows = []
    recorded = {k: v for run in runs for k, v in run.environment.items()}
    for k, v in recorded.items():
        rows.append([k, str(v), "recorded by the run"])
    for pkg in PACKAGES:
        if pkg not in recorded:
            rows.append([pkg, _version(pkg), "installed where the report was built"])
    if "python" not in recorded:
        rows.append(["python", platform.python_version(), "installed where the report was built"])
    devices = list(dict.fromkeys(d for run in runs for d in tables.device_kinds(run)))
    rows.append(["device", ", ".join(devices) or "?", "ledger.json"])
    git = _git_revision(runs)
    rows.append(["git revision", git or "not recorded in the run directory",
                 "run directory" if git else ""])
    if len(runs) == 1 and (runs[0].dir / "ledger.json").is_file():
        finished = (runs[0].dir / "ledger.json").stat().st_mtime
        rows.append(["run finished", _iso(finished), "ledger.json last written"])
    rows.append(["report built", _now(), ""])
    doc.table(["what", "value", "source"], rows, id="environment", left=3)


def _git_revision(runs: list[Run]) -> str | None:
    """The revision env.json recorded (factory/environment.py: git_revision, git_dirty), marked
    when the tree had uncommitted changes; else any git-named config value."""
    for run in runs:
        revision = run.environment.get("git_revision")
        if revision:
            dirty = run.environment.get("git_dirty")
            return f"{revision} (with uncommitted changes)" if dirty else str(revision)
        for k, v in tables.flatten(run.config).items():
            if "git" in k.lower() and v:
                return str(v)
    return None


# ---------------------------------------------------------------- a sweep


def build_sweep(path: str | Path, rank_by: str | None = None) -> list[Path]:
    path = Path(path)
    runs = [load_run(p) for p in sweep_run_dirs(path)]
    if not runs:
        raise ReportError(f"{path} holds no run folders (none has ledger.json or eval/)")
    metric = tables.Metric.parse(rank_by or tables.default_metric(runs))  # before any work
    shares = tables.teacher_side_shares(runs)
    written = [build_run(run.dir, shares) for run in runs]
    multirun = yaml.safe_load((path / "multirun.yaml").read_text()) \
        if (path / "multirun.yaml").is_file() else None
    ranked = tables.rank(runs, metric, shares)
    swept = tables.swept_keys(multirun, runs)

    doc = Document(f"compact-factory sweep report: {path.name}")
    doc.para(f"Sweep directory: {path}. {len(runs)} runs. Built {_now()} from the runs' files.",
             note=True)
    doc.heading("Runs ranked")
    doc.para(f"Ranked by {metric.spec} ({'higher' if metric.higher_is_better else 'lower'} "
             f"first; runs without it last). Swept: {', '.join(swept) or 'nothing recorded'}.")
    labels = tables.ordered_labels(r["model"] for run in runs for r in run.evals)
    mode = metric.mode or "think"
    task = metric.task
    model_cols = []
    for lb in labels:
        r = next((r for run in runs for r in run.evals if r["model"] == lb and r["mode"] == mode
                  and (task is None or r.get("task") == task)), None)
        if r is not None:
            model_cols.append((lb, r.get("task", "?"), tables.headline_k(r)))
    unit = _device_unit(runs[0])
    percent = metric.field.startswith("pass@") or metric.field == "think_follow"
    header = (["rank", "run"] + swept + [metric.spec + (", %" if percent else "")]
              + [f"{lb} {t} {mode} Pass@1 (Pass@{k}), %" for lb, t, k in model_cols]
              + [f"{metric.model} {unit}, teacher-side in full",
                 f"{metric.model} {unit}, teacher-side amortised"])
    rows = []
    for i, (run, value) in enumerate(ranked, 1):
        cell = tables.cells(run.evals)
        row = [str(i), run.name] + [tables.swept_value(run, k) for k in swept]
        row.append("—" if value is None else _pct(value) if percent else _num(value))
        for lb, t, k in model_cols:
            r = cell.get((lb, t, mode))
            row.append("—" if r is None else _pass_cell(r, k))
        cost = tables.row_cost(run, metric.model, shares)
        row += ["—", "—"] if cost is None else [_num(cost.device_hours),
                                                _num(cost.device_hours_amortised)]
        rows.append(row)
    doc.table(header, rows, id="ranking", left=2 + len(swept))
    png = plots.sweep_ranking(ranked, metric.spec, [r.name for r, _ in ranked],
                              path / "plots" / "ranking.png")
    if png:
        doc.image(png, path, "runs ranked")

    doc.heading("Config keys that differ between runs")
    keys = tables.differing_config_keys(runs)
    if keys:
        flats = [tables.flatten(r.config) for r in runs]
        doc.table(["run"] + keys, [[r.name] + [str(f.get(k, "—")) for k in keys]
                                   for r, f in zip(runs, flats)], id="config-diff",
                  left=1 + len(keys))
    else:
        doc.para("The runs' resolved configs are identical.", note=True)

    shared = {a: n for a, n in shares.items() if n > 1}
    doc.heading("Shared teacher-side artifacts")
    if shared:
        doc.bullets([f"{a}: shared by {n} runs (each run's amortised cost carries 1/{n})"
                     for a, n in shared.items()])
    else:
        doc.para("No teacher-side artifact is shared between runs of this sweep.", note=True)

    doc.heading("Run reports")
    for run in runs:
        doc.link(f"run {run.name}: {_pair(run, with_name=False)}", f"{run.name}/report.html")
    _environment(doc, runs)
    return [*written, _write(doc, path)]


# ---------------------------------------------------------------- helpers


def _write(doc: Document, root: Path) -> Path:
    write_atomic(root / "report.md", doc.markdown())
    faults.point("md", stage="report")  # FACTORY_KILL_AT test hook (factory/faults.py)
    write_atomic(root / "report.html", doc.html(root))
    return root / "report.md"


def _device_unit(run: Run) -> str:
    kinds = {made_cost(e)["device"] for e in run.stages if e.get("arm") != "eval"}
    if kinds == {"cpu"}:
        return "CPU core-h"
    if len(kinds) == 1:
        return f"GPU-h ({kinds.pop()})"
    return "device-h"


def _pass_cell(result: dict, k: int) -> str:
    return f"{_pct(result['pass@1'])} ({_pct(result['pass@k'][str(k)])})"


def _pct(x: float | None) -> str:
    return "—" if x is None or x != x else f"{100 * x:.1f}"


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.4g}"


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reports.build", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("dir", help="a run directory or a Hydra multirun directory")
    parser.add_argument("--rank-by", default=None, help=tables.Metric.__doc__.split(". ")[0])
    args = parser.parse_args(argv)
    try:
        for report in build(args.dir, args.rank_by):
            print(report)
            print(report.with_suffix(".html"))
    except (ReportError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
