"""The config tree: every option of every group composes into the typed schema, a typo or a
wrong type fails at composition naming the key, and every schema field is read by some code."""

import dataclasses
import re
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from factory import config as schema
from factory.errors import ConfigError
from factory.inspect import compose

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"
# conf/accelerate/ holds accelerate's own config files (`accelerate launch --config_file`), not a
# Hydra group: tests/unit/test_accelerate_configs.py loads them with accelerate's loader
NOT_HYDRA = {"accelerate"}
GROUPS = sorted(p.name for p in CONF.iterdir()
                if p.is_dir() and any(p.glob("*.yaml")) and p.name not in NOT_HYDRA)
# groups whose options are `# @package _global_` overlays: they set keys all over the tree
GLOBAL_GROUPS = {"experiment"}
LAUNCHERS = sorted(p.stem for p in (CONF / "hydra" / "launcher").glob("*.yaml"))

# Fields the schema declares for capabilities whose code is not in the tree yet. Each entry
# names the issue that wires it; the test fails once a field is read (remove it here then) and
# fails for any other unread field.
NOT_YET_READ = {
    "backend": {"gpu_memory_utilization", "request_batch_size"},  # issue 7: vLLM backends
    "trainer": {"device_peak_tflops"},  # issue 8: MFU
}


def all_options():
    return [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


@pytest.mark.parametrize("group,option", all_options())
def test_every_option_of_every_group_composes(group, option):
    cfg = compose([f"{group}={option}"])
    if group in GLOBAL_GROUPS:
        assert cfg != compose([]), f"{group}={option} changes nothing"
    else:
        assert cfg[group] is not None


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_every_hydra_launcher_composes_and_instantiates(launcher):
    """conf/hydra/launcher/ options, composed with the Hydra node (the plugin's schema checks
    their keys and types) and built as the launcher objects a sweep would use."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.utils import instantiate

    pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                        reason="pip install hydra-submitit-launcher (the dev and slurm extras)")
    schema.register()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = hydra_compose(config_name="config", overrides=[f"hydra/launcher={launcher}"],
                            return_hydra_config=True)
    assert cfg.hydra.runtime.choices["hydra/launcher"] == launcher
    assert type(instantiate(cfg.hydra.launcher)).__name__.endswith("Launcher")


def test_typos_and_wrong_types_fail_naming_the_key():
    with pytest.raises(ConfigCompositionException, match="student.arch.hiden"):
        compose(["student.arch.hiden=3"])
    with pytest.raises((ConfigCompositionException, ValidationError), match="steps"):
        compose(["pipeline.pretrain.steps=many"])
    with pytest.raises(Exception, match="Could not find 'loss/fk'"):
        compose(["loss=fk"])


@pytest.mark.parametrize("override,key", [
    ("+student.arch.hiden_size=64", "student.arch.hiden_size"),
    ("+trainer.lrr=1e-3", "trainer.lrr"),
    ("+pipeline.pretrain.stepz=5", "pipeline.pretrain.stepz"),
])
def test_a_plus_override_that_adds_an_unknown_key_is_refused_naming_it(override, key):
    """Hydra's '+' adds a key past the typed nodes' struct flag; the schema check refuses it
    with a FactoryError that names the key and the schema, before anything is built."""
    with pytest.raises(ConfigError, match=re.escape(f"config key '{key}' is not in the schema")):
        compose([override])


def test_a_plus_override_of_an_open_dict_is_still_allowed():
    """eval.tasks is a dict of task cards by name: '+' adds an entry there, and a typo inside
    the added card is still refused."""
    cfg = compose(["+task@pipeline.eval.tasks.aime24=aime24"])
    assert cfg.pipeline.eval.tasks.aime24.name == "aime24"
    with pytest.raises(ConfigError, match="pipeline.eval.tasks.aime24.n_tset"):
        compose(["+task@pipeline.eval.tasks.aime24=aime24", "+pipeline.eval.tasks.aime24.n_tset=5"])


def _schema_fields():
    out = {}
    for name, obj in vars(schema).items():
        if dataclasses.is_dataclass(obj) and isinstance(obj, type):
            key = re.sub(r"Config$", "", name).lower() or "config"
            out[key] = {f.name for f in dataclasses.fields(obj)}
    return out


# Owners whose field names are common words (kind, lr, split): a read must name the owner too,
# as `cfg.loss.kind` or `pre.lr`; other fields are found by name.
OWNER_PATTERNS = {
    "loss": r"\bloss(_cfg)?\.{f}\b",
    "backend": r"\bbackend\.{f}\b",
    "stage": r"(\bpre|\.pretrain|\.sft)\.{f}\b",
    "task": r"\b(task_cfg|cfg\.task|self\.cfg|cfg)\.{f}\b",
}


def test_every_schema_field_is_read_somewhere():
    code = "\n".join(p.read_text() for d in ("factory", "teachers", "students", "reports")
                     for p in (REPO / d).rglob("*.py") if p.name != "config.py")
    unread = {}
    for owner, fields in _schema_fields().items():
        for f in fields:
            pattern = OWNER_PATTERNS.get(owner, r"\.{f}\b|\[\"{f}\"\]|\b{f}=").format(f=f)
            if not re.search(pattern, code):
                unread.setdefault(owner, set()).add(f)
    declared = {o: set(fs) for o, fs in NOT_YET_READ.items()}
    surprising = {o: fs - declared.get(o, set()) for o, fs in unread.items()}
    assert not {o: fs for o, fs in surprising.items() if fs}, (
        f"schema fields no code reads: {surprising}")
    stale = {o: fs - unread.get(o, set()) for o, fs in declared.items()}
    assert not {o: fs for o, fs in stale.items() if fs}, (
        f"fields now read: remove them from NOT_YET_READ: {stale}")
