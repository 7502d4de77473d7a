"""The logit cache (teachers/cache.py): encodings, fidelity, shards, manifest checks (seconds)."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
import torch

from factory.errors import ArtifactError, ConfigError
from factory.losses import sparse_divergence
from teachers.cache import (
    INDEX,
    LOGPROB_FLOOR,
    MANIFEST,
    CacheReader,
    CacheSpec,
    CacheWriter,
    coarsened_kl,
    from_logits,
    pack_bits,
    scored_rows,
    synthetic_lm_logits,
    tail_from_logprobs,
    unpack_bits,
)

pytestmark = pytest.mark.unit

QWEN_VOCAB = 151_936
FP16_REL = 2.0**-11  # fp16 round-to-nearest: relative error at most half an ulp
SAMPLING = {"temperature": 0.6, "top_p": 0.95, "top_k": 20}


def _rows(n: int, k: int, mode: str, profile: str = "mixed", vocab: int = QWEN_VOCAB, seed: int = 0):
    """(ids, logprobs, tail) of n tokens from Zipf-like logits, 64 rows of logits at a time."""
    g = torch.Generator().manual_seed(seed)
    parts = [from_logits(synthetic_lm_logits(min(64, n - a), vocab, g, profile), k, mode, g)
             for a in range(0, n, 64)]
    return tuple(torch.cat(p) for p in zip(*parts))


@pytest.fixture(scope="module")
def topk64():
    return _rows(128, 64, "topk")


@pytest.fixture(scope="module")
def sampled64():
    return _rows(96, 64, "sampled", seed=1)


def _spec(**kw) -> CacheSpec:
    base = dict(k=64, mode="topk", encoding="compact", vocab_size=QWEN_VOCAB,
                teacher="qwen3-235b-a22b", sampling=SAMPLING)
    return CacheSpec(**{**base, **kw})


def _write(path, spec, rows, lengths, shard_tokens=1_000_000, ids=None):
    ids_all, lp_all, tail_all = rows
    a = 0
    with CacheWriter(path, spec, shard_tokens=shard_tokens) as w:
        for i, T in enumerate(lengths):
            w.add(ids[i] if ids else i, ids_all[a:a + T], lp_all[a:a + T], tail_all[a:a + T])
            a += T
    return a


def _read_all(reader):
    got = [reader.get(i) for i in range(len(reader))]
    return tuple(torch.cat(x) for x in zip(*got))


def _by_logprob(rows):
    """Slots sorted by log-prob, descending (stable): the order the compact encoding stores."""
    ids, lp, tail = rows
    lp_s, order = lp.sort(dim=-1, descending=True, stable=True)
    return ids.gather(-1, order), lp_s, tail


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 3, 7, 8, 13, 18, 25, 26, 32, 40])
@pytest.mark.parametrize("m", [1, 2, 17, 64])
def test_pack_bits_round_trip(bits, m):
    rng = np.random.default_rng(bits * 100 + m)
    values = rng.integers(0, 2**bits, (9, m), dtype=np.int64)
    values[0] = 2**bits - 1  # all ones: no bit may leak into a neighbour
    packed = pack_bits(values, bits)
    assert packed.shape == (9, math.ceil(m * bits / 8)) and packed.dtype == np.uint8
    np.testing.assert_array_equal(unpack_bits(packed, m, bits), values)


def test_id_bits_and_row_bytes_at_qwen_vocab():
    spec = _spec()
    assert spec.id_bits == 18  # ceil(log2(151,936 + 1))
    assert spec.row_bytes == 144 + 2 + 2 + 62 + 2 <= 256
    assert _spec(encoding="plain").row_bytes == 64 * 4 + 64 * 2 + 4


def test_from_logits_topk_matches_fp64_and_tail_is_exact():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 500, generator=g) * 3
    logits[0, 7] = 40.0  # a confident row: tail ~ 1e-15, lost by 1 - sum(p) in fp32
    ids, lp, tail = from_logits(logits, 16, "topk")
    ref = logits.double().log_softmax(-1)
    ref_lp, ref_ids = ref.topk(16)
    torch.testing.assert_close(ids, ref_ids)
    torch.testing.assert_close(lp.double(), ref_lp, rtol=0, atol=1e-5)
    ref_tail = ref.scatter(-1, ref_ids, float("-inf")).logsumexp(-1)
    torch.testing.assert_close(tail.double(), ref_tail, rtol=1e-5, atol=1e-5)
    assert -45 < tail[0] < -25  # resolved, not rounded to log(0) or to garbage
    # the mass adds up: k tokens + tail = 1
    total = torch.cat([lp.double(), tail.double()[:, None]], -1).logsumexp(-1)
    torch.testing.assert_close(total, torch.zeros(6, dtype=torch.float64), rtol=0, atol=1e-5)


def test_scored_rows_reads_the_realised_tokens_log_prob_from_the_same_pass():
    """The scorer's fourth output (each target's log-prob) equals an fp64 log-softmax's, also
    when the target is one of the kept top-k ids (read before they are masked for the tail)
    and across chunk boundaries; the first three outputs are from_logits's."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(9, 300, generator=g) * 3
    targets = torch.randint(0, 300, (9,), generator=g)
    targets[0] = logits[0].argmax()  # inside the top-k
    ids, lp, tail, target_lp = scored_rows(logits, 8, "topk", None, targets)
    ref = logits.double().log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(target_lp.double(), ref, rtol=0, atol=1e-5)
    for got, want in zip((ids, lp, tail), from_logits(logits, 8, "topk")):
        torch.testing.assert_close(got, want)
    assert scored_rows(logits, 8)[3] is None


