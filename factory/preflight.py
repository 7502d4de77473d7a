"""Checks a run makes before any compute, each refusing with a message that names the value, the
estimate and the fix (docs/errors.md lists every case, its message and its test).

`preflight(cfg)` runs them cheapest first, after the pair's vocabulary check (run.py):

    numerics   trainer.on_nonfinite and trainer.loss_spike_factor are valid (factory/guards.py)
    eval       every k of pipeline.eval.ks is in [1, pipeline.eval.n_samples] (Pass@k needs k <= n)
    top-k      the logit cache's top-k fits the teacher's vocabulary
    memory     the plan's peak memory, estimated from the cards (factory/dry_run.py: weights,
               gradients and AdamW moments at 16 bytes a trained parameter, activations, logits,
               an in-process teacher), fits what the trainer's device has free
    disk       the logit cache, at most (every response max_new_tokens long) tokens x bytes per
               token, fits the free disk under artifacts_dir (skipped when the store has it)
    tasks      every task's data loads: a missing, empty or malformed file is refused naming the
               file and line; a code task's sandbox can run (or the user opted out of it)
    sources    pretrained checkpoints resolve (config.json found and matching the card), offline
               or not

It returns the estimates, for run() to log.
"""

from __future__ import annotations

import logging
import shutil

from factory.dry_run import STATE_BYTES_PER_PARAM, plan_costs
from factory.errors import ConfigError
from factory.guards import check_guard_config
from factory.pipeline import stage_key
from factory.plan import build_plan, eval_tasks
from factory.store import Store
from factory.tasks.registry import build_task
from students.builders import count_params, resolve_pretrained
from students.compat import CONF_DIR, cards, mismatches
from teachers.cache import CacheSpec

log = logging.getLogger(__name__)
GIB = 2**30

# what a part of dry_run's memory estimate is, for the message
_PARTS = {
    "states": "{model}'s training state, 16 bytes x {params} (fp32 weights, gradients, "
              "AdamW's two moments)",
    "activations": "activations",
    "logits": "logits",
    "gathered_layers": "FSDP's gathered layers",
    "ref_model": "a frozen reference copy of {model}",
    "teacher": "the in-process teacher {teacher}'s weights",
    "weights": "{model}'s weights",
}


def preflight(cfg, background: bool = False, background_training: bool = False) -> dict:
    """Run every check (module docstring); return the memory and disk estimates. `background`:
    a worker process evaluates beside training (factory/background.py), and with
    `background_training` trains too, so the memory check counts what it may hold beside the
    largest training stage (check_memory)."""
    check_guard_config(cfg.trainer)
    check_eval_ks(cfg.pipeline.eval)
    distills = "distill" in cfg.pipeline.stages
    if distills:
        check_cache_k(cfg)
    estimates = {"memory": (check_memory(cfg, background, background_training)
                            if cfg.trainer.check_memory else None),
                 "disk": check_disk(cfg) if distills else None}
    check_tasks(cfg)
    check_sources(cfg)
    return estimates


# ---------------------------------------------------------------------------- config values


def check_eval_ks(eval_cfg) -> None:
    n = eval_cfg.n_samples
    bad = [k for k in eval_cfg.ks if not 1 <= k <= n]
    if bad:
        raise ConfigError(
            f"pipeline.eval.ks={list(eval_cfg.ks)} asks for Pass@k at k={bad[0]} but "
            f"pipeline.eval.n_samples={n}: Pass@k needs 1 <= k <= n samples per problem. Raise "
            f"pipeline.eval.n_samples to at least {max(bad)} or drop {bad} from pipeline.eval.ks")


def check_cache_k(cfg) -> None:
    k, vocab, mode = cfg.pipeline.cache.k, cfg.teacher.arch.vocab_size, cfg.pipeline.cache.mode
    if mode == "topk" and k > vocab:
        raise ConfigError(
            f"pipeline.cache.k={k} is larger than teacher {cfg.teacher.name}'s vocabulary "
            f"({vocab} tokens): a top-k cache cannot hold more ids than there are. Set "
            f"pipeline.cache.k to at most {vocab}, or pipeline.cache.mode=sampled (k draws with "
            f"replacement)")
    if k < 1:
        raise ConfigError(f"pipeline.cache.k must be >= 1, got {k}")


# ---------------------------------------------------------------------------- memory


