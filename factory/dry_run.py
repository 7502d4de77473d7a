"""`dry_run=true`: the whole plan of a run, costed from the cards and the config alone.

    python -m factory.run experiment=qwen3-8b-table21 dry_run=true

composes the plan a real run would execute (`factory.plan.build_plan`, so a config that a real
run would refuse at planning is refused here too), builds the student on the meta device (its
decoder layer class, checked against the FSDP wrap unit) and counts both cards' parameters the
same way (`students.builders.count_params`), then derives for every stage:

* **tokens**, at the length caps: every sampled response `max_new_tokens` long, every training
  row `max_len` long. They are upper bounds; prompts of sampled stages are left out (a few
  hundred tokens against responses of thousands).
* **FLOPs** by the ledger's formulas (factory/flops.py): 6·N per trained token, 2·N per sampled
  or scored token, N the active parameters of the model doing the work (the teacher's 22B for
  Qwen3-235B-A22B when it generates, records or scores).
* **projected H100-hours**: FLOPs / (989 TFLOP/s x trainer.h100_utilization), the report's
  projection. One utilisation for every stage: decoding runs far below it, so sampled stages
  are optimistic.
* **memory per device**: for training stages, fp32 weights + fp32 grads + AdamW's two fp32
  moments (16 bytes a parameter, split over the devices under FSDP full shard) + activations
  (`activation_bytes`) + logits (`logits_bytes`) + an in-process teacher; for the others, the
  weights the stage loads per device.

The devices come from `trainer.accelerate_config` (conf/accelerate/*.yaml, read by accelerate's
own loader): process count, FSDP or not, activation checkpointing. Nothing is loaded or
downloaded and the artifact store is not touched; the summary is printed and saved as
`dry_run.json` in the run directory.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from factory.errors import ConfigError
from factory.flops import forward_flops, projected_h100_hours, train_flops, weights_bytes
from factory.losses import chunk_rows
from factory.plan import build_plan, eval_tasks
from factory.store import write_json_atomic
from students.builders import build_model, count_params

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
GIB = 2**30
H100_MEMORY_GIB = 80.0  # an H100 SXM's HBM3; torch sees ~79 GiB of it
# fp32 weights + fp32 grads + AdamW exp_avg and exp_avg_sq in fp32: stages train fp32 master
# weights (load_model(dtype="float32")) under bf16 autocast
STATE_BYTES_PER_PARAM = 16
# per logit of a token: the logits in the compute dtype, their fp32 log-softmax and its gradient
LOGIT_EXTRA_BYTES = 8
TRAIN_SPLIT_KINDS = ("generate", "cold_start", "reasoning_rl", "fusion", "general_rl")


# ---------------------------------------------------------------------------- devices


@dataclass(frozen=True)
class Devices:
    """What the training processes run on, as the accelerate config launches them."""

    count: int = 1
    fsdp: bool = False  # parameters, grads and optimizer states split over `count`
    checkpointing: bool = False  # activation checkpointing per wrapped layer
    wrap_class: str | None = None  # the FSDP wrap unit
    config_file: str | None = None


def accelerate_config_path(name: str, conf_dir: Path = CONF_DIR) -> Path:
    """`trainer.accelerate_config`: a name in conf/accelerate/ or a path to a config file."""
    path = Path(name).expanduser()
    if path.suffix in (".yaml", ".yml", ".json") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"trainer.accelerate_config: no such file {str(path)!r}")
        return path
    path = conf_dir / "accelerate" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (conf_dir / "accelerate").glob("*.yaml"))
        raise ConfigError(f"trainer.accelerate_config={name!r} is not in conf/accelerate/ "
                          f"({', '.join(known)}); name one of them or a path to an accelerate "
                          f"config file")
    return path


def training_devices(trainer_cfg, conf_dir: Path = CONF_DIR) -> Devices:
    """The devices of `trainer_cfg.accelerate_config` (one process when it is null)."""
    if trainer_cfg.accelerate_config is None:
        return Devices()
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    path = accelerate_config_path(trainer_cfg.accelerate_config, conf_dir)
    try:
        launch = load_config_from_file(str(path))  # refuses unknown top-level keys
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{path} is not an accelerate config file: {err}") from None
    fsdp = launch.distributed_type == DistributedType.FSDP
    options = launch.fsdp_config or {}
    return Devices(count=max(int(launch.num_processes), 1), fsdp=fsdp,
                   checkpointing=fsdp and bool(options.get("fsdp_activation_checkpointing")),
                   wrap_class=options.get("fsdp_transformer_layer_cls_to_wrap") if fsdp else None,
                   config_file=str(path))


def decoder_layer_class(card) -> str:
    """The class name of a card's decoder layers, from a meta-device build (no memory)."""
    model = build_model(card, init="meta")
    return type(model.model.layers[0]).__name__


