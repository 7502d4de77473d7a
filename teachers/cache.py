"""The logit cache: the teacher's sparse distribution at every response token, on disk.

What a row holds (one per response token, in sequence order):

* ``ids[k]`` -- token ids; ``logprobs[k]`` -- their log-probabilities under the teacher's
  *full-vocabulary* log-softmax at temperature 1 (fp32, never renormalised over the k);
* ``tail`` -- ``log(1 - sum p)`` over the row's *distinct* ids: the mass the k tokens do not
  carry, computed from the full distribution as a log-sum-exp over the other ids (exact even
  when the tail is 1e-9), so a reader of the coarsened distribution {k ids, tail} knows it exactly.

Modes (``CacheSpec.mode``):

* ``topk`` -- the k most likely ids (what ``factory.losses.sparse_divergence`` consumes);
* ``sampled`` -- k ids drawn *with replacement* from the teacher's distribution, each with its
  log-prob: the unbiased random-sampling KD estimator of Sparse Logit Sampling (arXiv
  2503.16870; ``factory.losses.sampled_forward_kl``). Draws are stored one per slot, duplicates
  included (not as (id, count) pairs), so every row has exactly k slots, rows stay fixed-width
  and memory-mappable, and a reader gets back exactly the k draws it would pass to the loss.
  Slot order carries no meaning in either mode (``compact`` sorts slots by log-prob).

Encodings (``CacheSpec.encoding``), bytes per token at k = 64, vocabulary 151,936:

* ``plain`` (388 B): ids int32, log-probs fp16 (relative error <= 2**-11), tail fp32.
* ``compact`` (212 B at ``logprob_bits`` = 8): ids bit-packed at ``ceil(log2(V + 1))`` bits
  (18 for Qwen3's vocabulary) with vectorised numpy word operations; log-probs sorted descending
  per row, the largest and the smallest kept in fp16 and the k - 2 between them quantised
  linearly on the log scale between those two, ``logprob_bits`` bits each (bit-packed when
  below 8); tail fp16. The error of a middle log-prob is at most half a step,
  ``(first - last) / (2 (2**bits - 1))`` nats, plus the fp16 rounding of the two ends; a
  uniform log-scale error is what the KL cares about (``KL ~ 1/2 Var_p(error)``), and the
  per-row range spends the levels where the row's mass is. Measured on Zipf-like logits
  (``synthetic_lm_logits``) the mean coarsened KL(exact || stored) is ~6e-6 nats per token at
  8 bits and ~1e-4 at 6 bits (target < 1e-3); see docs/benchmarks.md, "Logit cache".
  A linear scale on log-probs beat a square-root companding of the range at every k and bit
  width tried.

Files in a cache directory:

* ``shard-00000.arrow``, ... -- Arrow IPC files (Feather v2, uncompressed, one record batch
  each) of exactly ``shard_tokens`` rows (the last one fewer), memory-mapped for reading. A
  sequence may run across a shard boundary. Each is written under a temporary name and renamed.
* ``sequences.arrow`` -- the sequence index: ``seq_id`` (string) and ``length``, in write order.
* ``cache_manifest.json`` -- written last, atomically, by ``CacheWriter.close``: the spec,
  token and sequence counts, each shard's tokens, bytes and sha256, bytes per token, columns,
  format version. A directory without it is an unfinished cache and is refused.

Verification: opening a cache always checks every shard's size against the manifest (a
truncated shard is refused at once, whatever ``verify`` says) and the sequence index's checksum.
With ``verify=True`` (the default) each shard's sha256 is recomputed the first time that shard is
read, so a bit-flipped shard is never decoded, yet opening a 100-GB cache costs nothing up front;
``CacheReader.verify()`` checks every shard now. ``verify=False`` skips the checksums (sizes and
Arrow footers are still checked).
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from array import array
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import torch

from factory import faults
from factory.errors import ArtifactError, ConfigError
from factory.store import check_size, file_sha256, write_json_atomic

FORMAT = "compact-factory/logit-cache"
FORMAT_VERSION = 1
MANIFEST = "cache_manifest.json"
INDEX = "sequences.arrow"
MODES = ("topk", "sampled")
ENCODINGS = ("plain", "compact")

# A -inf log-prob (a backend that masks tokens) is stored as this floor: exp(-1e4) is 0 in any
# float format, and the floor stays finite in fp16 (max 65504), so no NaN reaches a loss.
LOGPROB_FLOOR = -1.0e4
# Log-probs a little above 0 are rounding (an fp16 source near p = 1); beyond this, a bug.
_POSITIVE_TOLERANCE = 1e-3
# Rows of logits per chunk in from_logits: about 2**24 fp32 elements (64 MiB) at a time.
_LOGIT_CHUNK_ELEMENTS = 2**24


# ----------------------------------------------------------------------------------------------
# Spec
# ----------------------------------------------------------------------------------------------


def _canonical(obj: Any) -> Any:
    """The JSON form of obj (tuples become lists, keys strings), for comparing and storing."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