def available_memory(device: str) -> tuple[float, str]:
    """(bytes free for the run, where they were measured) on the trainer's device."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"trainer.device=cuda but torch {torch.__version__} sees no CUDA "
                              f"device here: use trainer=cpu, or run where a GPU is visible")
        free, _ = torch.cuda.mem_get_info()
        return float(free), f"free on {torch.cuda.get_device_name()} (torch.cuda.mem_get_info)"
    import psutil

    return float(psutil.virtual_memory().available), "available system memory (psutil)"


def _stage_need(row: dict) -> float:
    """Bytes a stage needs at its peak: its total, or loading the full fp32 model first."""
    parts = row["memory_parts_gib"]
    return max(row["memory_gib"], parts.get("load_peak", 0.0)) * GIB


def check_memory(cfg, background: bool = False, background_training: bool = False) -> dict:
    """Refuse a plan whose peak stage needs more memory than the trainer's device has free
    (estimated from the cards by factory/dry_run.py, before any weight loads). With
    `background`, an evaluation may run in the worker beside any training stage, and with
    `background_training` another training stage too: the peak is then the largest training
    stage plus the largest other stage the worker may hold, when that is more."""
    costs = plan_costs(cfg)
    peak = max(costs["stages"], key=_stage_need)
    # CPU processes of one launch share the host's memory; GPUs are checked one device each
    processes = costs["devices"]["count"] if cfg.trainer.device == "cpu" else 1
    need = _stage_need(peak) * processes
    beside = None  # the worker's stage, when running it beside a training stage raises the peak
    trains = [s for s in costs["stages"] if not s["stage"].startswith("eval/")]
    in_worker = []  # what the worker may run beside the main process's training
    if background:
        in_worker += [s for s in costs["stages"] if s["stage"].startswith("eval/")]
    if background_training:
        in_worker += trains
    for worker in in_worker:
        others = [s for s in trains if s is not worker]
        if others and _stage_need(top := max(others, key=_stage_need)) + _stage_need(worker) > need:
            peak, beside, need = top, worker, _stage_need(top) + _stage_need(worker)
    available, where = available_memory(cfg.trainer.device)
    estimate = {"stage": peak["stage"], "need_gib": need / GIB, "available_gib": available / GIB,
                "measured": where, "parts_gib": peak["memory_parts_gib"]}
    if beside is not None:
        estimate["background"] = {"stage": beside["stage"], "gib": _stage_need(beside) / GIB}
    log.info("memory: stage %s%s needs about %.3g GiB (%s: %.3g GiB)", peak["stage"],
             "" if beside is None else f" with {beside['stage']} beside it", need / GIB, where,
             available / GIB)
    if need <= available:
        return estimate
    raise ConfigError(_memory_message(cfg, peak, need, available, where, processes, beside))


def _memory_message(cfg, peak: dict, need: float, available: float, where: str,
                    processes: int, beside: dict | None = None) -> str:
    card = cfg.student if peak["model"] == cfg.student.name else cfg.teacher
    fields = {"model": card.name, "teacher": cfg.teacher.name,
              "params": f"{count_params(card)['total'] / 1e9:.3g}B params"}
    parts = [f"{_PARTS[k].format(**fields)}: {v:.3g} GiB"
             for k, v in peak["memory_parts_gib"].items() if k in _PARTS and v >= 0.01]
    per = f" x {processes} processes" if processes > 1 else ""
    options = []
    smaller = [(c.name, count_params(c)["total"] * STATE_BYTES_PER_PARAM)
               for c in cards(CONF_DIR, "student") if not mismatches(c, cfg.teacher)]
    fit = [(name, b) for name, b in smaller
           if name != cfg.student.name and b * processes < available]
    if fit:
        options.append("a smaller student (" + ", ".join(
            f"student={name}: training state {b / GIB:.3g} GiB" for name, b in fit) + ")")
    options.append("train on GPUs (trainer=gpu; trainer.accelerate_config=fsdp shards the "
                   "training state over the devices; add dry_run=true to print the estimate "
                   "per device)")
    holds_teacher = any(s and s["memory_parts_gib"].get("teacher", 0.0) >= 0.01
                        for s in (peak, beside))
    if holds_teacher and cfg.backend.name == "hf":
        options.append("run the teacher on other nodes (backend=vllm_server backend.url=...)")
    options.append("skip this check where the estimate is wrong for this machine "
                   "(trainer.check_memory=false)")
    if beside is not None:
        what = "evaluation" if beside["stage"].startswith("eval/") else "stage"
        parts.append(f"the background {what} {beside['stage']} beside it: "
                     f"{_stage_need(beside) / GIB:.3g} GiB")
        options.insert(0, "evaluate in the main process, after training "
                          "(pipeline.eval.background=false)" if what == "evaluation" else
                          "keep training stages out of the worker "
                          "(pipeline.background_training=false)")
    return (f"stage {peak['stage']} needs about {need / GIB:.3g} GiB{per} of "
            f"{cfg.trainer.device} memory, estimated from the cards before loading anything "
            f"({'; '.join(parts)}), but {available / GIB:.3g} GiB is {where}. Options: "
            + "; ".join(options))


# ---------------------------------------------------------------------------- disk


def cache_spec(cfg) -> CacheSpec:
    c = cfg.pipeline.cache
    return CacheSpec(k=c.k, mode=c.mode, encoding=c.encoding,
                     vocab_size=cfg.teacher.arch.vocab_size,
                     teacher=cfg.teacher.name, logprob_bits=c.logprob_bits)


def check_disk(cfg) -> dict | None:
    """Refuse a run whose logit cache, at most, does not fit the free disk under artifacts_dir.
    Skipped when the store already holds the cache (a rerun) or the prompt count is open."""
    plan = build_plan(cfg)
    keys: dict[str, str] = {}
    record = None
    for stage in plan.stages:
        keys[stage.name] = stage_key(stage, keys)
        if stage.kind == "cache":
            record = stage
    gen = cfg.pipeline.generate
    if record is None or gen.n_prompts == 0:
        return None
    store = Store(cfg.artifacts_dir)
    if store.path(record.kind, keys[record.name]).exists():
        return None  # recorded already: a rerun reads it
    caps = {"think": cfg.teacher.thinking.max_new_tokens,
            "no_think": cfg.teacher.non_thinking.max_new_tokens}
    max_tokens = sum(caps[mode] for mode in gen.modes)
    tokens = gen.n_prompts * gen.n_per_prompt * max_tokens
    row_bytes = cache_spec(cfg).row_bytes
    need = tokens * row_bytes
    existing = next(p for p in (store.root, *store.root.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    estimate = {"cache_gib_at_most": need / GIB, "free_gib": free / GIB, "at": str(existing)}
    if need <= free:
        return estimate
    compact = ", pipeline.cache.encoding=compact" if cfg.pipeline.cache.encoding == "plain" else ""
    raise ConfigError(
        f"the logit cache may need up to {need / GIB:.3g} GiB ({gen.n_prompts} prompts x "
        f"{gen.n_per_prompt} per prompt x {max_tokens} new tokens at most over the modes "
        f"{list(gen.modes)} x {row_bytes} bytes per token at k={cfg.pipeline.cache.k}, "
        f"{cfg.pipeline.cache.encoding}) but only {free / GIB:.3g} GiB is free at {existing}. Free "
        f"space, point artifacts_dir at a larger disk, or shrink the cache: fewer prompts "
        f"(pipeline.generate.n_prompts), a smaller pipeline.cache.k{compact}, or lower "
        f"max_new_tokens (teacher.thinking.max_new_tokens, teacher.non_thinking.max_new_tokens)")


# ---------------------------------------------------------------------------- data and sources


def check_tasks(cfg) -> None:
    """Load every evaluated task's test problems (and the run's training prompts where the plan
    reads them), so a missing, empty or malformed file stops the run now, naming the line."""
    trains = any(g in cfg.pipeline.stages for g in ("distill", "four_stage"))
    for task_cfg in eval_tasks(cfg):
        task = build_task(task_cfg)
        task.problems("test", cfg.pipeline.eval.n_problems)
        if trains and task_cfg is cfg.task:
            task.problems("train", 1)
        if task_cfg.kind == "code":
            check_sandbox(task_cfg)


def check_sandbox(task_cfg) -> None:
    """A code task runs generated programs only in bubblewrap, unless the user opted into the
    weaker process sandbox (factory/tasks/code.py, docs/sandbox.md)."""
    from factory.tasks import code

    if task_cfg.sandbox == "process":
        return
    usable, why = code.sandbox_status(task_cfg.sandbox)
    if not usable:
        raise ConfigError(
            f"task {task_cfg.name!r} grades generated code, which runs only inside the "
            f"bubblewrap sandbox, and that cannot run here: {why}. Install bubblewrap "
            f"(apt-get install bubblewrap; docs/sandbox.md), or accept the weaker sandbox (a "
            f"plain subprocess with rlimits that can read the host's files and reach the "
            f"network) with task.sandbox=process")


def check_sources(cfg) -> None:
    """Resolve every pretrained checkpoint the run loads: its config.json must be found (a
    local Hugging Face directory, or the hub, offline or not) and match the card."""
    cards_used = [cfg.student]
    teacher_in_use = "teacher" in cfg.pipeline.stages and cfg.backend.name != "vllm_server"
    if teacher_in_use and not cfg.teacher.bootstrap.enabled:
        cards_used.append(cfg.teacher)
    for card in cards_used:
        if card.pretrained is not None:
            resolve_pretrained(card)
