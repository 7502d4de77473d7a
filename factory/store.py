"""The content-addressed artifact store.

An artifact (a model checkpoint, an off-policy set, a logit cache, an evaluation) lives at
`<root>/<kind>/<key>/`, where the key is a hash of exactly the inputs that determine it. It is
written under a temporary name and renamed into place only when complete, with a `manifest.json`
that records the inputs, each file's size and sha256, and the cost of making it. A directory
without a valid manifest is never read as an artifact; a stage that was killed leaves only its
temporary directory and its work directory (checkpoints to resume from) behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from factory.errors import ArtifactError

MANIFEST = "manifest.json"


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def content_key(kind: str, inputs: dict) -> str:
    """16 hex digits of sha256 over the kind and the canonical JSON of the inputs."""
    return hashlib.sha256(f"{kind}\n{canonical_json(inputs)}".encode()).hexdigest()[:16]


def file_sha256(path: Path, chunk_bytes: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON under a temporary name in the same directory, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass(frozen=True)
class Artifact:
    kind: str
    key: str
    path: Path

    @property
    def manifest(self) -> dict:
        return json.loads((self.path / MANIFEST).read_text())


class Store:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def work_dir(self, kind: str, key: str) -> Path:
        """Scratch space of an artifact being made (training checkpoints): survives a kill,
        removed once the artifact is complete."""
        return self.root / ".work" / f"{kind}-{key}"

    def get(self, kind: str, key: str) -> Artifact | None:
        """The complete artifact, or None. A directory whose manifest is missing or unreadable
        is incomplete and raises, naming it, rather than being used."""
        path = self.path(kind, key)
        if not path.exists():
            return None
        manifest = path / MANIFEST
        try:
            json.loads(manifest.read_text())
        except (OSError, ValueError) as err:
            raise ArtifactError(
                f"artifact {path} has no readable {MANIFEST} ({err.__class__.__name__}): it is "
                f"incomplete or corrupted. Delete the directory and rerun to rebuild it."
            ) from None
        return Artifact(kind, key, path)

    def verify(self, artifact: Artifact) -> None:
        """Recompute every file's checksum against the manifest; raise naming the first bad file."""
        for rel, meta in artifact.manifest["files"].items():
            f = artifact.path / rel
            if not f.exists():
                raise ArtifactError(f"{f} is listed in the manifest but missing: delete "
                                    f"{artifact.path} and rerun to rebuild it.")
            if f.stat().st_size != meta["bytes"] or file_sha256(f) != meta["sha256"]:
                raise ArtifactError(f"{f} does not match its checksum in {artifact.path / MANIFEST}"
                                    f" (truncated or modified): delete {artifact.path} and rerun.")

    @contextmanager
    def writing(self, kind: str, key: str, inputs: dict) -> Iterator[tuple[Path, dict]]:
        """Yield (temporary directory, extra manifest fields); on normal exit checksum every
        file, write the manifest and rename the directory into place. On an exception the
        temporary directory is removed and nothing is published."""
        final = self.path(kind, key)
        tmp = final.parent / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        tmp.mkdir(parents=True)
        extra: dict = {}
        try:
            yield tmp, extra
            files = {}
            for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
                rel = str(f.relative_to(tmp))
                files[rel] = {"bytes": f.stat().st_size, "sha256": file_sha256(f)}
            manifest = {"kind": kind, "key": key, "inputs": inputs, "files": files,
                        "bytes": sum(m["bytes"] for m in files.values()),
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra}
            write_json_atomic(tmp / MANIFEST, manifest)
            if final.exists():  # a concurrent writer finished first: keep theirs
                shutil.rmtree(tmp)
            else:
                os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(self.work_dir(kind, key), ignore_errors=True)
