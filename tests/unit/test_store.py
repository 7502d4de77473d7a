import json

import pytest

from factory.errors import ArtifactError
from factory.ledger import StageCost
from factory.pipeline import Pipeline, Stage
from factory.store import Store, content_key

pytestmark = pytest.mark.unit


def test_key_depends_on_exactly_the_inputs():
    a = content_key("model", {"x": 1, "y": [1, 2]})
    assert a == content_key("model", {"y": [1, 2], "x": 1})  # order of keys does not matter
    assert a != content_key("model", {"x": 2, "y": [1, 2]})
    assert a != content_key("eval", {"x": 1, "y": [1, 2]})


def test_artifact_published_only_when_complete(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(RuntimeError):
        with store.writing("model", "k1", {"a": 1}) as (out, _):
            (out / "weights.bin").write_bytes(b"half")
            raise RuntimeError("killed mid-write")
    assert store.get("model", "k1") is None
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "model").iterdir())

    with store.writing("model", "k1", {"a": 1}) as (out, extra):
        (out / "weights.bin").write_bytes(b"0123456789")
        extra["cost"] = {"wall_s": 1.5}
    art = store.get("model", "k1")
    manifest = art.manifest
    assert manifest["inputs"] == {"a": 1} and manifest["cost"] == {"wall_s": 1.5}
    assert manifest["files"]["weights.bin"]["bytes"] == 10
    store.verify(art)


def test_corruption_and_missing_manifest_are_refused_naming_the_file(tmp_path):
    store = Store(tmp_path)
    with store.writing("model", "k2", {}) as (out, _):
        (out / "weights.bin").write_bytes(b"0123456789")
    art = store.get("model", "k2")
    (art.path / "weights.bin").write_bytes(b"0123456780")  # one byte flipped
    with pytest.raises(ArtifactError, match="weights.bin"):
        store.verify(art)
    (art.path / "manifest.json").write_text("{trunc")
    with pytest.raises(ArtifactError, match="manifest.json.*Delete"):
        store.get("model", "k2")


def test_pipeline_skips_a_stage_whose_artifact_exists(tmp_path):
    calls = []

    def make(ctx):
        calls.append(ctx.name)
        (ctx.out / "x.json").write_text(json.dumps({"upstream": sorted(ctx.upstream)}))
        return StageCost(tokens=7, flops=42.0)

    def stages(lr):
        return [Stage("a", "model", {"lr": lr}, make, arm="base"),
                Stage("b", "eval", {"n": 1}, make, needs=["a"], arm="eval")]

    first = Pipeline(Store(tmp_path / "store"), tmp_path / "run1")
    for s in stages(0.1):
        first.run(s)
    assert calls == ["a", "b"]
    assert [e.reused for e in first.ledger.entries] == [False, False]
    assert first.ledger.entries[0].tokens == 7

    again = Pipeline(Store(tmp_path / "store"), tmp_path / "run2")
    for s in stages(0.1):
        again.run(s)
    assert calls == ["a", "b"]  # nothing rebuilt
    assert [e.reused for e in again.ledger.entries] == [True, True]
    assert again.ledger.entries[0].original["tokens"] == 7
    ledger = json.loads((tmp_path / "run2" / "ledger.json").read_text())
    assert ledger["total"]["tokens"] == 0

    changed = Pipeline(Store(tmp_path / "store"), tmp_path / "run3")
    for s in stages(0.2):  # an upstream input changed: both stages rebuild
        changed.run(s)
    assert calls == ["a", "b", "a", "b"]
