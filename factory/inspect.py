"""What a student/teacher pair costs, from the cards alone: no weights are loaded.

    python -m factory.inspect student=qwen3-8b teacher=qwen3-235b-a22b

prints one JSON object: per card its parameter counts (meta-device build), architecture, FLOPs
per token (factory.flops), weight sizes and pretrained source, and whether the pair is compatible.
`describe_pair(cfg)` is the same derivation for a composed config, for a run to print and save.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from factory.errors import CompatibilityError, FactoryError
from factory.flops import forward_flops, train_flops, weights_bytes
from students.builders import count_params
from students.compat import check_pair

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
GIB = 2**30


def describe(card) -> dict:
    """A card's derived numbers: params, arch, FLOPs per token, weight GiB, pretrained source."""
    params = count_params(card)
    n = params["flops_params"]  # active, incl. the LM-head matmul, excl. the embedding lookup
    return {
        "name": card.name,
        "params": params,
        "arch": OmegaConf.to_container(OmegaConf.structured(card.arch)),
        "flops_per_token": {"train": train_flops(n, 1), "forward": forward_flops(n, 1)},
        "weights_gib": {
            dtype: weights_bytes(params["total"], dtype) / GIB for dtype in ("bfloat16", "float32")
        },
        "pretrained": card.pretrained,
    }


def describe_pair(cfg) -> dict:
    """Both cards described, and the pair's compatibility (the error message when refused)."""
    try:
        check_pair(cfg.student, cfg.teacher)
        error = None
    except CompatibilityError as err:
        error = str(err)
    return {
        "student": describe(cfg.student),
        "teacher": describe(cfg.teacher),
        "compatible": error is None,
        "compatibility_error": error,
    }


def compose(overrides: list[str], config_dir: Path = CONF_DIR):
    """The composed, typed config for `overrides` (Hydra's compose API; no run directory)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from factory.config import check_schema, register

    register()
    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base=None):
        cfg = hydra_compose(config_name="config", overrides=overrides)
    check_schema(cfg)
    return cfg


def main(argv: list[str] | None = None, config_dir: Path = CONF_DIR) -> int:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = compose(sys.argv[1:] if argv is None else argv, config_dir)
        summary = describe_pair(cfg)
    except (FactoryError, HydraException, OmegaConfBaseException) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
