"""Teacher/student compatibility, checked from the cards alone, before any weight loads.

Logit distillation compares distributions token id by token id, so the pair must share the
vocabulary (same size, same ids for eos and pad) and the kind of tokenizer (the embedded tiny one
or a Hugging Face one). A mismatch is refused with a message that names both values and the
cards that would fit (found in conf/).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from factory.config import StudentConfig, TeacherConfig
from factory.errors import CompatibilityError

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def tokenizer_kind(card) -> str:
    """"tiny" for the embedded tiny-world tokenizer, "hf" for a hub id or local directory."""
    return "tiny" if card.tokenizer == "tiny" else "hf"


def mismatches(student, teacher) -> list[str]:
    """What differs between the pair, one phrase per field; empty when they fit."""
    s, t = student.arch, teacher.arch
    found = []
    for label, sv, tv in [
        ("vocab", s.vocab_size, t.vocab_size),
        ("eos id", s.eos_token_id, t.eos_token_id),
        ("pad id", s.pad_token_id, t.pad_token_id),
        ("tokenizer kind", tokenizer_kind(student), tokenizer_kind(teacher)),
    ]:
        if sv != tv:
            found.append(
                f"student {student.name} has {label} {sv} but teacher {teacher.name} has {tv}"
            )
    return found


def check_pair(student, teacher, conf_dir: Path | None = CONF_DIR) -> None:
    """Raise CompatibilityError unless `student` and `teacher` share a tokenizer and vocabulary."""
    found = mismatches(student, teacher)
    if not found:
        return
    teachers = [c.name for c in cards(conf_dir, "teacher") if not mismatches(student, c)]
    students = [c.name for c in cards(conf_dir, "student") if not mismatches(c, teacher)]
    fixes = []
    if teachers:
        fixes.append(
            "pick a teacher from the same tokenizer family ("
            + ", ".join(f"teacher={n}" for n in teachers) + ")"
        )
    if students:
        fixes.append(", ".join(f"student={n}" for n in students))
    fix = " or ".join(fixes) if fixes else "pick a teacher and a student that share a tokenizer"
    raise CompatibilityError("; ".join(found) + f": {fix}")


def cards(conf_dir: Path | None, group: str) -> list:
    """Every card of `group` in conf_dir, merged onto its schema (defaults filled in)."""
    if conf_dir is None or not (Path(conf_dir) / group).is_dir():
        return []
    schema = TeacherConfig if group == "teacher" else StudentConfig
    return [
        OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.load(path))
        for path in sorted((Path(conf_dir) / group).glob("*.yaml"))
    ]