def test_from_logits_sampled_draws_from_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]])
    p = logits.softmax(-1)[0]
    ids, lp, tail = from_logits(logits.expand(40, 5), 256, "sampled", torch.Generator().manual_seed(0))
    freq = torch.bincount(ids.reshape(-1), minlength=5).double() / ids.numel()
    torch.testing.assert_close(freq, p.double(), rtol=0, atol=0.01)  # with replacement, unbiased
    torch.testing.assert_close(lp, logits.log_softmax(-1)[0][ids])
    # tail over the *distinct* drawn ids
    drawn = torch.zeros(40, 5, dtype=torch.bool).scatter_(-1, ids, True)
    ref_tail = torch.where(drawn, 0.0, p).sum(-1).log()
    torch.testing.assert_close(tail, ref_tail, rtol=1e-4, atol=1e-6)


def test_tail_derived_from_logprobs_when_not_given(tmp_path):
    ids, lp, tail = _rows(64, 16, "topk", vocab=2000)
    moderate = tail > -4  # where 1 - sum(p) of fp32 log-probs still resolves the tail well
    torch.testing.assert_close(tail_from_logprobs(ids, lp)[moderate], tail[moderate], rtol=0, atol=1e-3)
    with CacheWriter(tmp_path, _spec(k=16, vocab_size=2000, encoding="plain")) as w:
        w.add(0, ids, lp)  # no tail
    _, _, stored = CacheReader(tmp_path).get(0)
    torch.testing.assert_close(stored[moderate], tail[moderate], rtol=0, atol=1e-3)