# ---------------------------------------------------------------------------- memory


def layer_activation_elems(arch) -> int:
    """Elements one decoder layer keeps per token for its backward, recomputing nothing: the
    inputs and outputs of its two RMSNorms (4·h), q and k before and after QK-norm and RoPE, v,
    and the attention output (3·q + 3·kv: flash attention keeps no score matrix), and the SwiGLU
    MLP's gate, up and their product (3·I). Per-layer activations of Korthikanti et al. 2022
    ("Reducing activation recomputation"), for Qwen3's layer."""
    q = arch.num_attention_heads * arch.head_dim
    kv = arch.num_key_value_heads * arch.head_dim
    return 4 * arch.hidden_size + 3 * q + 3 * kv + 3 * arch.intermediate_size


def activation_bytes(arch, tokens: int, checkpointing: bool, dtype_bytes: int) -> float:
    """Activation memory of one micro-batch of `tokens` tokens on a device. Checkpointed, each
    layer keeps only its input (h per token) and one layer at a time is recomputed in full."""
    full = layer_activation_elems(arch)
    layers = arch.num_hidden_layers
    kept = layers * arch.hidden_size + full if checkpointing else layers * full
    return kept * tokens * dtype_bytes


def logits_bytes(arch, tokens: int, dtype_bytes: int) -> float:
    """Logits held at once for `tokens` tokens: the compute-dtype logits, their fp32
    log-softmax and its gradient, over the vocabulary."""
    return tokens * arch.vocab_size * (dtype_bytes + LOGIT_EXTRA_BYTES)


def layer_params(arch, total: int) -> int:
    """Parameters of one decoder layer: the total less the embedding and LM head, per layer."""
    embedding = arch.vocab_size * arch.hidden_size * (1 if arch.tie_word_embeddings else 2)
    return (total - embedding) // arch.num_hidden_layers


@dataclass
class Micro:
    """One micro-batch of a training stage: rows of `seq_len` tokens, and how its loss meets
    the vocabulary (full logits for every token, or `chunk` tokens at a time)."""

    rows: int
    seq_len: int
    chunk: int | None = None  # None: the whole micro-batch's logits at once; 0: auto (chunk_rows)
    ref_model: bool = False  # a frozen copy of the starting model (GRPO with kl_coef > 0)
    teacher_in_process: bool = False  # the teacher scores from inside the training process


def training_memory(card, devices: Devices, micro: Micro, precision: str,
                    teacher_per_device: float = 0.0) -> dict[str, float]:
    """Bytes per device while a stage trains, by part; "total" sums them. Under FSDP,
    `load_peak` is the moment before sharding: load_model puts the whole fp32 model on every
    device first."""
    arch, total = card.arch, count_params(card)["total"]
    dtype_bytes = 2 if precision in ("bf16", "fp16") else 4
    rows = math.ceil(micro.rows / devices.count)  # each rank trains its share of the rows
    tokens = rows * micro.seq_len
    shards = devices.count if devices.fsdp else 1
    parts = {
        "states": total * STATE_BYTES_PER_PARAM / shards,
        # FSDP gathers a layer's parameters for its forward/backward, and prefetches the next
        "gathered_layers": 2 * layer_params(arch, total) * dtype_bytes if devices.fsdp else 0.0,
        "activations": activation_bytes(arch, tokens, devices.checkpointing, dtype_bytes),
        "logits": logits_bytes(arch, tokens if micro.chunk is None else
                               min(tokens, chunk_rows(micro.chunk, arch.vocab_size)), dtype_bytes),
        "ref_model": total * 4.0 if micro.ref_model else 0.0,
        "teacher": teacher_per_device if micro.teacher_in_process else 0.0,
    }
    parts["total"] = sum(parts.values())
    if devices.fsdp:
        parts["load_peak"] = total * 4.0
    return parts


