"""Typed schemas for the Hydra config tree (conf/).

One source of truth per knob: every field's type and default lives here, the YAML files under
conf/ hold values. The schemas are registered in Hydra's ConfigStore by `register()`, so a typo or
a wrong type in YAML or on the command line fails at composition, before any compute, naming the
key (Hydra's own "Key 'x' not in 'StudentConfig'" message).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class ArchConfig:
    """The published architecture of a Qwen3 checkpoint (REFERENCE.md, config.json fields)."""

    family: str = "qwen3"  # "qwen3" (dense) or "qwen3_moe"
    num_hidden_layers: int = MISSING
    num_attention_heads: int = MISSING
    num_key_value_heads: int = MISSING
    hidden_size: int = MISSING
    intermediate_size: int = MISSING  # dense MLP width (MoE cards: unused by experts)
    head_dim: int = 128
    vocab_size: int = 151_936
    tie_word_embeddings: bool = False
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 40_960
    # MoE only (family == "qwen3_moe")
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.001
    decoder_sparse_step: int = 1
    # special-token ids the pair must agree on (REFERENCE.md)
    eos_token_id: int = 151_645
    pad_token_id: int = 151_643
    # metadata only (config.json's bos_token_id; Qwen3 prompts carry no BOS token)
    bos_token_id: Optional[int] = 151_643


@dataclass
class SamplingConfig:
    """Sampling settings for one mode (Qwen3's recommendations by default)."""

    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 20
    min_p: float = 0.0
    max_new_tokens: int = 32_768


@dataclass
class ModelCardConfig:
    """What students and teachers share: a name, an architecture, where the weights come from."""

    name: str = MISSING
    arch: ArchConfig = field(default_factory=ArchConfig)
    # hub id or local Hugging Face directory; None: no published weights (built from scratch)
    pretrained: Optional[str] = None
    # hub id or local directory of the tokenizer; "tiny": the embedded tiny-world tokenizer;
    # None: the same source as `pretrained`
    tokenizer: Optional[str] = None
    dtype: str = "bfloat16"  # weights' dtype when loaded: float32 | bfloat16 | float16


@dataclass
class StudentConfig(ModelCardConfig):
    pass


@dataclass
class BootstrapCheckConfig:
    """The bootstrap SFT's stopping test: thinking-mode Pass@1 of the teacher on held-out
    problems of the train stream (never the test split), with the card's thinking sampling."""

    pass_at_1: float = 0.0  # the target; 0 = no check, train exactly sft_steps
    every: int = 250  # check every this many SFT steps, from step `after` on, and at the end
    after: int = 0
    problems: int = 200  # train-stream problems right after the SFT examples
    samples: int = 4  # samples per problem
    extra_steps: int = 0  # SFT steps allowed past sft_steps (at the schedule's final lr) while
    # the check fails; the last of them ends training, passed or not (the ledger says which)


@dataclass
class BootstrapConfig:
    """How the bank trains a teacher that has no downloadable checkpoint (the tiny world)."""

    enabled: bool = False
    pretrain_steps: int = 0
    sft_steps: int = 0
    sft_examples: int = 0  # verified CoT examples per mode for the bootstrap SFT
    batch_size: int = 64
    lr: float = 3e-3
    think_ratio: float = 0.5  # share of the bootstrap SFT examples in /think mode
    check: BootstrapCheckConfig = field(default_factory=BootstrapCheckConfig)
    four_stage: bool = False  # also run the four-stage recipe once it exists


@dataclass
class TeacherConfig(ModelCardConfig):
    tensor_parallel: int = 1
    expert_parallel: int = 1
    quantization: Optional[str] = None  # None | "8bit" | "4bit" (bitsandbytes)
    thinking: SamplingConfig = field(default_factory=SamplingConfig)
    non_thinking: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(temperature=0.7, top_p=0.8, top_k=20)
    )
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)