@dataclass(frozen=True)
class CacheSpec:
    """What a logit cache holds; a reader refuses a cache whose spec differs from the run's.

    ``teacher`` names the teacher (its card or artifact key), ``sampling`` its generation settings
    for the responses (the log-probs themselves are always at temperature 1), ``logprob_bits``
    the width of a quantised log-prob in the ``compact`` encoding (ignored by ``plain``).
    """

    k: int = 64
    mode: str = "topk"
    encoding: str = "compact"
    vocab_size: int = 151_936
    teacher: str = ""
    sampling: dict = field(default_factory=dict)
    logprob_bits: int = 8

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"logit cache mode {self.mode!r} is not one of {MODES}")
        if self.encoding not in ENCODINGS:
            raise ConfigError(f"logit cache encoding {self.encoding!r} is not one of {ENCODINGS}")
        if not 2 <= int(self.vocab_size) < 2**32:
            raise ConfigError(f"logit cache vocab_size {self.vocab_size} must be in [2, 2**32)")
        if int(self.k) < 1 or (self.mode == "topk" and int(self.k) > int(self.vocab_size)):
            raise ConfigError(f"logit cache k={self.k} must be >= 1 and, in topk mode, <= "
                              f"vocab_size={self.vocab_size}")
        if not 1 <= int(self.logprob_bits) <= 16:
            raise ConfigError(f"logit cache logprob_bits={self.logprob_bits} must be in [1, 16]")
        object.__setattr__(self, "sampling", _canonical(dict(self.sampling)))

    @property
    def id_bits(self) -> int:
        """Bits per packed id: ceil(log2(V + 1)), 18 for V = 151,936."""
        return int(self.vocab_size).bit_length()

    @property
    def row_bytes(self) -> int:
        """Payload bytes per token (the shard files add only a schema and a footer)."""
        if self.encoding == "plain":
            return 4 * self.k + 2 * self.k + 4
        return (_nbytes(self.k, self.id_bits) + 2 + 2 + _nbytes(max(self.k - 2, 0), self.logprob_bits)
                + 2)

    def to_dict(self) -> dict:
        return _canonical(asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> "CacheSpec":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown logit cache spec field(s) {unknown}; known: {sorted(names)}")
        return cls(**d)


# ----------------------------------------------------------------------------------------------
# Bit packing (vectorised: whole rows of values per numpy operation, no per-element loop)
# ----------------------------------------------------------------------------------------------


def _nbytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def _word(bits: int) -> np.dtype:
    # A value starts at bit 0..7 of its first byte, so it fits in a 4-byte word up to 25 bits.
    return np.dtype("<u4") if bits <= 25 else np.dtype("<u8")


def _words(buf_nb: np.ndarray, word: np.dtype) -> np.ndarray:
    """An (unaligned) view of every byte offset of each row of buf_nb as a little-endian word."""
    n, nb = buf_nb.shape
    return np.ndarray((n, nb - word.itemsize + 1), word, buffer=buf_nb, strides=(buf_nb.strides[0], 1))


def pack_bits(values_nm: np.ndarray, bits: int) -> np.ndarray:
    """Pack non-negative ints < 2**bits (bits <= 57), row by row: value j of a row occupies bits
    [j bits, (j + 1) bits) of the row, little-endian. [n, m] -> uint8 [n, ceil(m bits / 8)].

    Each value is shifted into a word at its first byte; values at least one word apart never
    share a byte, so ``ceil(word bits / bits)`` strided passes OR every value into place."""
    n, m = values_nm.shape
    word = _word(bits)
    nb = _nbytes(m, bits)
    buf_nb = np.zeros((n, nb + word.itemsize), np.uint8)
    words = _words(buf_nb, word)
    offset_m = np.arange(m, dtype=np.int64) * bits
    first_byte_m, shift_m = offset_m // 8, (offset_m % 8).astype(word)
    shifted_nm = values_nm.astype(word) << shift_m
    stride = -(-8 * word.itemsize // bits)
    for r in range(min(stride, m)):
        words[:, first_byte_m[r::stride]] |= shifted_nm[:, r::stride]
    return np.ascontiguousarray(buf_nb[:, :nb])


def unpack_bits(packed_nb: np.ndarray, m: int, bits: int) -> np.ndarray:
    """Inverse of pack_bits: uint8 [n, ceil(m bits / 8)] -> int64 [n, m]."""
    n, nb = packed_nb.shape
    word = _word(bits)
    buf_nb = np.zeros((n, nb + word.itemsize), np.uint8)
    buf_nb[:, :nb] = packed_nb
    offset_m = np.arange(m, dtype=np.int64) * bits
    first_byte_m, shift_m = offset_m // 8, (offset_m % 8).astype(word)
    mask = word.type((1 << bits) - 1)
    return ((_words(buf_nb, word)[:, first_byte_m] >> shift_m) & mask).astype(np.int64)


# ----------------------------------------------------------------------------------------------
# Encodings: columns, encode (torch rows -> numpy columns), decode (numpy columns -> torch rows)
# ----------------------------------------------------------------------------------------------


class _Column(NamedTuple):
    name: str
    dtype: np.dtype
    width: int  # 0: a scalar per row; w: a fixed-size list of w values per row


_ARROW = {np.dtype(np.uint8): pa.uint8(), np.dtype(np.int32): pa.int32(),
          np.dtype(np.float16): pa.float16(), np.dtype(np.float32): pa.float32()}


def _columns(spec: CacheSpec) -> list[_Column]:
    if spec.encoding == "plain":
        return [_Column("ids", np.dtype(np.int32), spec.k),
                _Column("logprobs", np.dtype(np.float16), spec.k),
                _Column("tail", np.dtype(np.float32), 0)]
    cols = [_Column("ids", np.dtype(np.uint8), _nbytes(spec.k, spec.id_bits)),
            _Column("lp_first", np.dtype(np.float16), 0),
            _Column("lp_last", np.dtype(np.float16), 0)]
    if spec.k > 2:
        cols.append(_Column("lp_q", np.dtype(np.uint8), _nbytes(spec.k - 2, spec.logprob_bits)))
    return cols + [_Column("tail", np.dtype(np.float16), 0)]


def _schema(spec: CacheSpec) -> pa.Schema:
    return pa.schema([
        pa.field(c.name, pa.list_(_ARROW[c.dtype], c.width) if c.width else _ARROW[c.dtype], nullable=False)
        for c in _columns(spec)
    ])


def _encode(spec: CacheSpec, ids_tk: torch.Tensor, logprobs_tk: torch.Tensor,
            tail_t: torch.Tensor) -> dict[str, np.ndarray]:
    """Validated rows (ids int64, log-probs fp32, tail fp32) -> one numpy array per column."""
    if spec.encoding == "plain":
        return {"ids": ids_tk.to(torch.int32).numpy(),
                "logprobs": logprobs_tk.to(torch.float16).numpy(),
                "tail": tail_t.to(torch.float32).numpy()}
    # compact: slots sorted by log-prob, descending (a row is a set; order carries nothing).
    # Top-k rows from from_logits already are; sampled rows are not.
    if not bool((logprobs_tk[:, :-1] >= logprobs_tk[:, 1:]).all()):
        logprobs_tk, order_tk = logprobs_tk.sort(dim=-1, descending=True, stable=True)
        ids_tk = ids_tk.gather(-1, order_tk)
    first_t = logprobs_tk[:, 0].to(torch.float16)
    last_t = logprobs_tk[:, -1].to(torch.float16)
    cols = {"ids": pack_bits(ids_tk.numpy(), spec.id_bits),
            "lp_first": first_t.numpy(), "lp_last": last_t.numpy(),
            "tail": tail_t.to(torch.float16).numpy()}
    if spec.k > 2:
        levels = (1 << spec.logprob_bits) - 1
        hi_t1, lo_t1 = first_t.float()[:, None], last_t.float()[:, None]
        range_t1 = hi_t1 - lo_t1
        # fraction of the row's log-range below the first; fp16 rounding of the ends can push
        # a middle value a hair outside [0, 1]
        u_tk = ((hi_t1 - logprobs_tk[:, 1:-1]) / range_t1.clamp_min(1e-30)).clamp(0.0, 1.0)
        q_tk = torch.round(u_tk * levels).to(torch.int32).numpy()
        cols["lp_q"] = (q_tk.astype(np.uint8) if spec.logprob_bits == 8
                        else pack_bits(q_tk, spec.logprob_bits))
    return cols


def _decode(spec: CacheSpec, cols: dict[str, np.ndarray]):
    """Columns of n rows -> (ids int64 [n, k], logprobs fp32 [n, k], tail fp32 [n]) tensors."""
    k = spec.k
    tail_n = torch.from_numpy(cols["tail"].astype(np.float32))
    if spec.encoding == "plain":
        ids_nk = torch.from_numpy(cols["ids"].astype(np.int64))
        return ids_nk, torch.from_numpy(cols["logprobs"].astype(np.float32)), tail_n
    ids_nk = torch.from_numpy(unpack_bits(cols["ids"], k, spec.id_bits))
    hi_n = torch.from_numpy(cols["lp_first"].astype(np.float32))
    lo_n = torch.from_numpy(cols["lp_last"].astype(np.float32))
    logprobs_nk = torch.empty(len(hi_n), k)
    logprobs_nk[:, 0] = hi_n
    if k > 1:
        logprobs_nk[:, -1] = lo_n
    if k > 2:
        levels = (1 << spec.logprob_bits) - 1
        q = cols["lp_q"]
        q_nm = q if spec.logprob_bits == 8 else unpack_bits(q, k - 2, spec.logprob_bits)
        step_n1 = ((hi_n - lo_n) / levels)[:, None]
        logprobs_nk[:, 1:-1] = hi_n[:, None] - torch.from_numpy(q_nm.astype(np.float32)) * step_n1
    return ids_nk, logprobs_nk, tail_n


# ----------------------------------------------------------------------------------------------
# From the teacher's logits
# ----------------------------------------------------------------------------------------------


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends (Maechler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _distinct(ids_tk: torch.Tensor) -> torch.Tensor:
    """True at the first occurrence of each id in its row (sampled rows repeat ids). [T, k]"""
    sorted_tk, order_tk = ids_tk.sort(-1)
    first_tk = torch.ones_like(sorted_tk, dtype=torch.bool)
    first_tk[:, 1:] = sorted_tk[:, 1:] != sorted_tk[:, :-1]
    return torch.empty_like(first_tk).scatter_(-1, order_tk, first_tk)


def tail_from_logprobs(ids_tk: torch.Tensor, logprobs_tk: torch.Tensor) -> torch.Tensor:
    """log(1 - sum of p over the row's distinct ids), from the stored log-probs alone. [T]

    Only as exact as ``1 - sum`` in fp64 of the given log-probs: a tail below ~1e-15 (a very
    confident teacher) comes out as the difference of nearly equal numbers. ``from_logits``
    computes it from the full distribution instead; prefer passing that tail to ``add``."""
    lp_tk = torch.where(_distinct(ids_tk), logprobs_tk.double(), float("-inf"))
    return _log1mexp(lp_tk.logsumexp(-1).clamp_max(0.0)).float()


def from_logits(logits_tv: torch.Tensor, k: int, mode: str = "topk",
                generator: torch.Generator | None = None):
    """The cache's rows from the teacher's logits at the response positions.

    Returns ``(ids [T, k] int64, logprobs [T, k] fp32, tail [T] fp32)``: log-probs from an fp32
    log-softmax over the full vocabulary at temperature 1 (bf16 loses the tail mass), top-k
    sorted descending, or (``sampled``) k draws with replacement from that softmax; the tail
    ``log(1 - sum_{distinct ids} p)`` as a log-sum-exp over the *other* ids, exact however small.
    Works through the rows in chunks of ~64 MiB of fp32 logits.
    """
    return scored_rows(logits_tv, k, mode, generator)[:3]


def scored_rows(logits_tv: torch.Tensor, k: int, mode: str = "topk",
                generator: torch.Generator | None = None, targets_t: torch.Tensor | None = None):
    """`from_logits`'s three tensors and, with `targets_t` [T] (the realised token at each row),
    a fourth: each target's log-prob [T] from the same log-softmax (None without targets), so
    a scorer reads the full-vocabulary logits once."""
    if mode not in MODES:
        raise ConfigError(f"logit cache mode {mode!r} is not one of {MODES}")
    T, V = logits_tv.shape
    if k < 1 or (mode == "topk" and k > V):
        raise ValueError(f"k={k} must be >= 1 and, for topk, <= the vocabulary ({V})")
    ids_tk = torch.empty(T, k, dtype=torch.long)
    logprobs_tk = torch.empty(T, k)
    tail_t = torch.empty(T)
    target_lp_t = None if targets_t is None else torch.empty(T)
    rows = max(1, _LOGIT_CHUNK_ELEMENTS // V)
    for a in range(0, T, rows):
        # fp32 log-softmax: bf16 loses the tail mass
        lp_cv = logits_tv[a:a + rows].to(torch.float32).log_softmax(-1)
        if mode == "topk":
            vals_ck, idx_ck = lp_cv.topk(k, -1, sorted=True)
        else:
            idx_ck = torch.multinomial(lp_cv.exp(), k, replacement=True, generator=generator)
            vals_ck = lp_cv.gather(-1, idx_ck)
        ids_tk[a:a + rows], logprobs_tk[a:a + rows] = idx_ck, vals_ck
        if targets_t is not None:  # before the scatter below overwrites the kept ids
            target_lp_t[a:a + rows] = lp_cv.gather(
                -1, targets_t[a:a + rows, None].to(lp_cv.device)).squeeze(-1)
        tail_t[a:a + rows] = lp_cv.scatter_(-1, idx_ck, float("-inf")).logsumexp(-1)
    return ids_tk, logprobs_tk, tail_t, target_lp_t


# ----------------------------------------------------------------------------------------------
# Writer
# ----------------------------------------------------------------------------------------------


def _shard_name(j: int) -> str:
    return f"shard-{j:05d}.arrow"


def _write_arrow(path: Path, table_or_batch, schema: pa.Schema) -> dict:
    """Write one Arrow IPC file under a temporary name, fsync, rename; return bytes and sha256."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with pa.OSFile(str(tmp), "wb") as sink, ipc.new_file(sink, schema) as writer:
            writer.write(table_or_batch)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        meta = {"file": path.name, "bytes": tmp.stat().st_size, "sha256": file_sha256(tmp)}
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return meta


class CacheWriter:
    """Appends sequences' rows and writes them shard by shard; ``close()`` publishes the cache.

    Holds at most one shard of encoded rows (``shard_tokens`` rows; the buffer grows by
    doubling up to that and is flushed the moment it is full, so a sequence can span shards),
    plus the sequence index (an id and a length per sequence). Use as a context manager: a
    normal exit closes it; an exception aborts it (its shards are deleted, nothing published).
    A writer killed before ``close`` leaves no manifest, and readers refuse the directory; a new
    writer on that directory deletes the leftover shards first.
    """

    def __init__(self, out_dir: str | Path, spec: CacheSpec, shard_tokens: int = 1_000_000):
        if shard_tokens < 1:
            raise ConfigError(f"shard_tokens must be >= 1, got {shard_tokens}")
        self.out_dir = Path(out_dir)
        self.spec = spec
        self.shard_tokens = int(shard_tokens)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if (self.out_dir / MANIFEST).exists():
            raise ArtifactError(
                f"{self.out_dir} already holds a complete logit cache ({MANIFEST}); a writer "
                f"never overwrites one. Read it with CacheReader, or delete the directory to "
                f"record it again."
            )
        for stale in [*self.out_dir.glob("shard-*.arrow"), *self.out_dir.glob(".shard-*.tmp"),
                      *self.out_dir.glob(f".{INDEX}.*.tmp"), self.out_dir / INDEX]:
            stale.unlink(missing_ok=True)  # an interrupted writer's leftovers
        self._cols = _columns(spec)
        self._schema = _schema(spec)
        self._buf: dict[str, np.ndarray] = {}
        self._capacity = 0
        self._fill = 0
        self._shards: list[dict] = []
        self._tokens = 0
        self._seq_ids: list[str] = []
        self._seen: set[str] = set()
        self._lengths = array("q")
        self._seq_id_type: str | None = None
        self._manifest: dict | None = None
        self._closed = False

    # -- state, for callers and tests --------------------------------------------------------
    @property
    def tokens(self) -> int:
        return self._tokens

    @property
    def sequences(self) -> int:
        return len(self._seq_ids)

    @property
    def buffered_tokens(self) -> int:
        """Rows held in memory, not yet in a shard (always < shard_tokens between calls)."""
        return self._fill

    @property
    def buffer_capacity(self) -> int:
        """Rows the buffer has room for (at most shard_tokens)."""
        return self._capacity

    # -- writing ------------------------------------------------------------------------------
    def add(self, seq_id: int | str, ids_tk: torch.Tensor, logprobs_tk: torch.Tensor,
            tail_logprob_t: torch.Tensor | None = None) -> None:
        """Append one sequence's T response-token rows.

        ``ids_tk`` [T, k] ids in [0, vocab); ``logprobs_tk`` [T, k] full-vocabulary log-probs at
        temperature 1 (-inf is stored as ``LOGPROB_FLOOR``); ``tail_logprob_t`` [T] the log of
        the mass outside the row's distinct ids, derived from the log-probs when None (less
        exact for tiny tails: pass ``from_logits``' tail). Sequence ids are unique, all ints or
        all strings, and kept as strings in the index."""
        if self._closed:
            raise ArtifactError(f"logit cache writer for {self.out_dir} is closed; open a new one")
        key = self._check_seq_id(seq_id)
        ids_tk, logprobs_tk, tail_t = self._check_rows(key, ids_tk, logprobs_tk, tail_logprob_t)
        enc = _encode(self.spec, ids_tk, logprobs_tk, tail_t)
        T, done = ids_tk.shape[0], 0
        while done < T:
            if self._fill == self._capacity:
                self._grow(T - done)
            n = min(T - done, self._capacity - self._fill)
            for c in self._cols:
                self._buf[c.name][self._fill:self._fill + n] = enc[c.name][done:done + n]
            self._fill += n
            done += n
            if self._fill == self.shard_tokens:
                self._flush()
        self._seq_ids.append(key)
        self._seen.add(key)
        self._lengths.append(T)
        self._tokens += T

    def _check_seq_id(self, seq_id) -> str:
        if isinstance(seq_id, (int, np.integer)) and not isinstance(seq_id, bool):
            kind, key = "int", str(int(seq_id))
        elif isinstance(seq_id, str):
            kind, key = "str", seq_id
        else:
            raise ValueError(f"seq_id must be an int or a str, got {type(seq_id).__name__}")
        if self._seq_id_type is None:
            self._seq_id_type = kind
        elif kind != self._seq_id_type:
            raise ValueError(f"seq_id {seq_id!r} is a {kind} but this cache's ids are "
                             f"{self._seq_id_type}s: use one type for every sequence")
        if key in self._seen:
            raise ValueError(f"seq_id {seq_id!r} was already added to the cache in {self.out_dir}")
        return key

    def _check_rows(self, key, ids_tk, logprobs_tk, tail_t):
        k, V = self.spec.k, self.spec.vocab_size
        ids_tk = torch.as_tensor(ids_tk).detach().cpu()
        logprobs_tk = torch.as_tensor(logprobs_tk).detach().cpu().to(torch.float32)
        if ids_tk.dim() != 2 or ids_tk.shape[1] != k or logprobs_tk.shape != ids_tk.shape:
            raise ValueError(f"sequence {key!r}: ids {tuple(ids_tk.shape)} and logprobs "
                             f"{tuple(logprobs_tk.shape)} must both be [T, k={k}]")
        if ids_tk.is_floating_point():
            raise ValueError(f"sequence {key!r}: ids must be integers, got {ids_tk.dtype}")
        ids_tk = ids_tk.long()
        T = ids_tk.shape[0]
        if T and (int(ids_tk.min()) < 0 or int(ids_tk.max()) >= V):
            raise ValueError(f"sequence {key!r}: ids must be in [0, vocab_size={V}), got "
                             f"[{int(ids_tk.min())}, {int(ids_tk.max())}]")
        if torch.isnan(logprobs_tk).any() or (logprobs_tk > _POSITIVE_TOLERANCE).any():
            raise ValueError(f"sequence {key!r}: logprobs must be log-probabilities (<= 0, no "
                             f"NaN); max {float(logprobs_tk.nan_to_num(nan=float('inf')).max())}")
        logprobs_tk = logprobs_tk.clamp(LOGPROB_FLOOR, 0.0)
        if tail_t is None:
            tail_t = tail_from_logprobs(ids_tk, logprobs_tk)
        else:
            tail_t = torch.as_tensor(tail_t).detach().cpu().to(torch.float32)
            if tail_t.shape != (T,):
                raise ValueError(f"sequence {key!r}: tail {tuple(tail_t.shape)} must be [T={T}]")
            if torch.isnan(tail_t).any() or (tail_t > _POSITIVE_TOLERANCE).any():
                raise ValueError(f"sequence {key!r}: tail must be a log-mass (<= 0, no NaN)")
            tail_t = tail_t.clamp_max(0.0)
        return ids_tk, logprobs_tk, tail_t

    def _grow(self, need: int) -> None:
        cap = min(self.shard_tokens, max(self._capacity * 2, min(need, self.shard_tokens), 1024))
        new = {}
        for c in self._cols:
            arr = np.empty((cap, c.width) if c.width else (cap,), c.dtype)
            if self._fill:
                arr[:self._fill] = self._buf[c.name][:self._fill]
            new[c.name] = arr
        self._buf, self._capacity = new, cap

    def _flush(self) -> None:
        n = self._fill
        if n == 0:
            return
        arrays = []
        for c in self._cols:
            flat = pa.array(self._buf[c.name][:n].reshape(-1), type=_ARROW[c.dtype])
            arrays.append(pa.FixedSizeListArray.from_arrays(flat, c.width) if c.width else flat)
        batch = pa.RecordBatch.from_arrays(arrays, schema=self._schema)
        meta = _write_arrow(self.out_dir / _shard_name(len(self._shards)), batch, self._schema)
        self._shards.append({"file": meta["file"], "tokens": n, "bytes": meta["bytes"],
                             "sha256": meta["sha256"]})
        self._fill = 0
        faults.point("shard")  # FACTORY_KILL_AT test hook: a shard written, no manifest yet

    def close(self) -> dict:
        """Flush the last shard, write the sequence index and then the manifest; return it."""
        if self._manifest is not None:
            return self._manifest
        if self._closed:
            raise ArtifactError(f"logit cache writer for {self.out_dir} was aborted")
        self._flush()
        self._buf, self._capacity = {}, 0
        index = pa.table({"seq_id": pa.array(self._seq_ids, pa.string()),
                          "length": pa.array(np.frombuffer(self._lengths, np.int64), pa.int64())})
        index_meta = _write_arrow(self.out_dir / INDEX, index, index.schema)
        shard_bytes = sum(s["bytes"] for s in self._shards)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "spec": self.spec.to_dict(),
            "logprob_temperature": 1.0,
            "columns": {f.name: str(f.type) for f in self._schema},
            "row_bytes": self.spec.row_bytes,
            "tokens": self._tokens,
            "sequences": len(self._seq_ids),
            "seq_id_type": self._seq_id_type or "int",
            "shard_tokens": self.shard_tokens,
            "shards": self._shards,
            "index": index_meta,
            "bytes": shard_bytes,
            "bytes_per_token": shard_bytes / self._tokens if self._tokens else None,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_json_atomic(self.out_dir / MANIFEST, manifest)
        self._manifest, self._closed = manifest, True
        return manifest

    def abort(self) -> None:
        """Drop the buffer and delete the shards written so far; publish nothing."""
        self._closed = True
        self._buf, self._capacity, self._fill = {}, 0, 0
        for s in self._shards:
            (self.out_dir / s["file"]).unlink(missing_ok=True)
        self._shards = []

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._manifest is None:
            self.abort()


# ----------------------------------------------------------------------------------------------
# Reader
# ----------------------------------------------------------------------------------------------

# How to fix a mismatch, per field: the run asked for `want`, the cache holds `have`.
_FIX = {
    "k": "set the run's cache top-k to {have} to use this cache, or record a cache with k={want}",
    "mode": "set the run's cache mode to {have!r}, or record a cache in mode {want!r}",
    "encoding": "set the run's cache encoding to {have!r}, or record a cache with encoding {want!r}",
    "logprob_bits": "set the run's logprob_bits to {have}, or record a cache with {want} bits",
    "vocab_size": "this cache was recorded for another vocabulary: use the teacher and tokenizer "
                  "it was recorded with, or record a cache for this one",
    "teacher": "point the run at the cache recorded for teacher {want!r}, or rerun the teacher's "
               "record stage to build it",
    "sampling": "point the run at the cache recorded with these sampling settings, or rerun the "
                "teacher's record stage to build it",
}


class CacheBatch(NamedTuple):
    """Sequences decoded and right-padded to the longest: ids -1, log-probs and tail 0 at
    padding (so padded positions must be masked: ``mask_bt``)."""

    ids_btk: torch.Tensor  # int64
    logprobs_btk: torch.Tensor  # fp32
    tail_bt: torch.Tensor  # fp32
    lengths_b: torch.Tensor  # int64

    @property
    def mask_bt(self) -> torch.Tensor:
        return torch.arange(self.ids_btk.shape[1]) < self.lengths_b[:, None]


class CacheReader:
    """A finished logit cache, memory-mapped; ``expect`` is what the run asks for.

    ``expect`` (a CacheSpec, or a dict of some of its fields) is compared field by field with the
    manifest's spec; any difference is refused with an ArtifactError naming the directory, each
    field, both values and the fix. See the module docstring for what ``verify`` does.
    Sequences are addressed by position (``get(3)``, negative counts from the end) or by
    sequence id (``get("a7")``; an int id through ``index_of``).
    """

    def __init__(self, path: str | Path, expect: CacheSpec | dict | None = None, verify: bool = True):
        self.path = Path(path)
        self.manifest = self._load_manifest()
        self.spec = CacheSpec.from_dict(self.manifest["spec"])
        if expect is not None:
            self._match(expect)
        self._verify = verify
        self._verified: set[int] = set()
        self._columns = _columns(self.spec)
        self._schema = _schema(self.spec)
        self._mapped: dict[int, dict[str, np.ndarray]] = {}
        shards = self.manifest["shards"]
        for s in shards:
            check_size(self.path, self.path / s["file"], s["bytes"], MANIFEST)
        tokens_s = np.array([s["tokens"] for s in shards], dtype=np.int64)
        self._shard_starts = np.concatenate([[0], np.cumsum(tokens_s)])
        self._load_index()
        if int(self._shard_starts[-1]) != self.tokens or int(self._lengths.sum()) != self.tokens:
            raise ArtifactError(
                f"logit cache {self.path}: the manifest's token count ({self.tokens}), its shards "
                f"({int(self._shard_starts[-1])}) and its sequence index ({int(self._lengths.sum())})"
                f" disagree: the cache is corrupted. Delete the directory and rerun to rebuild it."
            )

    # -- opening --------------------------------------------------------------------------------
    def _load_manifest(self) -> dict:
        mpath = self.path / MANIFEST
        if not mpath.exists():
            what = "does not exist" if not self.path.exists() else f"has no {MANIFEST}"
            raise ArtifactError(
                f"logit cache {self.path} {what}: its writer never finished (interrupted, or "
                f"still running), so the cache is incomplete. Delete the directory and rerun the "
                f"teacher's record stage to rebuild it."
            )
        try:
            manifest = json.loads(mpath.read_text())
            version = manifest["format_version"]
            manifest["spec"], manifest["shards"], manifest["index"]  # noqa: B018 (presence)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ArtifactError(f"logit cache manifest {mpath} is unreadable ({err!r}): delete "
                                f"{self.path} and rerun to rebuild the cache.") from None
        if manifest.get("format") != FORMAT or version != FORMAT_VERSION:
            raise ArtifactError(
                f"logit cache {self.path} has format {manifest.get('format')!r} version {version}; "
                f"this code reads {FORMAT!r} version {FORMAT_VERSION}. Rebuild the cache with this "
                f"version (delete the directory and rerun)."
            )
        return manifest

    def _match(self, expect: CacheSpec | dict) -> None:
        want = expect.to_dict() if isinstance(expect, CacheSpec) else _canonical(dict(expect))
        have = self.spec.to_dict()
        unknown = sorted(set(want) - set(have))
        if unknown:
            raise ConfigError(f"unknown logit cache spec field(s) {unknown}; known: {sorted(have)}")
        if have["encoding"] == "plain" and want.get("encoding", "plain") == "plain":
            want.pop("logprob_bits", None)  # plain stores fp16 whatever the bit setting says
        bad = [f for f in want if want[f] != have[f]]
        if bad:
            lines = [f"  {f}: the cache has {have[f]!r}, the run asks for {want[f]!r}; fix: "
                     + _FIX[f].format(have=have[f], want=want[f]) for f in bad]
            raise ArtifactError(
                f"logit cache {self.path} does not match what the run asks for "
                f"({', '.join(bad)}):\n" + "\n".join(lines)
            )

    def _check_sha(self, file: Path, expected: str) -> None:
        got = file_sha256(file)
        if got != expected:
            raise ArtifactError(
                f"logit cache shard {file} fails its checksum (sha256 {got[:16]}..., the manifest "
                f"says {expected[:16]}...): it is corrupted or was modified. Delete {self.path} "
                f"and rerun to rebuild the cache."
            )

    def _load_index(self) -> None:
        meta = self.manifest["index"]
        file = self.path / meta["file"]
        check_size(self.path, file, meta["bytes"], MANIFEST)
        self._check_sha(file, meta["sha256"])  # small: O(sequences)
        table = self._open_arrow(file).read_all()
        self._ids_str: list[str] = table.column("seq_id").to_pylist()
        self._lengths = table.column("length").to_numpy().astype(np.int64)
        self._starts = np.cumsum(self._lengths) - self._lengths
        self._id_to_index: dict[str, int] | None = None

    def _open_arrow(self, file: Path):
        try:
            return ipc.open_file(pa.memory_map(str(file), "r"))
        except (pa.ArrowInvalid, OSError) as err:
            raise ArtifactError(f"logit cache file {file} is not a readable Arrow file ({err}): "
                                f"delete {self.path} and rerun to rebuild the cache.") from None

    def _shard(self, j: int) -> dict[str, np.ndarray]:
        """Column views of shard j over its memory map (checksummed first when verifying)."""
        cols = self._mapped.get(j)
        if cols is not None:
            return cols
        meta = self.manifest["shards"][j]
        file = self.path / meta["file"]
        if self._verify and j not in self._verified:
            self._check_sha(file, meta["sha256"])
            self._verified.add(j)
        reader = self._open_arrow(file)
        if reader.num_record_batches != 1 or not reader.schema.equals(self._schema):
            raise ArtifactError(f"logit cache shard {file} does not have the layout its manifest "
                                f"describes: delete {self.path} and rerun to rebuild the cache.")
        batch = reader.get_batch(0)
        if batch.num_rows != meta["tokens"]:
            raise ArtifactError(f"logit cache shard {file} holds {batch.num_rows} rows, the "
                                f"manifest says {meta['tokens']}: delete {self.path} and rerun.")
        cols = {}
        for c, arr in zip(self._columns, batch.columns):
            if c.width:
                cols[c.name] = arr.values.to_numpy(zero_copy_only=True).reshape(-1, c.width)
            else:
                cols[c.name] = arr.to_numpy(zero_copy_only=True)
        self._mapped[j] = cols
        return cols

    def __getstate__(self) -> dict:
        # DataLoader workers (spawn) get the reader without its maps and re-map lazily, instead
        # of pickling the mapped shards' bytes
        return {**self.__dict__, "_mapped": {}}

    def verify(self) -> None:
        """Recompute every shard's sha256 now; raise naming the first shard that fails."""
        for j, meta in enumerate(self.manifest["shards"]):
            file = self.path / meta["file"]
            check_size(self.path, file, meta["bytes"], MANIFEST)
            self._check_sha(file, meta["sha256"])
            self._verified.add(j)

    # -- sizes and ids --------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._lengths)

    @property
    def tokens(self) -> int:
        return int(self.manifest["tokens"])

    @property
    def lengths(self) -> np.ndarray:
        return self._lengths

    @property
    def bytes_per_token(self) -> float | None:
        return self.manifest["bytes_per_token"]

    @property
    def seq_ids(self) -> list[int | str]:
        if self.manifest["seq_id_type"] == "int":
            return [int(s) for s in self._ids_str]
        return list(self._ids_str)

    def index_of(self, seq_id: int | str) -> int:
        if self._id_to_index is None:
            self._id_to_index = {s: i for i, s in enumerate(self._ids_str)}
        try:
            return self._id_to_index[str(seq_id)]
        except KeyError:
            raise KeyError(f"sequence {seq_id!r} is not in the logit cache {self.path}") from None

    # -- decoding -------------------------------------------------------------------------------
    def _gather(self, rows_n: np.ndarray) -> dict[str, np.ndarray]:
        """The encoded columns of global rows (any order), copied out of the shards."""
        out = {c.name: np.empty((len(rows_n), c.width) if c.width else (len(rows_n),), c.dtype)
               for c in self._columns}
        if len(rows_n) == 0:
            return out
        shard_n = np.searchsorted(self._shard_starts, rows_n, side="right") - 1
        if shard_n.min() == shard_n.max():  # the common case: one shard, often one run of rows
            j = int(shard_n[0])
            local = rows_n - self._shard_starts[j]
            a, b = int(local[0]), int(local[-1]) + 1
            contiguous = b - a == len(local) and bool(np.all(np.diff(local) == 1))
            # views into the map when contiguous: _decode copies whatever it keeps
            return {name: (v[a:b] if contiguous else v[local]) for name, v in self._shard(j).items()}
        for j in np.unique(shard_n):
            sel = np.nonzero(shard_n == j)[0]
            local = rows_n[sel] - self._shard_starts[j]
            for name, v in self._shard(int(j)).items():
                out[name][sel] = v[local]
        return out

    def _positions(self, indices) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if len(idx) and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"sequence index out of range for the {n} sequences of {self.path}")
        return np.where(idx < 0, idx + n, idx)

    def batch_flat(self, indices: Iterable[int]):
        """Sequences concatenated: (ids [N, k] int64, logprobs [N, k] fp32, tail [N] fp32,
        lengths [B] int64), N the sum of the lengths, in the order asked."""
        idx = self._positions(indices)
        lengths_b = self._lengths[idx]
        out_start_b = np.cumsum(lengths_b) - lengths_b
        total = int(lengths_b.sum())
        rows_n = np.arange(total, dtype=np.int64) + np.repeat(self._starts[idx] - out_start_b, lengths_b)
        ids_nk, logprobs_nk, tail_n = _decode(self.spec, self._gather(rows_n))
        return ids_nk, logprobs_nk, tail_n, torch.from_numpy(lengths_b.copy())

    def batch(self, indices: Iterable[int]) -> CacheBatch:
        """Sequences decoded together and right-padded (see CacheBatch)."""
        ids_nk, logprobs_nk, tail_n, lengths_b = self.batch_flat(indices)
        B, k = len(lengths_b), self.spec.k
        T = int(lengths_b.max()) if B else 0
        ids = torch.full((B, T, k), -1, dtype=torch.long)
        lps = torch.zeros(B, T, k)
        tail = torch.zeros(B, T)
        a = 0
        for b, L in enumerate(lengths_b.tolist()):  # one block copy per sequence
            ids[b, :L], lps[b, :L], tail[b, :L] = ids_nk[a:a + L], logprobs_nk[a:a + L], tail_n[a:a + L]
            a += L
        return CacheBatch(ids, lps, tail, lengths_b)

    def get(self, key: int | str):
        """One sequence: (ids [T, k] int64, logprobs [T, k] fp32, tail [T] fp32). An int is a
        position, a str a sequence id."""
        i = self.index_of(key) if isinstance(key, str) else key
        ids_tk, logprobs_tk, tail_t, _ = self.batch_flat([i])
        return ids_tk, logprobs_tk, tail_t

    __getitem__ = get


# ----------------------------------------------------------------------------------------------
# Fidelity: what the tests and the benchmark measure the encodings with
# ----------------------------------------------------------------------------------------------


def _coarsened(ids_nk: torch.Tensor, logprobs_nk: torch.Tensor, tail_n: torch.Tensor):
    """Rows as normalised fp64 log-distributions over {distinct ids sorted, tail}: (ids [n, k]
    sorted, log-probs [n, k + 1] with -inf at repeated ids)."""
    ids_s, order = ids_nk.sort(-1)
    lp = logprobs_nk.double().gather(-1, order)
    dup = torch.zeros_like(ids_s, dtype=torch.bool)
    dup[:, 1:] = ids_s[:, 1:] == ids_s[:, :-1]
    lp = torch.cat([lp.masked_fill(dup, float("-inf")), tail_n.double()[:, None]], -1)
    return ids_s, lp.log_softmax(-1)


def coarsened_kl(exact, stored) -> torch.Tensor:
    """Per-token KL(exact || stored) in nats over the coarsened distribution {distinct ids, tail},
    each side renormalised over its k + 1 outcomes (as the sparse losses do). ``exact`` and
    ``stored`` are (ids [n, k], logprobs [n, k], tail [n]) with the same id sets per row. [n]"""
    ids_a, lp_a = _coarsened(*exact)
    ids_b, lp_b = _coarsened(*stored)
    if not torch.equal(ids_a, ids_b):
        raise ValueError("exact and stored rows hold different ids")
    p = lp_a.exp()
    return torch.where(p > 0, p * (lp_a - lp_b), 0.0).sum(-1)


def synthetic_lm_logits(n: int, vocab: int = 151_936, generator: torch.Generator | None = None,
                        profile: str = "mixed") -> torch.Tensor:
    """Zipf-like next-token logits [n, vocab] standing in for a real LM's, to measure fidelity.

    Per row: ``-s log(rank + 2) + N(0, 0.5^2)`` with the ranks scattered over the vocabulary by a
    random rotation of a fixed permutation. ``mixed``: s ~ U(0.8, 2.5), and half the rows get
    a confident top token (+U(2, 12) on its logit): entropies from ~0 to ~8 nats, mean ~2.8,
    top-1 probability ~0.57 on average. ``flat``: s ~ U(0.9, 1.2), no boost: high-entropy rows
    (~8 nats) whose top-64 carry ~1/3 of the mass, the hard case for the quantiser."""
    if profile not in ("mixed", "flat"):
        raise ValueError(f"profile {profile!r} is not 'mixed' or 'flat'")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    lo, hi = (0.8, 2.5) if profile == "mixed" else (0.9, 1.2)
    s_n1 = torch.empty(n, 1).uniform_(lo, hi, generator=g)
    z_nv = -s_n1 * torch.log(torch.arange(vocab, dtype=torch.float32) + 2.0)
    z_nv += 0.5 * torch.randn(n, vocab, generator=g)
    if profile == "mixed":
        boost_n = torch.empty(n).uniform_(2.0, 12.0, generator=g)
        z_nv[:, 0] += torch.where(torch.rand(n, generator=g) < 0.5, boost_n, 0.0)
    perm_v = torch.randperm(vocab, generator=g)
    shift_n = torch.randint(0, vocab, (n,), generator=g)
    # token id of rank r in row i: perm[(r + shift_i) % vocab]
    ids_nv = perm_v[(torch.arange(vocab) + shift_n[:, None]) % vocab]
    return torch.empty_like(z_nv).scatter_(-1, ids_nv, z_nv)