def weights_per_device(card, backend_name: str, in_backend: bool) -> float:
    """Bytes of weights per device for a stage that only runs the model forward: through a vLLM
    backend split over the card's tensor-parallel ranks; otherwise (transformers, and every eval,
    which loads the model in-process) whole on one device."""
    quantization = getattr(card, "quantization", None)  # teacher cards only
    size = weights_bytes(count_params(card)["total"], quantization or card.dtype)
    if in_backend and backend_name in ("vllm", "vllm_server"):
        return size / max(card.tensor_parallel, 1)
    return size


# ---------------------------------------------------------------------------- tokens per stage


@dataclass
class Work:
    """What a stage computes: tokens trained (6·N), run forward (2·N) by the stage's model, and
    scored by the teacher (2·N of the teacher); `micro` for a training stage."""

    trained: int = 0
    forward: int = 0
    teacher: int = 0
    micro: Micro | None = None
    unknown: str | None = None  # why a count could not be derived (it is counted as 0)


def stage_kind(stage) -> str:
    """The kind of a plan stage, from its name (factory/plan.py names them `arm/kind`, and
    evaluations `eval/...`)."""
    if stage.name.startswith("eval/"):
        return "eval"
    kind = stage.name.rsplit("/", 1)[-1]
    if kind == "base":  # student/base: the card's published weights, or pretrained from scratch
        return "pretrain" if "block_len" in stage.inputs else "source"
    return kind


def pretrain_work(inputs: dict) -> Work:
    rows = inputs["batch_size"]
    return Work(trained=inputs["steps"] * inputs["grad_accum"] * rows * inputs["block_len"],
                micro=Micro(rows, inputs["block_len"]))


def sft_work(stage_inputs: dict) -> Work:
    """SFT sizes: the teacher bootstrap's sft stage (no accumulation), and the cold start's and
    fusion's `stage` slice (with grad_accum)."""
    s = stage_inputs
    accum = s["grad_accum"] if "grad_accum" in s else 1
    return Work(trained=s["steps"] * accum * s["batch_size"] * s["max_len"],
                micro=Micro(s["batch_size"], s["max_len"]))


def generate_work(inputs: dict) -> Work:
    n = inputs["n_prompts"]
    if n == 0:
        return Work(unknown="pipeline.generate.n_prompts=0 (all the task's training prompts): "
                            "set it to count them")
    per_prompt = sum(inputs["sampling"][m]["max_new_tokens"] for m in inputs["modes"])
    return Work(forward=n * inputs["n_per_prompt"] * per_prompt)


def off_policy_work(inputs: dict, chunk: int) -> Work:
    s = inputs["stage"]
    return Work(trained=s["steps"] * s["grad_accum"] * s["batch_size"] * s["max_len"],
                micro=Micro(s["batch_size"], s["max_len"], chunk=chunk))


def on_policy_work(inputs: dict, chunk: int, teacher_in_process: bool) -> Work:
    s = inputs["stage"]
    rows = s["batch_size"] * s["n_per_prompt"]  # sequences per step
    sampled = round(s["steps"] * s["gkd_lambda"]) * rows * s["max_new_tokens"]
    return Work(trained=s["steps"] * rows * s["max_len"], forward=sampled, teacher=sampled,
                micro=Micro(math.ceil(rows / s["grad_accum"]), s["max_len"], chunk=chunk,
                            teacher_in_process=teacher_in_process))


