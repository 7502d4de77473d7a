#!/usr/bin/env python3
"""Reasoning RL with entropy control on and off, same seed, same start: the issue-4 experiment.

    python scripts/entropy_control.py --store artifacts --out docs/tiny-run [overrides ...]

Composes the default config (plus the overrides, Hydra syntax), runs the plan's stages up to
four_stage/reasoning_rl (the teacher, the base student and the cold start come from the store
when it has them), then the reasoning-RL stage twice: with the config's entropy controller and
with `entropy.enabled=false` (the coefficient held at its initial value). Writes
`entropy_control.png` (token entropy per step and its trailing mean over 5 logged steps, both
runs, the target band shaded; the controlled run's coefficient on a second axis) and
`entropy_control.md` (per-run band occupancy of single steps and of the trailing mean, entropy
at start and end, final coefficient, accuracy) into --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

STAGE = "four_stage/reasoning_rl"


def run_arm(overrides: list[str], store: Path, run_dir: Path, saved: Path) -> list[dict]:
    """Run the plan up to the reasoning-RL stage; its metrics rows, in step order. The rows are
    also written to `saved`, and read back from there when the store already has the stage."""
    import torch

    from factory.environment import cpu_threads
    from factory.inspect import compose
    from factory.metrics import MetricsLogger
    from factory.pipeline import Pipeline
    from factory.plan import build_plan
    from factory.store import Store

    cfg = compose(overrides + [f"artifacts_dir={store}"])
    threads = cpu_threads(cfg.trainer.num_threads)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    plan = build_plan(cfg)
    names = [s.name for s in plan.stages]
    stages = plan.stages[: names.index(STAGE) + 1]
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLogger(run_dir, cfg.logger, run_name=run_dir.name, config_dict={})
    pipeline = Pipeline(Store(cfg.artifacts_dir), run_dir, metrics)
    try:
        for stage in stages:
            pipeline.run(stage)
    finally:
        metrics.close()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    mine = [r for r in rows if r.get("stage") == STAGE]
    if mine:
        saved.write_text("".join(json.dumps(r) + "\n" for r in mine))
    elif saved.exists():  # reused from the store: the rows its first run saved
        mine = [json.loads(line) for line in saved.open()]
    else:
        raise SystemExit(f"{STAGE} was reused from the store and {saved} is missing, so there "
                         f"are no steps to plot; use a fresh --store or change the RL settings")
    return cfg, mine


SMOOTH = 5  # logged steps in the trailing mean that estimates the policy's entropy


def trailing_mean(values: list[float], window: int = SMOOTH) -> list[float]:
    """Mean of each value and the window - 1 before it (fewer at the start): one batch's
    entropy is a noisy sample (+-0.02 nats here) of the policy's, which the band is about."""
    return [sum(values[max(0, i - window + 1): i + 1]) / (i + 1 - max(0, i - window + 1))
            for i in range(len(values))]


def summary(rows: list[dict], low: float, high: float, window: int = SMOOTH) -> dict:
    ent = [r["entropy"] for r in rows]
    inside = sum(low <= e <= high for e in ent)
    smooth = trailing_mean(ent, window)
    k = max(len(ent) // 10, 1)
    return {"steps": len(ent), "in_band": inside / len(ent),
            "smooth_in_band": sum(low <= e <= high for e in smooth) / len(ent),
            "entropy_first": sum(ent[:k]) / k, "entropy_last": sum(ent[-k:]) / k,
            "coef_last": rows[-1].get("entropy_coef", 0.0),
            "accuracy_last": sum(r["accuracy"] for r in rows[-k:]) / k}


def plot(arms: dict[str, list[dict]], low: float, high: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.axhspan(low, high, color="tab:green", alpha=0.12, label=f"target band [{low}, {high}]")
    colors = {"control on": "tab:blue", "control off": "tab:red"}
    for label, rows in arms.items():
        steps = [r["step"] for r in rows]
        ent = [r["entropy"] for r in rows]
        ax.plot(steps, ent, color=colors[label], alpha=0.35, linewidth=0.8,
                label=f"entropy per step, {label}")
        ax.plot(steps, trailing_mean(ent), color=colors[label], linewidth=2,
                label=f"trailing mean of {SMOOTH} logged steps, {label}")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("mean token entropy (nats)")
    ax2 = ax.twinx()
    on = arms["control on"]
    ax2.plot([r["step"] for r in on], [r.get("entropy_coef", 0.0) for r in on],
             color="tab:blue", linestyle=":", label="entropy coefficient, control on")
    ax2.set_ylabel("entropy coefficient")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="best", fontsize=8)
    ax.set_title("Reasoning RL (GRPO) on the tiny world: entropy control on vs off, same seed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", type=Path, default=REPO / "artifacts")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "tiny-run")
    ap.add_argument("--work", type=Path, default=Path("/tmp/entropy_control"))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    arms = {}
    cfg = None
    for label, extra in (("control on", []),
                         ("control off", ["pipeline.four_stage.reasoning_rl.entropy.enabled=false"])):
        slug = label.replace(" ", "_")
        args.out.mkdir(parents=True, exist_ok=True)
        cfg, rows = run_arm(args.overrides + extra, args.store, args.work / slug,
                            args.out / f"entropy_{slug}.jsonl")
        arms[label] = rows
    e = cfg.pipeline.four_stage.reasoning_rl.entropy
    low, high = e.target_low, e.target_high
    args.out.mkdir(parents=True, exist_ok=True)
    plot(arms, low, high, args.out / "entropy_control.png")
    lines = [
        f"| run | steps | share of steps in band | share in band, trailing mean of {SMOOTH} "
        "| entropy, first 10% | entropy, last 10% | final coefficient | accuracy, last 10% |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, rows in arms.items():
        s = summary(rows, low, high)
        lines.append(f"| {label} | {s['steps']} | {s['in_band']:.2f} | {s['smooth_in_band']:.2f} "
                     f"| {s['entropy_first']:.3f} "
                     f"| {s['entropy_last']:.3f} | {s['coef_last']:.3f} | "
                     f"{s['accuracy_last']:.3f} |")
    rl = cfg.pipeline.four_stage.reasoning_rl
    text = (f"Entropy control, reasoning RL: band [{low}, {high}], rule {e.rule}, rate {e.rate}, "
            f"max_coef {e.max_coef}; {rl.steps} steps, lr {rl.lr}, temperature "
            f"{rl.temperature}, {rl.prompts_per_batch} x {rl.group_size} samples per step. "
            f"Overrides: {' '.join(args.overrides) or '(none)'}\n\n" + "\n".join(lines) + "\n")
    (args.out / "entropy_control.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
