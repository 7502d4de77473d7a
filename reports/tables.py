"""The numbers a report shows, computed from a run's files: the Table-21 rows, which stages made
each model and what they cost, Pass@k curves, and for a sweep the swept keys and the ranking.

Cost attribution. A row's cost is what it took to make that model from its arm's starting point,
as Table 21 of the Qwen3 report counts it: the stages of the model's arm up to and including the
stage that wrote the model, in the order they ran. The base student's and the teacher's own
making are their own rows (the teacher's bootstrap is the flagship's sunk cost, DESIGN.md), and
evaluation is not a row's cost (it is in the stage breakdown). Teacher-side stages (generation,
logit recording, scoring) are charged to the distillation rows in full, and amortised: divided by
the number of runs whose ledgers point at the same teacher-side artifact (a sweep that shares a
cache pays for it once). A reused stage is counted at the cost recorded when its artifact was made
(`original`), so a report shows what an artifact cost, not only what this run paid for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from factory.evaluation import pass_at_k
from reports.artifacts import Run, finite, made_cost

H100_PEAK_FLOPS = 989e12  # dense bf16 tensor-core peak of an H100 SXM (no sparsity), FLOP/s
PASS_AT_K_MAX = 64

ROW_ORDER = ("teacher", "base", "off_policy", "on_policy", "cold_start", "grpo", "reasoning_rl",
             "fusion", "general_rl")
ARM_OF = {"teacher": "teacher", "base": "base", "off_policy": "distill", "on_policy": "distill",
          "cold_start": "four_stage", "grpo": "four_stage", "reasoning_rl": "four_stage",
          "fusion": "four_stage", "general_rl": "four_stage"}
# the four-stage arm's reasoning-RL stage is named reasoning_rl; its row may be labelled either way
STAGE_ALIASES = {"grpo": ("grpo", "reasoning_rl"), "reasoning_rl": ("reasoning_rl", "grpo")}
TITLES = {"teacher": "Teacher", "base": "Base student", "off_policy": "Off-policy distillation",
          "on_policy": "+ On-policy distillation", "cold_start": "Four-stage: long-CoT cold start",
          "grpo": "+ Reasoning RL (GRPO)", "reasoning_rl": "+ Reasoning RL (GRPO)",
          "fusion": "+ Thinking-mode fusion", "general_rl": "+ General RL"}
MODE_ORDER = ("think", "no_think")
LOWER_IS_BETTER = ("mean_response_tokens", "device_hours", "device_hours_amortised",
                   "h100_hours", "h100_hours_amortised")


def ordered_labels(labels) -> list[str]:
    """Teacher, base, the distillation rows, the four-stage rows, then unknown labels by name."""
    labels = set(labels)
    return [lb for lb in ROW_ORDER if lb in labels] + sorted(labels - set(ROW_ORDER))


def columns(evals: list[dict]) -> list[tuple[str, str]]:
    """(task, mode) pairs: tasks in the order met, modes thinking first."""
    tasks = list(dict.fromkeys(r.get("task", "?") for r in evals))
    modes = {r["mode"] for r in evals}
    mode_order = [m for m in MODE_ORDER if m in modes] + sorted(modes - set(MODE_ORDER))
    return [(t, m) for t in tasks for m in mode_order
            if any(r.get("task", "?") == t and r["mode"] == m for r in evals)]


def cells(evals: list[dict]) -> dict[tuple[str, str, str], dict]:
    return {(r["model"], r.get("task", "?"), r["mode"]): r for r in evals}


def headline_k(result: dict) -> int:
    """The k shown in parentheses: 64 (Table 21's Pass@64), else the largest k evaluated."""
    ks = [int(k) for k in result["pass@k"]]
    return PASS_AT_K_MAX if PASS_AT_K_MAX in ks else max(ks)


def pass_at_k_curve(result: dict, k_max: int = PASS_AT_K_MAX) -> tuple[list[int], list[float]]:
    """Pass@k for k = 1..min(k_max, n) from the per-problem counts, by the unbiased estimator."""
    per_problem = result["per_problem"]
    n_min = min(p["n"] for p in per_problem)
    ks = list(range(1, min(k_max, n_min) + 1))
    return ks, [float(np.mean([pass_at_k(p["n"], p["c"], k) for p in per_problem])) for k in ks]


def guess_baseline(evals: list[dict]) -> dict[str, dict[int, float]]:
    """Per task, the Pass@k that guessing from the training answers reaches (arith records it)."""
    out = {}
    for r in evals:
        if r.get("guess_baseline"):
            out.setdefault(r.get("task", "?"), {int(k): v for k, v in r["guess_baseline"].items()})
    return out


# ---------------------------------------------------------------- cost


def utilization(config: dict) -> float | None:
    """The utilisation the projected H100-hours assume (trainer.h100_utilization)."""
    value = (config.get("trainer") or {}).get("h100_utilization")
    return float(value) if finite(value) and value > 0 else None


def h100_hours(flops: float, util: float | None) -> float | None:
    if util is None:
        return None
    return flops / (H100_PEAK_FLOPS * util) / 3600


def teacher_side_shares(runs: list[Run]) -> dict[str, int]:
    """Teacher-side artifact path -> how many of `runs` point at it."""
    shares: dict[str, int] = {}
    for run in runs:
        for path in {e["artifact"] for e in run.stages if e.get("teacher_side")}:
            shares[path] = shares.get(path, 0) + 1
    return shares


def model_stage(run: Run, label: str) -> int | None:
    """Index in the ledger of the stage that wrote model `label`: the one its eval entries name in
    their notes (`model_stage`), else the label's arm's stage named `<...>/<label>`, else, for the
    teacher and the base (arms that make one model), their arm's last stage. None when no stage
    can be told: a row then claims no cost rather than a wrong one."""
    names = [e["stage"] for e in run.stages]
    for e in run.stages:
        named = (e.get("notes") or {}).get("model_stage")
        if e.get("arm") == "eval" and e["stage"].split("/")[1:2] == [label] and named in names:
            return names.index(named)
    arm = ARM_OF.get(label)
    stage_names = STAGE_ALIASES.get(label, (label,))
    found = [i for i, e in enumerate(run.stages)
             if e.get("arm") != "eval" and not e.get("teacher_side")
             and e["stage"].split("/")[-1] in stage_names and arm in (None, e.get("arm"))]
    if not found and arm in ("teacher", "base"):
        found = [i for i, e in enumerate(run.stages)
                 if e.get("arm") == arm and not e.get("teacher_side")]
    return found[-1] if found else None


def made_by(run: Run, index: int) -> list[int]:
    """Ledger indices of the stages that made the model written by stage `index`: its arm's
    stages up to it, with the teacher-side stages a distillation row used."""
    arm = run.stages[index].get("arm")
    out = []
    for i, e in enumerate(run.stages[: index + 1]):
        if e.get("arm") == "eval":
            continue
        if arm == "teacher" and e.get("teacher_side"):
            continue  # the teacher's generation and scoring serve distillation, not its making
        if e.get("arm") == arm or (arm == "distill" and e.get("teacher_side")):
            out.append(i)
    return out


@dataclass
class RowCost:
    stage: str  # the stage that wrote the model
    stages: list[str]  # every stage charged to the row
    device: str  # the devices that ran them, e.g. "cpu" or "NVIDIA H100 80GB HBM3"
    device_hours: float  # teacher-side charged in full
    device_hours_amortised: float
    teacher_side_hours: float  # the teacher-side part of device_hours
    flops: float
    flops_amortised: float
    h100_hours: float | None  # projected, teacher-side in full
    h100_hours_amortised: float | None


def row_cost(run: Run, label: str, shares: dict[str, int] | None = None) -> RowCost | None:
    index = model_stage(run, label)
    if index is None:
        return None
    shares = shares or {}
    hours = hours_amortised = teacher_hours = flops = flops_amortised = 0.0
    devices = []
    for i in made_by(run, index):
        e = run.stages[i]
        cost = made_cost(e)
        devices.append(cost["device"])
        share = max(1, shares.get(e["artifact"], 1)) if e.get("teacher_side") else 1
        hours += cost["device_hours"]
        hours_amortised += cost["device_hours"] / share
        flops += cost["flops"]
        flops_amortised += cost["flops"] / share
        if e.get("teacher_side"):
            teacher_hours += cost["device_hours"]
    util = utilization(run.config)
    return RowCost(stage=run.stages[index]["stage"],
                   stages=[run.stages[i]["stage"] for i in made_by(run, index)],
                   device=", ".join(dict.fromkeys(devices)), device_hours=hours,
                   device_hours_amortised=hours_amortised, teacher_side_hours=teacher_hours,
                   flops=flops, flops_amortised=flops_amortised,
                   h100_hours=h100_hours(flops, util),
                   h100_hours_amortised=h100_hours(flops_amortised, util))


def stage_breakdown(run: Run, shares: dict[str, int] | None = None) -> list[dict]:
    """One dict per ledger entry: what this run paid and what the artifact cost to make."""
    shares = shares or {}
    util = utilization(run.config)
    rows = []
    for e in run.stages:
        cost = made_cost(e)
        share = max(1, shares.get(e["artifact"], 1)) if e.get("teacher_side") else 1
        rows.append({"stage": e["stage"], "arm": e.get("arm", ""),
                     "teacher_side": bool(e.get("teacher_side")), "reused": bool(e.get("reused")),
                     "device": cost["device"], "device_count": cost["device_count"],
                     "wall_s": cost["wall_s"], "device_hours_this_run": e.get("device_hours", 0.0),
                     "device_hours": cost["device_hours"], "tokens": cost["tokens"],
                     "flops": cost["flops"], "h100_hours": h100_hours(cost["flops"], util),
                     "share": share})
    return rows


def stop_checks(run: Run) -> list[str]:
    """A line per stage that trained until a check passed (factory.loop.StopCheck): where it
    stopped, its last value and the target (from the notes recorded when it was made)."""
    lines = []
    for e in run.stages:
        src = (e.get("original") or {}) if e.get("reused") else e
        notes = src.get("notes") or {}
        checks = notes.get("checks") or []
        if "check_target" not in notes or not checks:
            continue
        step, value = checks[-1]
        verdict = ("reached" if notes.get("check_passed") else
                   "NOT reached: the stage ran out of steps and kept its last weights")
        lines.append(f"{e['stage']}: held-out Pass@1 {value:.3f} after {step} steps "
                     f"({len(checks)} checks), target {notes['check_target']:g} {verdict}")
    return lines


def device_kinds(run: Run) -> list[str]:
    """'cpu x2' / 'NVIDIA H100 ... x8': the devices the ledger's stages were made on."""
    return list(dict.fromkeys(f"{c['device']} x{c['device_count']}"
                              for c in map(made_cost, run.stages)))


# ---------------------------------------------------------------- sweeps

_SWEEP_FUNCTIONS = ("range(", "choice(", "glob(", "interval(", "shuffle(", "sort(", "tag(")


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def is_sweep_override(override: str) -> bool:
    """`loss=fkl,rkl` or `seed=range(3)` sweeps; `pipeline.eval.ks=[1,4]` does not."""
    if "=" not in override:
        return False
    value = override.split("=", 1)[1].strip()
    if value.startswith(_SWEEP_FUNCTIONS):
        return True
    depth, quote = 0, None
    for ch in value:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            return True
    return False


def swept_keys(multirun: dict | None, runs: list[Run]) -> list[str]:
    """The keys a sweep varied: multirun.yaml's sweep overrides, else the overrides whose values
    differ between the runs' .hydra/overrides.yaml."""
    task = (((multirun or {}).get("hydra") or {}).get("overrides") or {}).get("task") or []
    keys = [override_key(o) for o in task if is_sweep_override(o)]
    if keys:
        return list(dict.fromkeys(keys))
    values: dict[str, set] = {}
    for run in runs:
        for key, value in override_values(run).items():
            values.setdefault(key, set()).add(value)
    return [k for k, v in values.items() if len(v) > 1 or any(
        k not in override_values(r) for r in runs)]


def override_values(run: Run) -> dict[str, str]:
    return {override_key(o): o.split("=", 1)[1] for o in run.overrides if "=" in o}


def swept_value(run: Run, key: str) -> str:
    """The run's value for a swept key: its override, else the value in its config."""
    values = override_values(run)
    if key in values:
        return values[key]
    flat = flatten(run.config)
    return str(flat[key]) if key in flat else "?"


def flatten(tree, prefix: str = "") -> dict:
    out = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    out[prefix[:-1]] = tuple(tree) if isinstance(tree, list) else tree
    return out


_MISSING = object()


def differing_config_keys(runs: list[Run]) -> list[str]:
    """Config keys whose resolved values are not the same in every run."""
    flats = [flatten(r.config) for r in runs]
    keys = list(dict.fromkeys(k for f in flats for k in f))
    return [k for k in keys if len({repr(f.get(k, _MISSING)) for f in flats}) > 1]


# ---------------------------------------------------------------- ranking


@dataclass
class Metric:
    """`MODEL/MODE/FIELD`, `MODEL/TASK/MODE/FIELD` (FIELD: pass@1, pass@K, think_follow,
    mean_response_tokens) or `MODEL/COST` (COST: device_hours, device_hours_amortised,
    h100_hours, h100_hours_amortised). Pass@k and ThinkFollow rank high first, lengths and
    costs low first."""

    spec: str
    model: str
    field: str
    mode: str | None = None
    task: str | None = None
    higher_is_better: bool = field(init=False)

    def __post_init__(self):
        self.higher_is_better = self.field not in LOWER_IS_BETTER

    @classmethod
    def parse(cls, spec: str) -> "Metric":
        parts = spec.split("/")
        if len(parts) == 2 and parts[1] in LOWER_IS_BETTER[1:]:
            return cls(spec, parts[0], parts[1])
        if len(parts) == 3:
            return cls(spec, parts[0], parts[2], mode=parts[1])
        if len(parts) == 4:
            return cls(spec, parts[0], parts[3], mode=parts[2], task=parts[1])
        raise ValueError(
            f"--rank-by {spec!r}: expected MODEL/MODE/FIELD (e.g. on_policy/think/pass@1), "
            f"MODEL/TASK/MODE/FIELD, or MODEL/COST with COST one of "
            f"{', '.join(LOWER_IS_BETTER[1:])}")

    def value(self, run: Run, shares: dict[str, int] | None = None) -> float | None:
        if self.mode is None:
            cost = row_cost(run, self.model, shares)
            return None if cost is None else getattr(cost, self.field)
        for r in run.evals:
            if r["model"] == self.model and r["mode"] == self.mode and (
                    self.task is None or r.get("task") == self.task):
                if self.field == "pass@1":
                    return r["pass@1"]
                if self.field.startswith("pass@"):
                    return r["pass@k"].get(self.field.removeprefix("pass@"))
                return r.get(self.field)
        return None


def default_metric(runs: list[Run]) -> str:
    """The distilled student's thinking Pass@1 if a run has one, else the first student row's
    (the first row after the teacher) in its first mode."""
    evals = [r for run in runs for r in run.evals]
    if not evals:
        return "base/think/pass@1"
    labels = ordered_labels(r["model"] for r in evals)
    distilled = [lb for lb in ("on_policy", "off_policy") if lb in labels]
    students = [lb for lb in labels if lb != "teacher"] or labels
    model = distilled[0] if distilled else students[0]
    modes = [m for _, m in columns([r for r in evals if r["model"] == model])]
    mode = "think" if "think" in modes else modes[0]
    return f"{model}/{mode}/pass@1"


def rank(runs: list[Run], metric: Metric, shares: dict[str, int] | None = None
         ) -> list[tuple[Run, float | None]]:
    """Runs best first by `metric`; runs without it last; ties keep job order."""
    scored = [(run, metric.value(run, shares)) for run in runs]
    sign = -1 if metric.higher_is_better else 1
    return sorted(scored, key=lambda rv: (rv[1] is None, 0 if rv[1] is None else sign * rv[1]))


def title(label: str) -> str:
    return TITLES.get(label, label)