@dataclass
class TaskConfig:
    name: str = MISSING
    kind: str = MISSING  # arith | math | code (factory/tasks/registry.py)
    # where a benchmark's rows come from (factory/tasks/benchmarks.py); arith ignores these
    source: Optional[str] = None  # hub dataset id, loaded with datasets.load_dataset
    subset: Optional[str] = None  # the hub dataset's config name (gsm8k: "main")
    path: Optional[str] = None  # local .jsonl / .jsonl.gz file, overriding `source`
    split: str = "test"  # the hub split evaluated as the task's test split
    train_split: Optional[str] = None  # hub split of training prompts (None: the task has none)
    train_path: Optional[str] = None  # local .jsonl / .jsonl.gz of training prompts
    n_train: int = 0  # training prompts (0: all available)
    n_test: int = 0  # held-out problems evaluated (0: all)
    difficulty: int = 2  # arith: number of operations per problem
    max_operand: int = 9  # arith: added or subtracted operands drawn from [1, max_operand]
    max_first_operand: int = 99  # arith: the first operand, drawn from [1, max_first_operand]
    seed: int = 0
    # field mapping: which column of a row holds what
    problem_field: str = "problem"
    answer_field: Optional[str] = "answer"  # None: no gold answer (code tasks only)
    answer_delimiter: Optional[str] = None  # gold: the text after its last one (gsm8k: "####")
    tests_field: str = "test"
    entry_point_field: str = "entry_point"
    id_field: Optional[str] = "id"  # None: ids from the row index
    code_timeout_s: float = 10.0
    sandbox: str = "bwrap"  # bwrap | process (weaker, opt-in)


@dataclass
class StageConfig:
    """Budget of one training stage."""

    steps: int = 100
    batch_size: int = 32
    lr: float = 1e-3
    warmup_ratio: float = 0.05
    grad_accum: int = 1
    max_len: int = 256


@dataclass
class EvalConfig:
    n_samples: int = 64  # per problem and mode (>= 64 for Pass@64)
    n_problems: int = 200  # held-out problems (0: all the task has)
    modes: list[str] = field(default_factory=lambda: ["think", "no_think"])
    ks: list[int] = field(default_factory=lambda: [1, 8, 64])
    max_new_tokens: int = 256
    thinking_budget: Optional[int] = None
    batch_size: int = 512  # sequences sampled per sampler call
    # on a CPU with a core the training leaves idle: a worker process builds stages beside the
    # main one, each model's evaluations as soon as it exists and, with
    # pipeline.background_training, training stages (factory/background.py); same numbers
    background: bool = True
    # tasks evaluated besides the run's own `task`, each a full task card: an overlay composes
    # them from conf/task/ (`- /task@pipeline.eval.tasks.aime24: aime24` in its defaults; on the
    # command line `+task@pipeline.eval.tasks.aime24=aime24`), so each keeps its own path/n_test
    tasks: dict[str, TaskConfig] = field(default_factory=dict)


@dataclass
class GenerateConfig:
    """The bank's off-policy set: teacher responses to the task's training prompts."""

    n_prompts: int = 1000  # training prompts (0: all the task has)
    n_per_prompt: int = 1  # responses per prompt and mode
    modes: list[str] = field(default_factory=lambda: ["think", "no_think"])
    rejection_sampling: bool = True  # keep only responses the task's verifier accepts
    batch_size: int = 512  # sampler rows per call


@dataclass
class CacheConfig:
    """The logit cache recorded over the off-policy set (teachers/cache.py), and the rows the
    teacher returns when it scores on-policy samples."""

    k: int = 64
    mode: str = "topk"  # topk | sampled
    encoding: str = "compact"  # plain | compact
    logprob_bits: int = 8  # compact encoding
    shard_tokens: int = 1_000_000
    batch_size: int = 64  # sequences per teacher forward when recording or scoring


@dataclass
class OnPolicyConfig(StageConfig):
    """On-policy distillation: the student samples, the teacher scores, reverse KL per token."""

    estimator: str = "topk"  # topk (exact over the top-k support) | sampled_token
    gkd_lambda: float = 1.0  # share of steps that are on-policy; the rest replay the cache
    n_prompts: int = 1000  # training prompts the student samples on (0: all)
    n_per_prompt: int = 4  # student samples per prompt per step's prompts
    modes: list[str] = field(default_factory=lambda: ["think", "no_think"])
    temperature: float = 1.0  # the student's sampling temperature
    max_new_tokens: int = 256


@dataclass
class ColdStartConfig(StageConfig):
    """Four-stage 1: SFT on a few hundred filtered, verified chain-of-thought solutions."""

    source: str = "task"  # task: the task's own verified traces (arith) | jsonl: `path`
    path: Optional[str] = None  # jsonl rows {problem, reasoning, answer[, gold]}
    n_examples: int = 256  # candidates read; the filters keep at most this many
    modes: list[str] = field(default_factory=lambda: ["think"])
    max_line_repeats: int = 2  # repetition filter: a line written more often than this drops it
    dedup_ngram: int = 5  # near-duplicate filter: character n-grams of the normalised problem
    dedup_threshold: float = 0.8  # drop at this Jaccard similarity to any test problem


