"""The run's summary: Pass@k per model and mode, next to what each arm cost (from the ledger).
Printed at the end of a run and saved as `summary.json`; the full report is reports/'s job."""

from __future__ import annotations

from collections import defaultdict

from factory.ledger import Ledger


def summarize(evals: dict[str, dict], ledger: Ledger, wall_s: float | None = None) -> dict:
    """Rows are models; a run evaluated on several tasks (pipeline.eval.tasks) has one row per
    model and task, labelled `model (task)`. `wall_s`: the run's elapsed time over its stages
    (default: the stages' times added up, which is the same when none overlapped)."""
    rows: dict[str, dict] = defaultdict(dict)
    guess = None
    several = len({r.get("task") for r in evals.values()}) > 1
    for result in evals.values():
        label = f"{result['model']} ({result['task']})" if several else result["model"]
        rows[label][result["mode"]] = {
            "pass@1": result["pass@1"],
            "pass@k": {int(k): v for k, v in result["pass@k"].items()},
            "think_follow": result["think_follow"],
            "mean_response_tokens": result["mean_response_tokens"],
            "n_problems": len(result["per_problem"]),
            "n_samples": result["n_samples"],
        }
        guess = result.get("guess_baseline", guess)
    cost: dict[str, dict] = defaultdict(lambda: {"wall_s": 0.0, "device_hours": 0.0,
                                                  "made_wall_s": 0.0, "tokens": 0})
    for e in ledger.entries:
        c = cost[e.arm]
        c["wall_s"] += e.wall_s
        c["device_hours"] += e.device_hours
        c["tokens"] += e.tokens
        c["made_wall_s"] += (e.original or {}).get("wall_s", 0.0) if e.reused else e.wall_s
    stage_wall = sum(e.wall_s for e in ledger.entries)
    return {"models": dict(rows), "guess_baseline": guess, "cost": dict(cost),
            # elapsed, not summed: background evals overlap the training stages
            "total_wall_s": stage_wall if wall_s is None else wall_s,
            "stage_wall_s": stage_wall}


def format_table(summary: dict) -> str:
    lines = []
    modes = sorted({m for r in summary["models"].values() for m in r}, reverse=True)
    width = max([12, *(len(model) for model in summary["models"])])
    header = f"{'model':<{width}}" + "".join(
        f"{m + ' pass@1':>16}{m + ' pass@k':>18}{'follow':>8}" for m in modes)
    lines += [header, "-" * len(header)]
    for model, by_mode in summary["models"].items():
        cells = ""
        for m in modes:
            r = by_mode.get(m)
            if r is None:
                cells += f"{'-':>16}{'-':>18}{'-':>8}"
                continue
            k = max(r["pass@k"])
            cells += f"{r['pass@1']:>16.3f}{r['pass@k'][k]:>13.3f} (k={k:<2})" \
                     f"{r['think_follow']:>8.2f}"
        lines.append(f"{model:<{width}}{cells}")
    if summary.get("guess_baseline") is not None:
        g = summary["guess_baseline"]
        lines.append(f"guessing baseline (answers drawn from the train answer distribution): "
                     + ", ".join(f"pass@{k} {v:.3f}" for k, v in g.items()))
    lines.append("cost by arm: " + ", ".join(
        f"{arm} {c['device_hours']:.4f} device-h this run ({c['made_wall_s']:.0f} s to make)"
        for arm, c in summary["cost"].items()))
    overlap = summary.get("stage_wall_s", summary["total_wall_s"]) - summary["total_wall_s"]
    lines.append(f"wall time of this run: {summary['total_wall_s']:.0f} s"
                 + (f" (its stages' times add up to {summary['stage_wall_s']:.0f} s: stages ran "
                    "on two processes at once)" if overlap > 1 else ""))
    return "\n".join(lines)