def grpo_work(inputs: dict) -> Work:
    """A sampled batch serves `passes` steps; its old log-probs come from the first pass's own
    forward, so sampling (and the reference model, with kl_coef > 0) are the only extra
    forwards."""
    s = inputs["stage"]
    rows = s["prompts_per_batch"] * s["group_size"]
    sampled = math.ceil(s["steps"] / s["passes"]) * rows * s["max_new_tokens"]
    ref = sampled if s["kl_coef"] > 0 else 0
    return Work(trained=s["steps"] * rows * s["max_new_tokens"], forward=sampled + ref,
                micro=Micro(math.ceil(rows / s["grad_accum"]), s["max_new_tokens"],
                            chunk=s["chunk_size"], ref_model=s["kl_coef"] > 0))


def fusion_work(inputs: dict) -> Work:
    s = inputs["stage"]
    sampled = s["n_prompts"] * s["samples_per_prompt"] * s["sampling"]["max_new_tokens"]
    trained = sft_work(s)
    return Work(trained=trained.trained, forward=sampled, micro=trained.micro)


def eval_work(inputs: dict) -> Work:
    caps = [n for n in (inputs["n_problems"], inputs["task"]["n_test"]) if n > 0]
    if not caps:
        return Work(unknown=f"task {inputs['task']['name']}: pipeline.eval.n_problems=0 and "
                            f"task.n_test=0 (all problems): set either to count them")
    return Work(forward=min(caps) * inputs["n_samples"] * inputs["sampling"]["max_new_tokens"])


# ---------------------------------------------------------------------------- the plan, costed


@dataclass
class StageEstimate:
    stage: str
    arm: str
    model: str  # the card whose parameters do the work
    trained_tokens: int
    forward_tokens: int
    teacher_tokens: int
    flops: float
    h100_hours: float
    memory_gib: float  # per device
    memory_parts_gib: dict = field(default_factory=dict)
    note: str | None = None


def stage_work(stage, cfg, estimates: dict[str, Work]) -> Work:
    """Dispatch on the stage's kind; `estimates` holds the earlier stages' work (record reads
    the generate stage's)."""
    kind, inputs = stage_kind(stage), stage.inputs
    in_process = cfg.backend.name != "vllm_server"
    if kind == "source":
        return Work()
    if kind == "pretrain":
        return pretrain_work(inputs)
    if kind == "sft":
        return sft_work(inputs)
    if kind == "cold_start":
        return sft_work(inputs["stage"])
    if kind == "generate":
        return generate_work(inputs)
    if kind == "record":  # the teacher scores every response it wrote
        written = next(estimates[n] for n in stage.needs if n.endswith("/generate"))
        return Work(forward=written.forward, unknown=written.unknown)
    if kind == "off_policy":
        return off_policy_work(inputs, cfg.loss.chunk_size)
    if kind == "on_policy":
        return on_policy_work(inputs, cfg.loss.chunk_size, in_process)
    if kind in ("reasoning_rl", "general_rl"):
        return grpo_work(inputs)
    if kind == "fusion":
        return fusion_work(inputs)
    if kind == "eval":
        return eval_work(inputs)
    raise ConfigError(f"the dry run has no cost model for stage {stage.name!r} (kind {kind!r}): "
                      f"add one to factory/dry_run.py stage_work")


def stage_card(stage, cfg):
    """The card whose parameters do a stage's work: the teacher for its data stages and its
    evaluation, else the card the stage trains or evaluates."""
    card = stage.inputs.get("card") or stage.inputs.get("teacher")
    return cfg.teacher if card["name"] == cfg.teacher.name else cfg.student


def estimate(stage, cfg, work: Work, devices: Devices) -> StageEstimate:
    card = stage_card(stage, cfg)
    n = count_params(card)["flops_params"]
    n_teacher = count_params(cfg.teacher)["flops_params"]
    flops = (train_flops(n, work.trained) + forward_flops(n, work.forward)
             + forward_flops(n_teacher, work.teacher))
    if work.micro is not None:
        teacher = weights_per_device(cfg.teacher, cfg.backend.name, in_backend=True)
        parts = training_memory(card, devices, work.micro, cfg.trainer.precision, teacher)
    elif stage_kind(stage) == "source":
        parts = {}
    else:
        in_backend = stage_kind(stage) in ("generate", "record")
        parts = {"weights": weights_per_device(card, cfg.backend.name, in_backend)}
        parts["total"] = parts["weights"]
    return StageEstimate(
        stage=stage.name, arm=stage.arm, model=card.name, trained_tokens=work.trained,
        forward_tokens=work.forward, teacher_tokens=work.teacher, flops=flops,
        h100_hours=projected_h100_hours(flops, cfg.trainer.h100_utilization),
        memory_gib=parts.get("total", 0.0) / GIB,
        memory_parts_gib={k: v / GIB for k, v in parts.items()}, note=work.unknown)