# ----------------------------------------------------------------------------------------------
# Round trips and fidelity
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["plain", "compact"])
@pytest.mark.parametrize("mode", ["topk", "sampled"])
def test_round_trip(tmp_path, topk64, sampled64, mode, encoding):
    rows = topk64 if mode == "topk" else sampled64
    spec = _spec(mode=mode, encoding=encoding)
    n = _write(tmp_path, spec, rows, [40, 1, 0, 33, len(rows[0]) - 74])
    reader = CacheReader(tmp_path, expect=spec)
    assert (len(reader), reader.tokens) == (5, n)
    ids, lp, tail = _read_all(reader)
    assert ids.dtype == torch.long and lp.dtype == torch.float32 and tail.dtype == torch.float32
    if encoding == "plain":
        ids0, lp0, tail0 = rows
        torch.testing.assert_close(ids, ids0, rtol=0, atol=0)  # same slots, same order
        assert ((lp - lp0).abs() <= lp0.abs() * FP16_REL + 1e-7).all()
        torch.testing.assert_close(tail, tail0, rtol=0, atol=0)  # fp32
        return
    ids0, lp0, tail0 = _by_logprob(rows)
    torch.testing.assert_close(ids, ids0, rtol=0, atol=0)
    # documented bound: half a quantisation step of the row's range + fp16 rounding of the ends
    hi, lo = lp0[:, :1], lp0[:, -1:]
    step = (hi - lo) / (2**spec.logprob_bits - 1)
    bound = step / 2 + (hi.abs() + lo.abs()) * FP16_REL + 1e-6
    err = (lp - lp0).abs()
    assert (err <= bound).all(), float((err - bound).max())
    assert (err[:, [0, -1]] <= lp0[:, [0, -1]].abs() * FP16_REL + 1e-7).all()  # ends: fp16
    assert ((tail - tail0).abs() <= tail0.abs() * FP16_REL + 1e-7).all()


@pytest.mark.parametrize("mode,profile", [("topk", "mixed"), ("topk", "flat"), ("sampled", "mixed")])
def test_compact_coarsened_kl_under_target(tmp_path, topk64, sampled64, mode, profile):
    """Mean KL(exact || stored) over {k ids, tail} < 1e-3 nats per token at k = 64, V = 151,936,
    on Zipf-like logits (see synthetic_lm_logits; 'flat' is the high-entropy hard case)."""
    if profile == "flat":
        rows = _rows(64, 64, mode, profile, seed=2)
    else:
        rows = topk64 if mode == "topk" else sampled64
    spec = _spec(mode=mode)
    _write(tmp_path, spec, rows, [len(rows[0])])
    kl = coarsened_kl(rows, CacheReader(tmp_path, expect=spec).get(0))
    assert (kl > -1e-12).all()
    assert kl.mean() < 1e-3 and kl.max() < 1e-3, (float(kl.mean()), float(kl.max()))
    assert kl.mean() < 1e-4  # measured ~6e-6 (mixed) to ~1e-5: a wide margin, keep it


def test_cached_rows_give_the_loss_the_exact_divergence(tmp_path):
    """Through a padded batch into factory.losses: stored ~ exact, padding masked out."""
    vocab, k = 3000, 32
    ids, lp, tail = _rows(40, k, "topk", vocab=vocab)
    _write(tmp_path, _spec(k=k, vocab_size=vocab), (ids, lp, tail), [25, 15])
    batch = CacheReader(tmp_path).batch([0, 1])
    assert batch.ids_btk.shape == (2, 25, k) and batch.mask_bt.sum() == 40
    assert (batch.ids_btk[1, 15:] == -1).all()
    student = torch.randn(2, 25, vocab, generator=torch.Generator().manual_seed(3))
    got = sparse_divergence(student, batch.ids_btk, batch.logprobs_btk, batch.mask_bt,
                            teacher_tail_logprob=batch.tail_bt)

    def pad(x_n, fill):  # the exact rows as [2, 25, ...]: sequence 1 padded by 10 positions
        filler = torch.full((10, *x_n.shape[1:]), fill, dtype=x_n.dtype)
        return torch.stack([x_n[:25], torch.cat([x_n[25:], filler])])

    want = sparse_divergence(student, pad(ids, 0), pad(lp, 0.0), batch.mask_bt,
                             teacher_tail_logprob=pad(tail, 0.0))
    assert want > 0.1  # a real divergence, not a trivially matching 0
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)