@dataclass
class EntropyControlConfig:
    """The adaptive entropy coefficient (factory/rl.py EntropyController)."""

    enabled: bool = True  # False: the coefficient stays at init_coef (control off)
    init_coef: float = 0.0
    target_low: float = 0.2  # nats per response token
    target_high: float = 0.6
    rule: str = "additive"  # additive | multiplicative
    rate: float = 0.002  # additive: change per step; multiplicative: factor 1 + rate
    min_coef: float = 0.0  # multiplicative: floor a raise starts from (must be > 0 there)
    max_coef: float = 0.05


@dataclass
class GRPOConfig:
    """Four-stage 2: GRPO on query-verifier pairs (factory/rl.py for the equations)."""

    steps: int = 100  # optimizer steps; each sampled batch serves `passes` consecutive steps
    lr: float = 1e-4
    warmup_ratio: float = 0.0
    grad_accum: int = 1  # micro-batches per step (the batch's rows split evenly)
    n_prompts: int = 0  # query pool from the train split, after the cold start's (0: task n_train)
    prompts_per_batch: int = 16
    group_size: int = 8  # G samples per query
    passes: int = 2  # optimisation passes over each sampled batch (off-policy reuse)
    modes: list[str] = field(default_factory=lambda: ["think"])
    temperature: float = 1.0  # sampling temperature, no top-k/top-p: ratios need the policy
    max_new_tokens: int = 256
    sample_batch_size: int = 512  # sampler rows per forward
    eps_low: float = 0.2
    eps_high: float = 0.28  # clip-higher (DAPO)
    kl_coef: float = 0.0  # k3 KL to the frozen starting model; > 0 loads it
    normalize_std: bool = True  # divide advantages by the group's std (False: Dr. GRPO)
    chunk_size: int = 0  # response tokens per LM-head chunk (0: auto, ~64 MiB of fp32 logits)
    entropy: EntropyControlConfig = field(default_factory=EntropyControlConfig)


@dataclass
class FusionConfig(StageConfig):
    """Four-stage 3: continual SFT on a per-instance mix of /think and /no_think examples."""

    n_prompts: int = 256  # train queries rejection-sampled from the stage-2 model
    samples_per_prompt: int = 4  # /think samples per query; the first verified one is kept
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=256))
    sample_batch_size: int = 512
    n_examples: int = 512  # examples in the mix
    think_ratio: float = 0.5  # share of /think examples (each instance drawn independently)
    multi_turn_ratio: float = 0.25  # share of two-turn examples whose flag flips between turns


@dataclass
class GeneralRLConfig(GRPOConfig):
    """Four-stage 4: GRPO on a weighted sum of rule rewards, both modes, soft switch only."""

    modes: list[str] = field(default_factory=lambda: ["think", "no_think"])
    multi_turn_ratio: float = 0.25  # share of queries asked as the second turn of a chat
    reward_correct: float = 1.0
    reward_format: float = 0.2
    reward_follow: float = 0.5
    reward_length: float = 0.2
    think_target_tokens: int = 256  # length target per prompt, by its mode
    no_think_target_tokens: int = 32
    length_tolerance: float = 0.5  # the length reward reaches 0 at target * (1 + tolerance)


