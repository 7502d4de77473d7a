"""The content-addressed artifact store.

An artifact (a model checkpoint, an off-policy set, a logit cache, an evaluation) lives at
`<root>/<kind>/<key>/`, where the key is a hash of exactly the inputs that determine it. It is
written under a temporary name and renamed into place only when complete, with a `manifest.json`
that records the inputs, each file's size and sha256, and the cost of making it. A directory
without a valid manifest is never read as an artifact; a stage that was killed leaves only its
temporary directory and its work directory (checkpoints to resume from) behind, and the next
writer of that key on the same host removes the temporary directory of a process that is gone.

Corruption is refused, naming the file and the fix (delete the artifact, rerun): the manifest
carries a checksum of itself, `get` checks it and every file's size (a few stats, so a truncated
file is refused at once), and `opened` recomputes every file's sha256 the first time a process
reads an artifact (the pipeline calls it on a stage's inputs before building the stage). Measured
here on the tiny student (0.5 MB): `get` 0.8 ms, the sha256 of its files 1.5 ms, loading it
35 ms. sha256 runs at about 1 GB/s (0.8 GB/s on a shared core here), so a 14B student's 30 GB of
bf16 weights cost about 30 s once per process, a read that loading them repeats. A logit cache
checks its own shards lazily, as they are read (teachers/cache.py), so `opened` leaves those to
it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from factory.errors import ArtifactError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_SHA256 = "manifest_sha256"  # the manifest's own checksum (of its other fields)
CHECKSUMS = "checksums.json"  # write_checksums: a directory this project does not write itself
# kinds whose reader verifies each file itself, lazily (teachers/cache.py CacheReader)
SELF_VERIFYING_KINDS = ("cache",)


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
        self._verified: set[Path] = set()  # artifacts this process has checksummed

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    @contextmanager
    def claim(self, kind: str, key: str, hold: bool = True) -> Iterator[None]:
        """Hold an exclusive lock on making `kind/key` (`.work/<kind>-<key>.lock`, flock):
        processes that share a store, such as the jobs of a sweep that need the same teacher,
        make each artifact once; the others wait here and then find it published. The lock dies
        with its process, so a killed maker never blocks the next, and its file is removed once the artifact is published. `hold=False` (the non-zero
        ranks of one multi-process run, which follow rank 0) takes no lock."""
        if not hold:
            yield
            return
        lock_path = self.root / ".work" / f"{kind}-{key}.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("waiting for another process that is making %s/%s", kind, key)
                fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                # a published artifact needs no lock: a waiter on this (now unlinked) file or a
                # newcomer on a fresh one finds the artifact when it gets in, and reuses it
                if self.path(kind, key).exists():
                    lock_path.unlink(missing_ok=True)
                fcntl.flock(handle, fcntl.LOCK_UN)

    def work_dir(self, kind: str, key: str) -> Path:
        """Scratch space of an artifact being made (training checkpoints): survives a kill,
        removed once the artifact is complete."""
        return self.root / ".work" / f"{kind}-{key}"

    def get(self, kind: str, key: str) -> Artifact | None:
        """The complete artifact, or None. A directory whose manifest is missing, unreadable or
        fails its own checksum, or one of whose files is missing or has the wrong size, is
        incomplete or corrupted and raises, naming it, rather than being used."""
        path = self.path(kind, key)
        if not path.exists():
            return None
        manifest = read_manifest(path)
        for rel, meta in manifest["files"].items():
            check_size(path, path / rel, meta["bytes"])
        return Artifact(kind, key, path)

    def verify(self, artifact: Artifact) -> None:
        """Recompute every file's checksum against the manifest; raise naming the first bad file."""
        verify_artifact(artifact)

    def opened(self, artifact: Artifact) -> Artifact:
        """`artifact`, verified (`verify`) the first time this process reads it; a kind whose
        reader verifies its files itself (SELF_VERIFYING_KINDS) is only size-checked (`get`)."""
        if artifact.kind not in SELF_VERIFYING_KINDS and artifact.path not in self._verified:
            self.verify(artifact)
            self._verified.add(artifact.path)
        return artifact

    @contextmanager
    def writing(self, kind: str, key: str, inputs: dict,
                publish: bool = True) -> Iterator[tuple[Path, dict]]:
        """Yield (temporary directory, extra manifest fields); on normal exit checksum every
        file, write the manifest and rename the directory into place. On an exception the
        temporary directory is removed and nothing is published.

        `publish=False` (a multi-process run's other ranks, which build alongside rank 0): the
        directory is scratch, removed on exit whatever happened; only rank 0's is published.
        """
        final = self.path(kind, key)
        _remove_dead_writers(final.parent, key)
        tmp = final.parent / f".tmp-{key}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        tmp.mkdir(parents=True)
        extra: dict = {}
        if not publish:
            try:
                yield tmp, extra
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            return
        try:
            yield tmp, extra
            files = {}
            for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
                rel = str(f.relative_to(tmp))
                files[rel] = {"bytes": f.stat().st_size, "sha256": file_sha256(f)}
            manifest = {"kind": kind, "key": key, "inputs": inputs, "files": files,
                        "bytes": sum(m["bytes"] for m in files.values()),
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra}
            write_json_atomic(tmp / MANIFEST, with_checksum(manifest))
            if final.exists():  # a concurrent writer finished first: keep theirs
                shutil.rmtree(tmp)
            else:
                os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(self.work_dir(kind, key), ignore_errors=True)