def test_minus_inf_logprob_is_stored_as_the_floor(tmp_path):
    ids = torch.tensor([[3, 5, 9]])
    lp = torch.tensor([[-0.1, -2.5, float("-inf")]])
    with CacheWriter(tmp_path, _spec(k=3, vocab_size=10, encoding="plain")) as w:
        w.add(0, ids, lp, torch.tensor([-3.0]))
    _, got, _ = CacheReader(tmp_path).get(0)
    assert got[0, 2] == LOGPROB_FLOOR and torch.isfinite(got).all()


# ----------------------------------------------------------------------------------------------
# Shards and the writer's memory
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["plain", "compact"])
def test_multi_shard_reads_back_in_order(tmp_path, topk64, encoding):
    spec = _spec(encoding=encoding)
    lengths = [5, 0, 13, 1, 20, 7, 7, 2, 30, 3, 40]  # some longer than a shard
    n = _write(tmp_path, spec, topk64, lengths, shard_tokens=16)
    reader = CacheReader(tmp_path, expect=spec)
    shards = reader.manifest["shards"]
    assert [s["tokens"] for s in shards] == [16] * (n // 16) + ([n % 16] if n % 16 else [])
    assert [s["file"] for s in shards] == [f"shard-{j:05d}.arrow" for j in range(len(shards))]
    assert reader.lengths.tolist() == lengths and reader.seq_ids == list(range(len(lengths)))
    ids0, lp0, tail0 = topk64 if encoding == "plain" else _by_logprob(topk64)
    ids, lp, tail = _read_all(reader)
    torch.testing.assert_close(ids, ids0[:n], rtol=0, atol=0)
    torch.testing.assert_close(lp, lp0[:n], rtol=0, atol=0.1)
    # a batch across shards, out of order, decodes the same as one at a time
    order = [8, 2, 10, 1, 4]
    batch = reader.batch(order)
    for b, i in enumerate(order):
        ids_i, lp_i, tail_i = reader.get(i)
        T = len(ids_i)
        torch.testing.assert_close(batch.ids_btk[b, :T], ids_i, rtol=0, atol=0)
        torch.testing.assert_close(batch.logprobs_btk[b, :T], lp_i, rtol=0, atol=0)
        torch.testing.assert_close(batch.tail_bt[b, :T], tail_i, rtol=0, atol=0)
        assert batch.lengths_b[b] == T and batch.mask_bt[b].sum() == T
    assert reader.get(-1)[0].shape == (40, 64)


def test_writer_holds_at_most_one_shard(tmp_path):
    spec = _spec(k=4, vocab_size=1000, encoding="compact")
    g = torch.Generator().manual_seed(0)
    shard, total = 100, 0
    w = CacheWriter(tmp_path, spec, shard_tokens=shard)
    for i in range(120):
        T = int(torch.randint(0, 37, (1,), generator=g)) + (250 if i == 60 else 0)
        ids = torch.randint(0, 1000, (T, 4), generator=g)
        lp = -torch.rand(T, 4, generator=g) * 10
        w.add(i, ids, lp)
        total += T
        assert w.buffered_tokens < shard and w.buffer_capacity <= shard
        assert w.buffered_tokens == total % shard  # every full shard already left memory
        assert len(list(tmp_path.glob("shard-*.arrow"))) == total // shard
    manifest = w.close()
    assert manifest["tokens"] == total and manifest["sequences"] == 120
    assert [s["tokens"] for s in manifest["shards"]] == [shard] * (total // shard) + [total % shard]
    for s in manifest["shards"]:
        assert (tmp_path / s["file"]).stat().st_size == s["bytes"]
    assert manifest["bytes_per_token"] == sum(s["bytes"] for s in manifest["shards"]) / total


def test_large_cache_bytes_per_token_near_the_payload(tmp_path, topk64):
    """Arrow's schema and footer are noise at realistic shard sizes: the file is the payload."""
    spec = _spec()
    tiled = tuple(x.repeat(64, *([1] * (x.dim() - 1))) for x in topk64)  # 8,192 tokens
    _write(tmp_path, spec, tiled, [1024] * 8)
    bpt = CacheReader(tmp_path).bytes_per_token
    assert spec.row_bytes <= bpt < spec.row_bytes + 1 and bpt <= 256


# ----------------------------------------------------------------------------------------------
# Refusals
# ----------------------------------------------------------------------------------------------


def _small_cache(path, shard_tokens=20, **kw):
    spec = _spec(k=8, vocab_size=5000, **kw)
    rows = _rows(60, 8, "topk", vocab=5000)
    _write(path, spec, rows, [30, 30], shard_tokens=shard_tokens)
    return spec


def test_bit_flipped_shard_is_refused_naming_the_file(tmp_path):
    _small_cache(tmp_path)
    shard = tmp_path / "shard-00002.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    reader = CacheReader(tmp_path)
    reader.batch_flat([0])  # rows 0..29: shards 0 and 1 only, both intact
    with pytest.raises(ArtifactError, match=r"shard-00002\.arrow.*checksum"):
        reader.get(1)  # rows 30..59 touch shard 2
    with pytest.raises(ArtifactError, match=r"shard-00002\.arrow.*checksum"):
        CacheReader(tmp_path).verify()


def test_truncated_shard_is_refused_at_open_even_without_verify(tmp_path):
    _small_cache(tmp_path)
    shard = tmp_path / "shard-00001.arrow"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match=r"shard-00001\.arrow.*truncated"):
        CacheReader(tmp_path, verify=False)


def test_missing_shard_and_damaged_index_are_refused(tmp_path):
    _small_cache(tmp_path)
    index = tmp_path / INDEX
    data = bytearray(index.read_bytes())
    data[-40] ^= 0x01
    index.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=rf"{INDEX}.*checksum"):
        CacheReader(tmp_path, verify=False)
    (tmp_path / "shard-00000.arrow").unlink()
    with pytest.raises(ArtifactError, match=r"shard-00000\.arrow.*missing"):
        CacheReader(tmp_path)