@dataclass
class FourStageConfig:
    """The four-stage baseline (DESIGN.md): cold start, reasoning RL, fusion, general RL."""

    cold_start: ColdStartConfig = field(default_factory=ColdStartConfig)
    reasoning_rl: GRPOConfig = field(default_factory=GRPOConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    general_rl: GeneralRLConfig = field(default_factory=GeneralRLConfig)


@dataclass
class PipelineConfig:
    name: str = MISSING
    stages: list[str] = MISSING
    pretrain: StageConfig = field(default_factory=StageConfig)
    sft: StageConfig = field(default_factory=StageConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    off_policy: StageConfig = field(default_factory=StageConfig)
    on_policy: OnPolicyConfig = field(default_factory=OnPolicyConfig)
    four_stage: FourStageConfig = field(default_factory=FourStageConfig)
    # arith corpus used to pretrain the base student (sentences of problems, traces, answers)
    pretrain_corpus_size: int = 20_000
    # with a background worker (eval.background): it also takes training stages, so the base
    # student trains beside the teacher's bootstrap and the four-stage arm beside the
    # distillation arm (factory/background.py); same weights, two trainings in memory at once.
    # False: the worker evaluates only
    background_training: bool = True


@dataclass
class LossConfig:
    kind: str = "fkl"  # fkl | rkl | jsd | skew_fkl | skew_rkl | tvd
    temperature: float = 1.0
    beta: float = 0.5
    alpha: float = 0.1
    chunk_size: int = 0  # tokens per LM-head chunk in the fused losses (0: auto, ~64 MiB of logits)
    ce_weight: float = 0.0


@dataclass
class BackendConfig:
    name: str = "hf"  # hf | vllm | vllm_server
    url: Optional[str] = None  # vllm_server
    max_logprobs: int = 64
    gpu_memory_utilization: float = 0.85
    request_batch_size: int = 64
    max_retries: int = 5


@dataclass
class TrainerConfig:
    name: str = "cpu"
    device: str = "cpu"  # cpu | cuda
    precision: str = "no"  # accelerate mixed precision: no | bf16 | fp16
    num_threads: int = 0  # torch intra-op threads on CPU (0: all cores; -1: auto, the idle cores)
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    checkpoint_every: int = 200
    log_every: int = 10
    progress: bool = True
    device_peak_tflops: float = 0.0  # for MFU; 0: unknown
    h100_utilization: float = 0.4  # the stated utilisation for projected H100-hours
    # the accelerate config the stages are launched with (`accelerate launch --config_file`): a
    # name in conf/accelerate/ or a path; null: one process. The dry run reads its device count,
    # sharding and activation checkpointing from it (factory/dry_run.py)
    accelerate_config: Optional[str] = None
    # guarded numerics (factory/guards.py): a step whose loss or gradient norm is NaN/inf, or
    # whose loss exceeds loss_spike_factor x the running median loss, is never applied: "stop"
    # raises naming the step (the last good checkpoint is kept), "skip" drops it and goes on
    on_nonfinite: str = "stop"  # stop | skip
    loss_spike_factor: float = 0.0  # 0: off; else > 1
    # preflight (factory/preflight.py): refuse, before any compute, a run whose estimated memory
    # (weights, gradients, AdamW states from the cards) exceeds what the device has free
    check_memory: bool = True


@dataclass
class LoggerConfig:
    name: str = "wandb"
    mode: str = "disabled"  # online | offline | disabled
    project: str = "compact-factory"
    entity: Optional[str] = None


@dataclass
class Config:
    student: StudentConfig = MISSING
    teacher: TeacherConfig = MISSING
    task: TaskConfig = MISSING
    pipeline: PipelineConfig = MISSING
    loss: LossConfig = MISSING
    backend: BackendConfig = MISSING
    trainer: TrainerConfig = MISSING
    logger: LoggerConfig = MISSING
    seed: int = 0
    artifacts_dir: str = "artifacts"  # the content-addressed store (relative to the launch dir)
    dry_run: bool = False


def check_schema(cfg) -> None:
    """Refuse keys the schema does not know, wherever they came from. Hydra's `+key=value` adds a
    key past the typed nodes' struct flag, so `+student.arch.hiden_size=64` would otherwise
    compose and fail much later inside a builder."""
    import dataclasses

    from omegaconf import DictConfig, OmegaConf

    from factory.errors import ConfigError

    def walk(node, path: str) -> None:
        schema = OmegaConf.get_type(node)
        if dataclasses.is_dataclass(schema):
            known = {f.name for f in dataclasses.fields(schema)}
            for key in node.keys():
                if key not in known:
                    full = f"{path}.{key}" if path else str(key)
                    raise ConfigError(
                        f"config key {full!r} is not in the schema of {path or 'the config'} "
                        f"({schema.__name__}: {', '.join(sorted(known))}). Check its spelling; "
                        "a '+' override adds a key the schema does not have, drop the '+' to set "
                        "an existing one")
        for key in node.keys():
            child = node._get_node(key)
            if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
                walk(child, f"{path}.{key}" if path else str(key))

    walk(cfg, "")


def register() -> None:
    """Register the top-level schema; conf/config.yaml lists it first in its defaults, so every
    group file is merged into a typed node and an unknown key or a wrong type fails there."""
    ConfigStore.instance().store(name="schema", node=Config)
