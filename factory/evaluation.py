"""Evaluation: n samples per problem in one mode, graded by the task; Pass@k, ThinkFollow, length.

`evaluate` renders each problem as a user turn carrying the mode flag (" /think" or " /no_think",
factory.chat.user_message) and the generation prompt with `enable_thinking = (mode == "think")`,
draws `n_samples` completions per problem with the one sampler (factory.sampling.sample), grades
the answer part of each (the text after the think block) with `task.grade`, and aggregates:

    pass@k        mean over problems of the unbiased estimator (Chen et al. 2021, `pass_at_k`)
    pass@1        mean over problems of c / n
    think_follow  share of completions whose think block obeys the mode flag (ThinkFollow)
    mean_response_tokens  mean generated tokens per completion (stop token included)

The result is a JSON-ready dict; Pass@k dictionaries are keyed by str(k), so the dict in memory
equals the file `write_eval` writes and a report reads back.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from factory import chat
from factory.errors import ConfigError
from factory.sampling import sample, token_kwargs
from factory.tasks import Problem, Task

PREVIEW_PROBLEMS = 3  # problems whose first completion goes into `samples_preview`
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "max_new_tokens")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021, Codex, eq. 1).

    pass@k = 1 - C(n-c, k) / C(n, k): the chance that k of the n samples, drawn without
    replacement, include a correct one. Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which avoids
    the huge binomials; 1.0 when n - c < k (every k-subset holds a correct sample).
    """
    if k < 1:
        raise ConfigError(f"pass@k needs k >= 1, got k={k}")
    if k > n:
        raise ConfigError(
            f"pass@k needs k <= n: pass@{k} asked of {n} samples per problem; "
            f"raise eval.n_samples to at least {k} or drop {k} from eval.ks"
        )
    if not 0 <= c <= n:
        raise ConfigError(f"pass@k needs 0 <= c <= n, got c={c}, n={n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def _setting(sampling, name: str):
    """A sampling setting from a SamplingConfig-like object or a plain dict (the eval stage's)."""
    return sampling[name] if isinstance(sampling, Mapping) else getattr(sampling, name)


def evaluate(
    model,
    tokenizer,
    task: Task,
    problems: list[Problem],
    *,
    mode: str,
    n_samples: int,
    ks: list[int],
    sampling,
    thinking_budget: int | None = None,
    batch_size: int = 512,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Sample `n_samples` completions per problem in `mode` ("think" | "no_think") and grade them.

    `sampling` holds temperature, top_p, top_k, min_p and max_new_tokens (a SamplingConfig or a
    dict). `thinking_budget` caps the think block (REFERENCE.md's closing sentence is inserted);
    it only acts in "think" mode, since the /no_think prompt closes the block itself.
    """
    if mode not in chat.MODES:
        raise ConfigError(f"mode must be one of {chat.MODES}, got {mode!r}")
    if not problems:
        raise ConfigError("evaluate needs at least one problem: the task gave none (check its n_test and its file)")
    for k in ks:  # fail before any sampling, not after
        pass_at_k(n_samples, 0, k)
    settings = {name: _setting(sampling, name) for name in SAMPLING_FIELDS}

    thinking = mode == "think"
    prompts = [
        chat.prompt_ids(tokenizer, [chat.user_message(p.prompt, mode)], enable_thinking=thinking)
        for p in problems
    ]
    start = time.perf_counter()
    samples = sample(
        model, prompts, n_samples, **settings, **token_kwargs(tokenizer),
        thinking_budget=thinking_budget, batch_size=batch_size,
        generator=torch.Generator().manual_seed(seed), progress=progress,
    )
    seconds = time.perf_counter() - start
    texts = samples.texts(tokenizer)

    pairs = [(problems[r // n_samples], chat.split_response(text)[1])
             for r, text in enumerate(texts)]
    # a task that grades in parallel (code: sandboxed runs in a pool) gets every pair at once
    grade_many = getattr(task, "grade_many", None)
    verdicts = (grade_many(pairs) if grade_many is not None
                else [task.grade(problem, answer) for problem, answer in pairs])
    follow = sum(chat.follows_mode(text, mode) for text in texts)

    per_problem = []
    for i, problem in enumerate(problems):
        rows = range(i * n_samples, (i + 1) * n_samples)
        correct = sum(bool(verdicts[r]) for r in rows)
        per_problem.append({
            "id": problem.id,
            "n": n_samples,
            "c": correct,
            "pass@k": {str(k): pass_at_k(n_samples, correct, k) for k in ks},
            "mean_tokens": float(np.mean([len(samples.tokens[r]) for r in rows])),
        })

    lengths = samples.lengths()
    return {
        "mode": mode,
        "n_samples": n_samples,
        "n_problems": len(problems),
        "ks": list(ks),
        "pass@k": {str(k): float(np.mean([p["pass@k"][str(k)] for p in per_problem])) for k in ks},
        "pass@1": float(np.mean([p["c"] / p["n"] for p in per_problem])),
        "think_follow": follow / len(texts),
        "mean_response_tokens": float(np.mean(lengths)),
        "truncated": 1.0 - float(np.mean(samples.finished)),  # share that hit max_new_tokens
        "generated_tokens": int(sum(lengths)),
        "seconds": seconds,
        "sampling": settings,
        "thinking_budget": thinking_budget,
        "seed": seed,
        "per_problem": per_problem,
        "samples_preview": [
            {"id": problems[i].id, "prompt": problems[i].prompt, "gold": problems[i].answer,
             "completion": texts[i * n_samples]}
            for i in range(min(PREVIEW_PROBLEMS, len(problems)))
        ],
    }


def write_eval(result: dict, path: str | os.PathLike) -> None:
    """Write `result` as JSON atomically: a temporary file in the same folder, then os.replace,
    so a reader (or a resumed run) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