@pytest.mark.parametrize("field,value", [
    ("k", 16), ("teacher", "qwen3-32b"), ("encoding", "plain"), ("mode", "sampled"),
    ("vocab_size", 6000), ("sampling", {"temperature": 0.7, "top_p": 0.8, "top_k": 20}),
    ("logprob_bits", 6),
])
def test_mismatched_manifest_is_refused_naming_the_field(tmp_path, field, value):
    spec = _small_cache(tmp_path)
    want = CacheSpec(**{**spec.to_dict(), field: value})
    with pytest.raises(ArtifactError) as err:
        CacheReader(tmp_path, expect=want)
    msg = str(err.value)
    have = spec.to_dict()[field]
    assert str(tmp_path) in msg and f"{field}:" in msg and "fix:" in msg
    assert repr(have) in msg and repr(want.to_dict()[field]) in msg
    # a dict names only the fields the run cares about
    with pytest.raises(ArtifactError, match=field):
        CacheReader(tmp_path, expect={field: value})


def test_matching_expectations_pass(tmp_path):
    spec = _small_cache(tmp_path)
    CacheReader(tmp_path, expect=spec)
    CacheReader(tmp_path, expect={"k": 8, "teacher": "qwen3-235b-a22b"})
    # JSON-equal sampling settings match (tuple vs list, 20 vs 20.0)
    CacheReader(tmp_path, expect={"sampling": {"top_k": 20.0, "top_p": 0.95, "temperature": 0.6}})
    with pytest.raises(ConfigError, match="unknown"):
        CacheReader(tmp_path, expect={"topk": 8})