# ---------------------------------------------------------------- manifests and checksums

_HOST = socket.gethostname().replace("-", "_")  # in temporary names: "-" separates fields


def _manifest_digest(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != MANIFEST_SHA256}
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


def with_checksum(manifest: dict) -> dict:
    """The manifest as JSON will read it back, with its own checksum added."""
    manifest = json.loads(canonical_json(manifest))
    return {**manifest, MANIFEST_SHA256: _manifest_digest(manifest)}


def read_manifest(path: Path) -> dict:
    """The manifest of the artifact directory `path`, refused (ArtifactError naming the file and
    the fix) when missing, unreadable, or not matching its own checksum. A manifest written
    before checksums were recorded has none to check."""
    file = Path(path) / MANIFEST
    fix = f"delete {path} and rerun to rebuild it"
    try:
        manifest = json.loads(file.read_text())
        manifest["files"].items()  # noqa: B018 (shape)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ArtifactError(f"artifact {path} has no readable {MANIFEST} "
                            f"({err.__class__.__name__}): it is incomplete or corrupted. Delete "
                            f"the directory and rerun to rebuild it.") from None
    recorded = manifest.get(MANIFEST_SHA256)
    if recorded is not None and recorded != _manifest_digest(manifest):
        raise ArtifactError(f"{file} does not match its own checksum (corrupted or edited by "
                            f"hand): {fix}.")
    return manifest


def verify_artifact(artifact: Artifact) -> None:
    """Recompute every file's sha256 against the manifest; raise naming the first bad file."""
    manifest = read_manifest(artifact.path)
    for rel, meta in manifest["files"].items():
        f = artifact.path / rel
        check_size(artifact.path, f, meta["bytes"])
        if file_sha256(f) != meta["sha256"]:
            raise ArtifactError(
                f"{f} does not match its sha256 in {artifact.path / MANIFEST} (corrupted or "
                f"modified): delete {artifact.path} and rerun to rebuild it.")


def check_size(root: Path, file: Path, expected: int, manifest: str = MANIFEST) -> None:
    """Refuse `file` of the artifact at `root` when it is missing or its size is not the one
    `root/manifest` records (truncated or grown), naming the file and the fix."""
    try:
        size = file.stat().st_size
    except OSError:
        raise ArtifactError(f"{file} is listed in {root / manifest} but missing: delete {root} "
                            f"and rerun to rebuild it.") from None
    if size != expected:
        how = "truncated" if size < expected else "grown"
        raise ArtifactError(f"{file} is {size} bytes but {root / manifest} says {expected} "
                            f"({how}): delete {root} and rerun to rebuild it.")


def _remove_dead_writers(parent: Path, key: str) -> None:
    """Remove `.tmp-<key>-<host>-<pid>-*` directories this host's killed writers left behind
    (the process is gone). Another host's, or a live process's, are left alone."""
    if not parent.is_dir():
        return
    for tmp in parent.glob(f".tmp-{key}-{_HOST}-*"):
        try:
            pid = int(tmp.name.split("-")[3])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, IndexError, OSError):
            continue  # not our naming, or a live process of another user


def write_checksums(root: Path) -> None:
    """Record every file under `root` (size and sha256) in `root/checksums.json`: the training
    loop's checkpoints, which accelerate writes and this project cannot add a manifest to."""
    root = Path(root)
    files = {str(f.relative_to(root)): {"bytes": f.stat().st_size, "sha256": file_sha256(f)}
             for f in sorted(root.rglob("*")) if f.is_file() and f.name != CHECKSUMS}
    write_json_atomic(root / CHECKSUMS, files)


def verify_checksums(root: Path, what: str, fix: str) -> None:
    """Refuse (ArtifactError naming the file, `what` it belongs to and `fix`) a directory whose
    files differ from `root/checksums.json`. A directory without one (written before checksums
    were recorded) passes."""
    root = Path(root)
    listing = root / CHECKSUMS
    if not listing.exists():
        return
    try:
        files = json.loads(listing.read_text())
        items = [(rel, int(m["bytes"]), str(m["sha256"])) for rel, m in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ArtifactError(f"{listing} ({what}) is unreadable ({err.__class__.__name__}): {fix}"
                            ) from None
    for rel, size, sha in items:
        f = root / rel
        try:
            actual = f.stat().st_size
        except OSError:
            raise ArtifactError(f"{f} ({what}) is listed in {listing} but missing: {fix}") from None
        if actual != size:
            raise ArtifactError(f"{f} ({what}) is {actual} bytes but {listing} says {size} "
                                f"({'truncated' if actual < size else 'grown'}): {fix}")
        if file_sha256(f) != sha:
            raise ArtifactError(f"{f} ({what}) does not match its sha256 in {listing} (corrupted "
                                f"or modified): {fix}")
