"""The report's PNG plots, drawn with matplotlib's object API (no pyplot: no global backend or
figure state in the process that calls the report, which may be the training process's Hydra
callback). Each function writes one PNG and returns its path, or None when there is nothing to
draw."""

from __future__ import annotations

import io
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, ScalarFormatter

from reports import tables
from reports.artifacts import Run, finite, write_atomic

DPI = 110
ARM_COLORS = {"teacher": "#7f7f7f", "base": "#222222", "distill": "#1f77b4",
              "four_stage": "#ff7f0e", "eval": "#2ca02c"}
LABEL_COLORS = {"teacher": "#7f7f7f", "base": "#222222", "off_policy": "#6baed6",
                "on_policy": "#08519c", "cold_start": "#fdae6b", "grpo": "#fd8d3c",
                "fusion": "#e6550d", "general_rl": "#a63603"}
# logged per step but not training curves: bookkeeping
NOT_CURVES = {"stage", "step", "time", "lr", "tokens", "tokens_per_s"}
CURVE_ORDER = ("loss", "ce", "kl", "reward", "accuracy", "entropy", "entropy_coef")
MAX_PANELS = 12


def _save(fig: Figure, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    write_atomic(path, buf.getvalue())
    return path


def _hours_axis(ax) -> None:
    """Few ticks in scientific notation: tiny-world stages last a few core-seconds."""
    ax.xaxis.set_major_locator(MaxNLocator(4))
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 4))


def _grid(n: int, width: float = 4.2, height: float = 3.0):
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n)]
    return fig, axes


def pass_at_k(run: Run, path: Path) -> Path | None:
    """Pass@k against k (1..64, log scale) per model, one panel per task and mode."""
    cols = tables.columns(run.evals)
    if not cols:
        return None
    cell = tables.cells(run.evals)
    guess = tables.guess_baseline(run.evals)
    fig, axes = _grid(len(cols))
    for ax, (task, mode) in zip(axes, cols):
        for label in tables.ordered_labels(r["model"] for r in run.evals):
            result = cell.get((label, task, mode))
            if result is None:
                continue
            ks, values = tables.pass_at_k_curve(result)
            ax.plot(ks, values, marker="o", markersize=3, label=label,
                    markevery=[k - 1 for k in ks if k & (k - 1) == 0],  # at powers of two
                    color=LABEL_COLORS.get(label))
        if task in guess:
            ks = sorted(guess[task])
            ax.plot(ks, [guess[task][k] for k in ks], linestyle=":", color="#999999",
                    label="guessing")
        ax.set_xscale("log", base=2)
        ax.set_xticks([2**i for i in range(7) if 2**i <= max(2, ax.get_xlim()[1])])
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("k")
        ax.set_ylabel("Pass@k")
        ax.set_title(f"{task}, {mode}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def training_curves(run: Run, path: Path) -> Path | None:
    """Each logged quantity (loss, reward, entropy, KL, ...) against step, one line per stage."""
    keys = []
    for row in run.metrics:
        keys += [k for k, v in row.items() if k not in NOT_CURVES and finite(v)]
    keys = list(dict.fromkeys(keys))
    if not keys:
        return None

    def order(key):
        head = next((i for i, p in enumerate(CURVE_ORDER) if key == p or key.startswith(p + "_")
                     or key.endswith("_" + p)), len(CURVE_ORDER))
        return head, key

    keys = sorted(keys, key=order)[:MAX_PANELS]
    stages = list(dict.fromkeys(row["stage"] for row in run.metrics))
    fig, axes = _grid(len(keys))
    for ax, key in zip(axes, keys):
        for stage in stages:
            points = [(row["step"], row[key]) for row in run.metrics
                      if row["stage"] == stage and finite(row.get(key))]
            if points:
                xs, ys = zip(*sorted(points))
                ax.plot(xs, ys, marker="o" if len(xs) < 5 else None, markersize=3, label=stage)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def cost_breakdown(run: Run, shares: dict[str, int], path: Path) -> Path | None:
    """Left: device-hours to make each stage's artifact, coloured by arm (hatched: teacher-side).
    Right: each table row's device-hours, teacher-side in full and amortised."""
    stages = tables.stage_breakdown(run, shares)
    if not stages:
        return None
    labels = tables.ordered_labels(r["model"] for r in run.evals)
    costs = [(lb, tables.row_cost(run, lb, shares)) for lb in labels]
    costs = [(lb, c) for lb, c in costs if c is not None]
    fig = Figure(figsize=(11, max(3.0, 0.32 * max(len(stages), len(costs)) + 1.2)),
                 layout="constrained")
    ax = fig.add_subplot(1, 2, 1)
    ys = range(len(stages))
    ax.barh(list(ys), [s["device_hours"] for s in stages],
            color=[ARM_COLORS.get(s["arm"], "#bbbbbb") for s in stages],
            hatch=None, edgecolor="white")
    for y, s in zip(ys, stages):
        if s["teacher_side"]:
            ax.barh([y], [s["device_hours"]], color="none", hatch="///", edgecolor="#333333")
    ax.set_yticks(list(ys), [s["stage"] + (" (reused)" if s["reused"] else "") for s in stages],
                  fontsize=7)
    ax.invert_yaxis()
    _hours_axis(ax)
    ax.set_xlabel("device-hours to make (measured)")
    ax.set_title("cost per stage (colour: arm, hatched: teacher-side)")
    ax.grid(axis="x", alpha=0.3)
    if costs:
        ax2 = fig.add_subplot(1, 2, 2)
        ys = range(len(costs))
        ax2.barh([y - 0.2 for y in ys], [c.device_hours for _, c in costs], height=0.4,
                 color=[LABEL_COLORS.get(lb, "#bbbbbb") for lb, _ in costs],
                 label="teacher-side in full")
        ax2.barh([y + 0.2 for y in ys], [c.device_hours_amortised for _, c in costs], height=0.4,
                 color=[LABEL_COLORS.get(lb, "#bbbbbb") for lb, _ in costs], alpha=0.45,
                 label="teacher-side amortised")
        ax2.set_yticks(list(ys), [lb for lb, _ in costs], fontsize=8)
        ax2.invert_yaxis()
        _hours_axis(ax2)
        ax2.set_xlabel("device-hours (measured)")
        ax2.set_title("cost per model row")
        ax2.grid(axis="x", alpha=0.3)
        ax2.legend(fontsize=7)
    return _save(fig, path)


def sweep_ranking(ranked: list[tuple[Run, float | None]], metric: str, names: list[str],
                  path: Path) -> Path | None:
    """The ranking metric per run, best first."""
    values = [v for _, v in ranked]
    if not any(v is not None for v in values):
        return None
    fig = Figure(figsize=(7, 0.4 * len(ranked) + 1.5), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    ys = list(range(len(ranked)))
    ax.barh(ys, [v if v is not None else 0.0 for v in values], color="#1f77b4")
    ax.set_yticks(ys, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(metric)
    ax.set_title("runs ranked by " + metric)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)