def test_interrupted_writer_leaves_no_cache(tmp_path):
    spec = _spec(k=8, vocab_size=5000)
    ids, lp, tail = _rows(60, 8, "topk", vocab=5000)
    w = CacheWriter(tmp_path, spec, shard_tokens=20)
    w.add(0, ids, lp, tail)  # three shards on disk, then the process "dies": no close()
    del w
    assert len(list(tmp_path.glob("shard-*.arrow"))) == 3 and not (tmp_path / MANIFEST).exists()
    with pytest.raises(ArtifactError, match=rf"{MANIFEST}.*never finished"):
        CacheReader(tmp_path)
    # a new writer starts clean: the leftovers go, and the cache it closes is whole
    with CacheWriter(tmp_path, spec, shard_tokens=50) as w:
        w.add(0, ids[:10], lp[:10], tail[:10])
    assert sorted(p.name for p in tmp_path.glob("shard-*.arrow")) == ["shard-00000.arrow"]
    assert CacheReader(tmp_path).tokens == 10


def test_exception_inside_with_publishes_nothing(tmp_path):
    ids, lp, tail = _rows(30, 8, "topk", vocab=5000)
    with pytest.raises(RuntimeError):
        with CacheWriter(tmp_path, _spec(k=8, vocab_size=5000), shard_tokens=10) as w:
            w.add(0, ids, lp, tail)
            raise RuntimeError("teacher crashed")
    assert not list(tmp_path.glob("shard-*")) and not (tmp_path / MANIFEST).exists()


def test_writer_refuses_bad_rows_and_a_finished_cache(tmp_path):
    spec = _spec(k=4, vocab_size=100, encoding="plain")
    w = CacheWriter(tmp_path / "c", spec)
    ok_ids, ok_lp = torch.tensor([[1, 2, 3, 4]]), torch.full((1, 4), -2.0)
    with pytest.raises(ValueError, match=r"\[T, k=4\]"):
        w.add(0, torch.zeros(1, 5, dtype=torch.long), torch.zeros(1, 5))
    with pytest.raises(ValueError, match="vocab_size=100"):
        w.add(0, torch.tensor([[1, 2, 3, 100]]), ok_lp)
    with pytest.raises(ValueError, match="log-probabilities"):
        w.add(0, ok_ids, torch.tensor([[0.5, -1.0, -2.0, -3.0]]))
    w.add(0, ok_ids, ok_lp)
    with pytest.raises(ValueError, match="already added"):
        w.add(0, ok_ids, ok_lp)
    with pytest.raises(ValueError, match="one type"):
        w.add("x", ok_ids, ok_lp)
    w.close()
    with pytest.raises(ArtifactError, match="already holds a complete"):
        CacheWriter(tmp_path / "c", spec)
    with pytest.raises(ConfigError):
        CacheSpec(mode="nucleus")


def test_string_sequence_ids_and_manifest_contents(tmp_path):
    spec = _spec(k=8, vocab_size=5000)
    rows = _rows(30, 8, "topk", vocab=5000)
    _write(tmp_path, spec, rows, [10, 20], ids=["p3/s0", "p3/s1"])
    reader = CacheReader(tmp_path)
    assert reader.seq_ids == ["p3/s0", "p3/s1"] and reader.index_of("p3/s1") == 1
    torch.testing.assert_close(reader.get("p3/s1")[0], reader.get(1)[0])
    with pytest.raises(KeyError, match="p9"):
        reader.get("p9")
    m = json.loads((tmp_path / MANIFEST).read_text())
    assert m["spec"] == spec.to_dict() and m["format_version"] == 1
    assert m["tokens"] == 30 and m["sequences"] == 2 and m["index"]["file"] == INDEX
    assert set(m["shards"][0]) == {"file", "tokens", "bytes", "sha256"}
    assert CacheSpec.from_dict(m["spec"]) == spec


def test_reader_pickles_without_its_mapped_shards(tmp_path):
    """DataLoader workers get a light reader that maps the shards again on first use."""
    _small_cache(tmp_path)
    reader = CacheReader(tmp_path)
    want = reader.get(1)
    assert reader._mapped  # shards 1 and 2 are mapped now
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._mapped == {}
    for a, b in zip(clone.get(1), want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