def has_train_split(task: dict) -> bool:
    return task["kind"] == "arith" or bool(task["train_path"]) or bool(
        task["train_split"] and task["source"])


def missing_train_prompts(plan) -> list[str]:
    """Stages that read a task's training prompts when the task has none (a benchmark card
    without task.train_path): a real run would stop there, after the stages before it."""
    needs: dict[str, list[str]] = defaultdict(list)
    for stage in plan.stages:
        if stage_kind(stage) not in TRAIN_SPLIT_KINDS:
            continue
        task = stage.inputs["task"]
        from_jsonl = "stage" in stage.inputs and stage.inputs["stage"].get("source") == "jsonl"
        if not from_jsonl and not has_train_split(task):
            needs[task["name"]].append(stage.name)
    return [f"task {task} has no training prompts (a held-out benchmark) and {', '.join(names)} "
            f"read them: set task.train_path=/path/to/train.jsonl"
            for task, names in needs.items()]


def memory_over_device(rows: list[StageEstimate]) -> list[str]:
    """Stages whose memory per device exceeds an 80 GB H100, one line per cause."""
    causes: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        parts = row.memory_parts_gib
        if row.memory_gib > H100_MEMORY_GIB:
            biggest = max((k for k in parts if k not in ("total", "load_peak")), key=parts.get)
            causes[f"{row.memory_gib:.0f} GiB per device, over an 80 GB H100 (largest part: "
                   f"{row.model}'s {biggest}, {parts[biggest]:.0f} GiB)"].append(row.stage)
        if parts.get("load_peak", 0.0) > H100_MEMORY_GIB:
            causes[f"loading puts the whole fp32 model on every device "
                   f"({parts['load_peak']:.0f} GiB) before FSDP shards it"].append(row.stage)
    return [f"{_stage_list(stages)}: {cause}" for cause, stages in causes.items()]


def checks(cfg, plan, rows: list[StageEstimate], devices: Devices) -> list[str]:
    """What a real run of this plan would run into, found without loading anything."""
    found = missing_train_prompts(plan) + memory_over_device(rows)
    found += [f"{row.stage}: counted as 0: {row.note}" for row in rows if row.note]
    if devices.wrap_class:
        layer = decoder_layer_class(cfg.student)
        if layer != devices.wrap_class:
            found.append(f"{devices.config_file} wraps {devices.wrap_class} but student "
                         f"{cfg.student.name}'s layers are {layer}: FSDP would wrap nothing")
    scores = any(stage_kind(s) in ("record", "on_policy") for s in plan.stages)
    if scores and cfg.backend.name != "hf" and cfg.pipeline.cache.k > cfg.backend.max_logprobs:
        found.append(f"pipeline.cache.k={cfg.pipeline.cache.k} is more than "
                     f"backend.max_logprobs={cfg.backend.max_logprobs}: vLLM would refuse the "
                     f"scoring requests; raise backend.max_logprobs")
    return found


def _stage_list(stages: list[str]) -> str:
    return stages[0] if len(stages) == 1 else f"{stages[0]} and {len(stages) - 1} more stages"


