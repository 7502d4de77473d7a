"""The config tree: every option of every group composes into the typed schema, a typo or a
wrong type fails at composition naming the key, and every schema field is read by some code."""

import dataclasses
import re
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from factory import config as schema
from factory.inspect import compose

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and any(p.glob("*.yaml")))

# Fields the schema declares for capabilities whose code is not in the tree yet. Each entry
# names the issue that wires it; the test fails once a field is read (remove it here then) and
# fails for any other unread field.
NOT_YET_READ = {
    "backend": {"gpu_memory_utilization", "request_batch_size"},  # issue 7: vLLM backends
    "trainer": {"device_peak_tflops"},  # issue 8: MFU
    "config": {"dry_run"},  # issue 7
}


def all_options():
    return [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


@pytest.mark.parametrize("group,option", all_options())
def test_every_option_of_every_group_composes(group, option):
    cfg = compose([f"{group}={option}"])
    assert cfg[group] is not None


def test_typos_and_wrong_types_fail_naming_the_key():
    with pytest.raises(ConfigCompositionException, match="student.arch.hiden"):
        compose(["student.arch.hiden=3"])
    with pytest.raises((ConfigCompositionException, ValidationError), match="steps"):
        compose(["pipeline.pretrain.steps=many"])
    with pytest.raises(Exception, match="Could not find 'loss/fk'"):
        compose(["loss=fk"])


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
