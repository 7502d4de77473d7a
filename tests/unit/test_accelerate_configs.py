"""conf/accelerate/*.yaml against accelerate 1.15 itself: each file loads with accelerate's config
loader, every `fsdp_config` key is one of `accelerate launch`'s options (the launcher copies
unknown keys onto its arguments silently, so a typo would be ignored, not refused), and the
environment `accelerate launch` would hand the processes builds the FSDP plugin we mean: FSDP2,
full shard, Qwen3 decoder layers as the wrap unit, activation checkpointing, sharded state dict,
bf16."""

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, patch_environment
from accelerate.utils.launch import prepare_multi_gpu_env
from torch.distributed.fsdp import CPUOffloadPolicy, StateDictType

from factory.dry_run import decoder_layer_class
from factory.inspect import compose

pytestmark = pytest.mark.unit
CONF = Path(__file__).resolve().parents[2] / "conf"
CONFIGS = sorted((CONF / "accelerate").glob("*.yaml"))
STUDENTS = sorted(p.stem for p in (CONF / "student").glob("*.yaml"))


def test_there_are_fsdp_configs():
    assert {"fsdp", "fsdp_2node"} <= {p.stem for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_loads_and_every_fsdp_key_is_a_launch_option(path):
    launch = load_config_from_file(str(path))  # raises on an unknown top-level key
    assert launch.distributed_type == DistributedType.FSDP
    assert launch.mixed_precision == "bf16"
    options = {action.dest for action in launch_command_parser()._actions}
    # accelerate prefixes a bare key with fsdp_ before copying it onto the launch arguments
    unknown = [k for k in launch.fsdp_config
               if (k if k.startswith("fsdp_") else f"fsdp_{k}") not in options]
    assert not unknown, f"{path.name}: not accelerate launch options: {unknown}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_launch_environment_builds_the_fsdp_plugin_we_mean(path):
    args = launch_command_parser().parse_args(["--config_file", str(path), "train.py"])
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true"
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    assert args.num_processes == load_config_from_file(str(path)).num_processes
    with patch_environment(**{k: v for k, v in env.items()
                              if k.startswith(("FSDP_", "ACCELERATE_"))}):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True  # FSDP2's full shard
    assert plugin.transformer_cls_names_to_wrap == ["Qwen3DecoderLayer"]
    assert plugin.activation_checkpointing is True
    assert plugin.state_dict_type == StateDictType.SHARDED_STATE_DICT
    assert not isinstance(plugin.cpu_offload, CPUOffloadPolicy)  # parameters stay on the GPUs


@pytest.mark.parametrize("student", [s for s in STUDENTS if s != "tiny"])
def test_the_wrap_unit_is_every_students_decoder_layer(student):
    """A wrap class that matches no module wraps nothing: FSDP would then shard the model as one
    unit. Built on the meta device, so no memory."""
    card = compose([f"student={student}"]).student
    assert decoder_layer_class(card) == "Qwen3DecoderLayer"