def plan_costs(cfg) -> dict:
    """The dry run's numbers for a composed config (pure: prints and writes nothing)."""
    plan = build_plan(cfg)
    devices = training_devices(cfg.trainer)
    works: dict[str, Work] = {}
    rows = []
    for stage in plan.stages:
        works[stage.name] = stage_work(stage, cfg, works)
        rows.append(estimate(stage, cfg, works[stage.name], devices))
    by_arm: dict[str, float] = defaultdict(float)
    for row in rows:
        by_arm[row.arm] += row.h100_hours
    params = {role: count_params(card) for role, card in
              (("student", cfg.student), ("teacher", cfg.teacher))}
    return {
        "student": cfg.student.name, "teacher": cfg.teacher.name,
        "tasks": [t.name for t in eval_tasks(cfg)], "pipeline": cfg.pipeline.name,
        "params": params, "devices": asdict(devices), "backend": cfg.backend.name,
        "h100_utilization": cfg.trainer.h100_utilization,
        "stages": [asdict(r) for r in rows],
        "total": {"h100_hours": sum(r.h100_hours for r in rows),
                  "flops": sum(r.flops for r in rows),
                  "h100_hours_by_arm": dict(by_arm),
                  "max_training_memory_gib": max(
                      [r.memory_gib for r in rows if "states" in r.memory_parts_gib],
                      default=0.0)},
        "checks": checks(cfg, plan, rows, devices),
    }


# ---------------------------------------------------------------------------- printing


def _relative(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(CONF_DIR.parent))
    except ValueError:  # a config file outside the repository
        return path


def _hours(h: float) -> str:
    if h >= 1000:
        return f"{h:,.0f}"
    return f"{h:.1f}" if h >= 1 else (f"{h:.2g}" if h else "0")


def _gib(x: float) -> str:
    return f"{x:.1f}" if x >= 0.1 else (f"{x:.2g}" if x else "-")


def _count(n: float) -> str:
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}" if n else "-"


def format_costs(costs: dict) -> str:
    d = costs["devices"]
    shape = f"{d['count']} device{'s' if d['count'] > 1 else ''}, " + (
        "FSDP full shard" if d["fsdp"] else "unsharded")
    width = max(len(r["stage"]) for r in costs["stages"]) + 2
    lines = [
        f"dry run: {costs['student']} from {costs['teacher']} on {', '.join(costs['tasks'])}, "
        f"pipeline {costs['pipeline']}",
        f"training: {shape}" + (", activation checkpointing" if d["checkpointing"] else "")
        + (f" ({_relative(d['config_file'])})" if d["config_file"] else "")
        + f"; teacher backend {costs['backend']}",
        "tokens at the length caps (upper bounds): trained (6N), forward (2N: sampled, scored or "
        "evaluated), teacher (scored by the teacher)",
        f"projected H100-hours at {costs['h100_utilization']:g} of 989 TFLOP/s; GiB/dev: "
        f"training state + activations + logits, or the weights a forward-only stage loads",
        "",
        f"{'stage':<{width}}{'model':<17}{'trained':>9}{'forward':>9}{'teacher':>9}"
        f"{'H100-h':>10}{'GiB/dev':>9}",
    ]
    lines.append("-" * len(lines[-1]))
    for r in costs["stages"]:
        mem = _gib(r["memory_gib"])
        lines.append(f"{r['stage']:<{width}}{r['model']:<17}{_count(r['trained_tokens']):>9}"
                     f"{_count(r['forward_tokens']):>9}{_count(r['teacher_tokens']):>9}"
                     f"{_hours(r['h100_hours']) if r['h100_hours'] else '-':>10}{mem:>9}")
    total = costs["total"]
    lines += ["", "projected H100-hours by arm: " + ", ".join(
        f"{arm} {_hours(h)}" for arm, h in total["h100_hours_by_arm"].items()),
        f"projected H100-hours in total: {_hours(total['h100_hours'])}",
        f"training memory per device, at most: {_gib(total['max_training_memory_gib'])} GiB"]
    if costs["checks"]:
        lines += ["", "before a real run:"] + [f"- {c}" for c in costs["checks"]]
    return "\n".join(lines)


def dry_run(cfg, run_dir: Path | None, announce: bool = True) -> dict:
    """Cost the plan; print it and save `dry_run.json` in `run_dir` when `announce` (rank 0)."""
    costs = plan_costs(cfg)
    if announce:
        if run_dir is not None:
            write_json_atomic(Path(run_dir) / "dry_run.json", costs)
        print(format_costs(costs))
    return costs
