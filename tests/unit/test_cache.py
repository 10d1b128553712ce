"""train.cache: reading rows of a (synthetic) cache, marking loader batches with their row numbers, checking a
run's items against the cache, creating / continuing / refusing a cache directory, checking a run against the
cache's fingerprint, the digests of a fingerprint, the dry-run plan, and the config rules of a cached teacher.
No teacher runs here: the shards are written by ``put_shard`` the way ``build`` writes them (``stored`` blocks
through ``write_shard``), with contents known from the global row number."""
import hashlib
import importlib
import json
import math
import os
import re
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train.cache.store as store
from train import data
from train import cache as tc
from train.cache.fingerprint import run_fields
from train.config import ConfigError, config_from_dict, load_config
from train.demo_task import demo_texts, make_demo_data
from train.tokenizer import load_tokenizer, train_sentencepiece

IGNORE = data.IGNORE_INDEX
TORCH = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


# ---------------------------------------------------------------------------------------------------- helpers


def content(rows: torch.Tensor, k: int, vocab: int):
    """The synthetic cache row of each global row number: distinct ids counting down from vocab - 1,
    values 0 then decreasing with a row-dependent slope (exact in fp16 and bf16), log_tail from the row number."""
    r = rows.to(torch.long).unsqueeze(-1)
    j = torch.arange(k)
    ids = (vocab - 1 - (r * k + j)) % vocab
    values = -j.float() * (0.5 + (r % 8).float() * 0.125)
    log_tail = -rows.to(torch.float32) * 0.25 - 1.0
    return ids, values, log_tail


def synthetic_fp(k: int, vocab: int, temperature: float = 1.0, over: dict | None = None) -> dict:
    fp = {"teacher": "demo-teacher", "teacher.digest": "preset:demo-teacher", "model.dtype": "fp32",
          "tokenizer": "t" * 32, "data.train": "0" * 64, "data.max_len": 48, "data.pack": False,
          "data.chat_template": False, "vocab": vocab, "k": k, "temperature": temperature, "dtype": "fp16"}
    fp.update(over or {})
    return fp


def layout_of(per_item, shard_items: int, vocab: int, items_sha256: str = "synthetic-items") -> tuple[dict, np.ndarray]:
    offsets = np.concatenate([[0], np.cumsum(np.asarray(per_item, dtype=np.int64))]).astype(np.int64)
    n = len(per_item)
    return ({"items": n, "rows": int(offsets[-1]), "shard_items": shard_items,
             "shards": math.ceil(n / shard_items), "id_bits": tc.id_bits(vocab), "items_sha256": items_sha256},
            offsets)


def put_shard(out: Path, s: int, offsets: np.ndarray, shard_items: int, k: int, vocab: int,
              dtype: str = "fp16", block: int = 5) -> None:
    """Shard ``s``: the rows of items [s * S, (s + 1) * S), as ``build`` writes them (``stored`` blocks of
    at most ``block`` rows, then ``write_shard``)."""
    n = len(offsets) - 1
    a, b = int(offsets[s * shard_items]), int(offsets[min((s + 1) * shard_items, n)])
    rows = torch.arange(a, b)
    blocks = [tc.stored(*content(rows[i:i + block], k, vocab), vocab, dtype) for i in range(0, max(b - a, 1), block)]
    tc.write_shard(out / f"shard-{s:05d}.safetensors", blocks, b - a)


def mark_complete(out: Path) -> None:
    m = json.loads((out / tc.MANIFEST).read_text())
    size = sum(f.stat().st_size for f in out.glob("shard-*.safetensors"))
    m.update(complete=True, bytes=size, bytes_per_token=size / max(m["rows"], 1))
    (out / tc.MANIFEST).write_text(json.dumps(m, indent=1))


def edit_manifest(out: Path, fn) -> None:
    m = json.loads((out / tc.MANIFEST).read_text())
    fn(m)
    (out / tc.MANIFEST).write_text(json.dumps(m))


def write_cache(out: Path, per_item, *, shard_items: int, k: int, vocab: int, fp: dict | None = None,
                dtype: str = "fp16", temperature: float = 1.0, complete: bool = True,
                shards_written: int | None = None, items_sha256: str = "synthetic-items") -> np.ndarray:
    """A cache directory as ``build`` leaves it (manifest + offsets by ``prepare``, then shards, then
    ``complete``); returns the offsets."""
    layout, offsets = layout_of(per_item, shard_items, vocab, items_sha256)
    fp = synthetic_fp(k, vocab, temperature, over={"dtype": dtype}) if fp is None else fp
    assert tc.prepare(out, fp, layout, offsets) is False
    for s in range(layout["shards"] if shards_written is None else shards_written):
        put_shard(out, s, offsets, shard_items, k, vocab, dtype)
    if complete:
        mark_complete(out)
    return offsets


def snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def assert_rows(got, numbers: torch.Tensor, k: int, vocab: int) -> None:
    ids, values, log_tail = content(numbers, k, vocab)
    assert got.ids.dtype == torch.int64 and got.values.dtype == torch.float32 and got.log_tail.dtype == torch.float32
    assert got.ids.shape == (numbers.numel(), k) and got.values.shape == (numbers.numel(), k)
    assert got.log_tail.shape == (numbers.numel(),)
    assert torch.equal(got.ids, ids)
    assert torch.equal(got.values, values)
    assert torch.equal(got.log_tail, log_tail)


class Edited(torch.utils.data.Dataset):
    """``base``'s first ``n`` items (all by default), item ``i`` a copy passed through ``fn``."""

    def __init__(self, base, i: int | None = None, fn=None, n: int | None = None):
        self.base, self.i, self.fn, self.n = base, i, fn, len(base) if n is None else n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, j: int) -> dict:
        item = self.base[j]
        if j == self.i:
            item = {key: np.array(v, copy=True) for key, v in item.items()}
            self.fn(item)
        return item


# ---------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Demo data, a second data file with other content, and two SentencePiece tokenizers of different
    vocabulary sizes trained on it."""
    root = tmp_path_factory.mktemp("cache-demo")
    train_path, _ = make_demo_data(root / "data", n_train=80, n_eval=4)
    lines = train_path.read_text().splitlines(keepends=True)
    other = root / "other.jsonl"
    other.write_text("".join(lines[: len(lines) // 2]))
    copy = root / "copy" / "train.jsonl"
    copy.parent.mkdir()
    copy.write_bytes(train_path.read_bytes())
    train_sentencepiece(demo_texts(train_path), root / "tokA", vocab_size=340)
    train_sentencepiece(demo_texts(train_path), root / "tokB", vocab_size=400)
    tok_a, tok_b = load_tokenizer(root / "tokA"), load_tokenizer(root / "tokB")
    assert tok_a.vocab_size != tok_b.vocab_size
    return {"root": root, "train": train_path, "other": other, "copy": copy, "tokA": root / "tokA",
            "tokB": root / "tokB", "tok": tok_a, "tok_b": tok_b}


@pytest.fixture(scope="module")
def ds(demo):
    return data.TokenizedDataset(demo["train"], demo["tok"], 48)


# Items with varied row counts (one with none), 3 items per shard: shard rows [0, 8), [8, 15), [15, 24)
PER_ITEM = [3, 5, 0, 2, 4, 1, 6, 3]
S, K, V = 3, 6, 300


@pytest.fixture
def small(tmp_path):
    out = tmp_path / "cache"
    offsets = write_cache(out, PER_ITEM, shard_items=S, k=K, vocab=V, temperature=2.0)
    return tc.TeacherCache(out), offsets


@pytest.fixture
def demo_cache(tmp_path, demo, ds):
    """A cache of the demo items (unpacked), with their digest; and its offsets."""
    offsets = write_cache(tmp_path / "c", tc.counted(ds), shard_items=16, k=4, vocab=demo["tok"].vocab_size,
                          items_sha256=tc.items_digest(ds))
    return tc.TeacherCache(tmp_path / "c"), offsets


# ---------------------------------------------------------------------------------------------------- rows


def test_layout_read_back(small):
    cache, offsets = small
    assert cache.k == K and cache.vocab == V and cache.temperature == 2.0 and cache.bits == tc.id_bits(V) == 9
    assert torch.equal(cache.offsets, torch.from_numpy(offsets))
    assert cache.bounds == [0, 8, 15, 24]
    assert cache.manifest["format"] == tc.FORMAT == 2 and cache.manifest["items_sha256"] == "synthetic-items"


def test_rows_in_shuffled_item_order(small):
    cache, offsets = small
    perm = [5, 0, 7, 2, 3, 6, 1, 4]
    numbers = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in perm])
    assert numbers.numel() == 24
    got = cache.rows(numbers)
    assert_rows(got, numbers, K, V)
    assert got.temperature == 2.0 and got.k == K and len(got) == 24


@pytest.mark.parametrize("numbers", [
    list(range(24)),                         # everything: two shard boundaries inside one run
    list(range(5, 17)),                      # a run starting in shard 0, through shard 1, into shard 2
    [7, 8], [14, 15],                        # the last row of a shard then the first of the next
    [9, 8, 7, 6],                            # descending: each row a run of its own, across a boundary
    [4, 4, 4], [20, 3, 21, 22, 0],           # repeats, and runs interleaved
    [0], [8], [23],                          # single rows: first, a shard's first, last
])
def test_rows_runs_and_single_rows(small, numbers):
    cache, _ = small
    numbers = torch.tensor(numbers, dtype=torch.long)
    assert_rows(cache.rows(numbers), numbers, K, V)


def test_rows_empty(small):
    cache, _ = small
    got = cache.rows(torch.empty(0, dtype=torch.long))
    assert got.ids.shape == (0, K) and got.values.shape == (0, K) and got.log_tail.shape == (0,)
    assert got.ids.dtype == torch.int64 and got.values.dtype == torch.float32 and len(got) == 0


def test_rows_to_device(small):
    cache, _ = small
    got = cache.rows(torch.tensor([3, 4]), device="cpu")
    assert got.ids.device.type == "cpu"
    assert_rows(got, torch.tensor([3, 4]), K, V)


@pytest.mark.parametrize("numbers, asked", [([24], "24..24"), ([-1], "-1..-1"), ([3, 24], "3..24"),
                                            ([0, -2, 5], "-2..5")])
def test_rows_out_of_range(small, numbers, asked):
    cache, _ = small
    with pytest.raises(tc.CacheError, match=rf"cache: rows {asked} asked, the cache holds 0\.\.23"):
        cache.rows(torch.tensor(numbers))


def test_rows_through_few_open_shards(tmp_path, monkeypatch):
    """More shards than the reader keeps open: each read past the limit closes the least recently used
    file, and a closed shard read again is opened again, with the same rows."""
    monkeypatch.setattr(store, "_OPEN_SHARDS", 2)
    out = tmp_path / "c"
    write_cache(out, [3, 2, 4, 1, 2, 3, 2, 2], shard_items=2, k=K, vocab=V)
    cache = tc.TeacherCache(out)
    b = cache.bounds
    assert len(b) == 5                                       # 4 shards
    for _ in range(3):                                       # a cycle: every read evicts a shard read before
        for s in range(4):
            numbers = torch.arange(b[s], b[s + 1])
            assert_rows(cache.rows(numbers), numbers, K, V)
            assert len(cache._open) <= 2 and s in cache._open
    for s in (3, 0, 3, 2, 1, 1, 0):                          # single rows, hopping between shards
        numbers = torch.tensor([b[s], b[s + 1] - 1])
        assert_rows(cache.rows(numbers), numbers, K, V)
    numbers = torch.arange(b[-1])                            # one run through all four shards
    assert_rows(cache.rows(numbers), numbers, K, V)
    numbers = torch.randperm(b[-1], generator=torch.Generator().manual_seed(0))
    assert_rows(cache.rows(numbers), numbers, K, V)          # every row a run of its own
    assert len(cache._open) <= 2


@pytest.mark.parametrize("vocab, bits", [(256, 8), (257, 9), (65536, 16), (65537, 17), (128256, 17), (256000, 18)])
def test_id_bits_boundaries_round_trip(tmp_path, vocab, bits):
    assert tc.id_bits(vocab) == bits
    assert tc.row_bytes(4, vocab, "fp16") == math.ceil(4 * bits / 8) + 4 * 2 + 4
    assert tc.row_bytes(4, vocab, "fp32") == math.ceil(4 * bits / 8) + 4 * 4 + 4
    out = tmp_path / "c"
    write_cache(out, [2, 3, 1], shard_items=2, k=4, vocab=vocab)
    assert json.loads((out / tc.MANIFEST).read_text())["id_bits"] == bits
    from safetensors import safe_open
    with safe_open(out / "shard-00000.safetensors", framework="pt") as f:
        stored = f.get_tensor("ids")
        assert stored.dtype == torch.uint8 and stored.shape == (5, math.ceil(4 * bits / 8))
    numbers = torch.arange(6)
    got = tc.TeacherCache(out).rows(numbers)
    assert_rows(got, numbers, 4, vocab)
    assert int(got.ids.max()) == vocab - 1            # the largest id survives the packing


@pytest.mark.parametrize("bits", [1, 7, 8, 9, 17, 18, 25])
@pytest.mark.parametrize("k", [1, 3, 64])
def test_packed_ids_are_the_little_endian_bit_string(bits, k):
    """pack_ids against the layout written out with Python integers: id j at bits [j * bits, (j + 1) * bits)."""
    g = torch.Generator().manual_seed(bits * 100 + k)
    ids = torch.randint(0, 2 ** bits, (6, k), generator=g)
    ids[0], ids[1] = 2 ** bits - 1, 0
    packed = tc.pack_ids(ids, bits)
    for row, got in zip(ids.tolist(), packed.tolist()):
        want = sum(v << (j * bits) for j, v in enumerate(row)).to_bytes(math.ceil(k * bits / 8), "little")
        assert bytes(got) == want
    assert torch.equal(tc.unpack_ids(packed, bits, k), ids)
    with pytest.raises(ValueError, match="at most 25"):
        tc.pack_ids(ids, 26)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_rows_fp32_and_bf16_values(tmp_path, dtype):
    out = tmp_path / dtype
    write_cache(out, [4, 4], shard_items=1, k=3, vocab=V, dtype=dtype)
    assert load_file(out / "shard-00001.safetensors")["values"].dtype == TORCH[dtype]
    numbers = torch.tensor([7, 2, 3, 4])
    got = tc.TeacherCache(out).rows(numbers)
    _, values, _ = content(numbers, 3, V)
    assert got.values.dtype == torch.float32
    assert torch.equal(got.values, values.to(TORCH[dtype]).float())


def test_write_shard_from_stored_blocks(tmp_path):
    """``stored`` packs the ids and casts the values; ``write_shard`` concatenates the blocks in order and
    writes the file atomically, readable like the job's other files; a wrong row count writes nothing."""
    vocab, k = 1000, 5
    bits = tc.id_bits(vocab)
    rows = torch.arange(10)
    ids, values, tail = content(rows, k, vocab)
    tail[4] = float("-inf")                                  # an empty tail (k = V) is stored as is
    blocks = [tc.stored(ids[a:b], values[a:b], tail[a:b].double(), vocab, "bf16") for a, b in ((0, 3), (3, 3), (3, 10))]
    p, v, t = blocks[2]
    assert p.dtype == torch.uint8 and p.shape == (7, math.ceil(k * bits / 8))
    assert v.dtype == torch.bfloat16 and t.dtype == torch.float32
    path = tmp_path / "shard-00000.safetensors"
    with pytest.raises(RuntimeError, match=r"shard-00000\.safetensors: 10 rows computed, 11 expected"):
        tc.write_shard(path, blocks, 11)
    assert list(tmp_path.iterdir()) == []
    tc.write_shard(path, blocks, 10)
    assert [f.name for f in tmp_path.iterdir()] == [path.name]      # no temporary left
    got = load_file(path)
    assert set(got) == {"ids", "values", "log_tail"}
    assert torch.equal(got["ids"], tc.pack_ids(ids, bits)) and torch.equal(tc.unpack_ids(got["ids"], bits, k), ids)
    assert torch.equal(got["values"], values.to(torch.bfloat16)) and torch.equal(got["log_tail"], tail)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert path.stat().st_size - tc.row_bytes(k, vocab, "bf16") * 10 < 400     # tensor data and a header


# ---------------------------------------------------------------------------------------------------- mark


def _check_marked(cache, batch, offsets):
    marked = cache.mark(batch)
    assert "index" not in marked and "index" in batch            # a copy; the loader's batch is left as it was
    assert "cache_rows" not in batch
    rows = marked["cache_rows"]
    labels = batch["labels"]
    assert rows.shape == labels.shape and rows.dtype == torch.int64
    mask = data.shift_labels(labels) != IGNORE
    assert torch.equal(rows == -1, ~mask)
    for b, i in enumerate(batch["index"].tolist()):
        have = rows[b][mask[b]]
        if mask[b].any():
            assert torch.equal(have, torch.arange(int(offsets[i]), int(offsets[i + 1])))
    return marked, mask


def test_mark_loader_batches(demo, ds, demo_cache):
    cache, offsets = demo_cache
    loader = data.make_loader(ds, batch_size=8, seed=3)
    cache.check_items(loader.dataset)
    seen = []
    for batch in loader:
        assert batch["index"].shape == (8,)
        marked, mask = _check_marked(cache, batch, offsets)
        numbers = marked["cache_rows"][mask]
        assert_rows(cache.rows(numbers), numbers, 4, demo["tok"].vocab_size)
        seen += batch["index"].tolist()
    assert len(seen) == len(loader) * 8 and len(set(seen)) == len(seen)


def test_mark_counted_matches_labels(ds):
    per = tc.counted(ds)
    assert len(per) == len(ds) and per.dtype == np.int64 and (per > 0).all()
    for i in (0, 5, len(ds) - 1):
        assert per[i] == sum(int(x) != IGNORE for x in ds[i]["labels"][1:])


def test_mark_sampler_top_up_repeats(ds, demo_cache):
    """A rank topped up with repeated items: the repeats lose their labels in the batch, so they get no rows;
    the items the run checks are the loader's dataset, which the top-up does not change."""
    cache, offsets = demo_cache
    n = len(ds)
    world = next(w for w in range(3, 20) if n % w)
    per_rank = math.ceil(n / world)
    loader = data.make_loader(ds, batch_size=per_rank, rank=world - 1, world_size=world, drop_last=False, seed=1)
    cache.check_items(loader.dataset)
    batch = next(iter(loader))
    repeats = (batch["labels"] == IGNORE).all(-1)
    assert repeats.any() and not repeats.all()
    marked, _ = _check_marked(cache, batch, offsets)
    assert (marked["cache_rows"][repeats] == -1).all()
    assert (marked["cache_rows"][~repeats] >= 0).any(-1).all()


def test_mark_does_not_check_counts(demo, ds, demo_cache):
    """mark numbers the counted positions from the item's offset and no more (the counts are compared once,
    by check_items): an item with one counted target fewer gets its first rows."""
    cache, offsets = demo_cache
    batch = data.Collator(demo["tok"].pad_id)([{**ds[i], "index": i} for i in (2, 7, 11)])
    _check_marked(cache, batch, offsets)
    labels = batch["labels"].clone()
    counted_at = (data.shift_labels(labels[1]) != IGNORE).nonzero().squeeze(-1)
    labels[1, int(counted_at[-1]) + 1] = IGNORE                       # item 7's last counted target dropped
    rows = cache.mark({**batch, "labels": labels})["cache_rows"]
    assert torch.equal(rows[1][rows[1] >= 0], torch.arange(int(offsets[7]), int(offsets[8]) - 1))


def test_mark_packed(tmp_path, demo, ds):
    packed = data.PackedDataset(ds, ds.max_len)
    assert len(packed) < len(ds)
    per = tc.counted(packed)
    # packing keeps every counted token: each example's first label was never a target
    assert per.sum() == tc.counted(ds).sum()
    offsets = write_cache(tmp_path / "c", per, shard_items=5, k=4, vocab=demo["tok"].vocab_size,
                          items_sha256=tc.items_digest(packed))
    cache = tc.TeacherCache(tmp_path / "c")
    loader = data.make_loader(ds, batch_size=2, pack=True, seed=0)
    assert isinstance(loader.dataset, data.PackedDataset)
    cache.check_items(loader.dataset)
    for batch in loader:
        _check_marked(cache, batch, offsets)
    # the packed cache does not serve unpacked items
    with pytest.raises(tc.CacheError, match=rf"this run's data makes {len(ds)} items, the cache holds {len(packed)}"):
        cache.check_items(ds)


# ---------------------------------------------------------------------------------------------------- check_items


def test_check_items_same_items(ds, demo_cache):
    cache, _ = demo_cache
    cache.check_items(ds)
    cache.check_items(Edited(ds, 3, lambda item: None))              # copies of the same items


def _drop_last_target(item):
    at = np.nonzero(item["labels"][1:] != IGNORE)[0]
    item["labels"][at[-1] + 1] = IGNORE


def _train_on_a_prompt_token(item):
    assert item["labels"][1] == IGNORE
    item["labels"][1] = item["input_ids"][1]


def _other_prompt_id(item):
    assert item["labels"][1] == IGNORE                              # not a target: the counts stay
    item["input_ids"][1] = (item["input_ids"][1] + 1) % 300


def _other_target_id(item):
    assert item["labels"][-1] != IGNORE
    item["labels"][-1] = item["input_ids"][-1] = (item["input_ids"][-1] + 1) % 300


@pytest.mark.parametrize("i, fn, delta", [(7, _drop_last_target, -1), (11, _train_on_a_prompt_token, +1)])
def test_check_items_other_counts(ds, demo_cache, i, fn, delta):
    """An item whose labels changed: caught by its count (before the digest, which differs too)."""
    cache, offsets = demo_cache
    want = int(offsets[i + 1] - offsets[i])
    edited = Edited(ds, i, fn)
    assert tc.items_digest(edited) != cache.manifest["items_sha256"]
    with pytest.raises(tc.CacheError, match=rf"c: item {i} has {want + delta} counted tokens in this run, {want} in "
                                            r"the cache, although files and settings match.*Write a cache with this "
                                            r"environment"):
        cache.check_items(edited)


@pytest.mark.parametrize("fn", [_other_prompt_id, _other_target_id])
def test_check_items_same_counts_other_ids(ds, demo_cache, fn):
    cache, _ = demo_cache
    edited = Edited(ds, 3, fn)
    assert (tc.counted(edited) == tc.counted(ds)).all()
    with pytest.raises(tc.CacheError, match=r"the items' token ids differ from the cache's.*tokenized differently"):
        cache.check_items(edited)


def test_check_items_other_number(ds, demo_cache):
    cache, _ = demo_cache
    n = len(ds)
    with pytest.raises(tc.CacheError, match=rf"this run's data makes {n - 1} items, the cache holds {n}"):
        cache.check_items(Edited(ds, n=n - 1))


def test_check_items_synthetic(small):
    cache, _ = small
    items = [{"input_ids": np.zeros(c + 2, dtype=np.int32), "labels": np.array([IGNORE, IGNORE] + [1] * c)}
             for c in PER_ITEM]
    with pytest.raises(tc.CacheError, match=r"token ids differ"):       # right counts, another digest
        cache.check_items(items)
    with pytest.raises(tc.CacheError, match=r"item 1 has 3 counted tokens in this run, 5 in the cache"):
        cache.check_items([items[0], items[0]] + items[2:])
    with pytest.raises(tc.CacheError, match=r"this run's data makes 9 items, the cache holds 8"):
        cache.check_items(items + items[:1])


# ---------------------------------------------------------------------------------------------------- opening


def test_open_missing(tmp_path):
    with pytest.raises(tc.CacheError, match=r"manifest\.json does not exist.*mode=cache-teacher cache\.out="):
        tc.TeacherCache(tmp_path / "nope")
    with pytest.raises(tc.CacheError, match=r"does not exist"):
        tc.TeacherCache(tmp_path)                            # an empty directory


def test_open_incomplete(tmp_path):
    out = tmp_path / "c"
    write_cache(out, PER_ITEM, shard_items=S, k=K, vocab=V, complete=False, shards_written=2)
    with pytest.raises(tc.CacheError, match=r"the cache is incomplete \(2 of 3 shards there\)\. Run the "
                                            r"mode=cache-teacher command that wrote it again"):
        tc.TeacherCache(out)
    put_shard(out, 2, layout_of(PER_ITEM, S, V)[1], S, K, V)
    with pytest.raises(tc.CacheError, match=r"incomplete \(3 of 3 shards there\)"):   # all written, not marked
        tc.TeacherCache(out)
    mark_complete(out)
    tc.TeacherCache(out)


def test_open_complete_with_missing_shards(tmp_path):
    out = tmp_path / "c"
    write_cache(out, PER_ITEM, shard_items=S, k=K, vocab=V)
    (out / "shard-00001.safetensors").unlink()
    with pytest.raises(tc.CacheError, match=r"the cache is damaged: shard files are missing \(2 of 3 shards there\)"):
        tc.TeacherCache(out)
    (out / "shard-00001.safetensors").mkdir()                # a directory in a shard's place is no shard
    with pytest.raises(tc.CacheError, match=r"damaged.*\(2 of 3 shards there\)"):
        tc.TeacherCache(out)


@pytest.mark.parametrize("text", ["{not json", "", '{"format": 2, "fingerprint": '])
def test_open_damaged_manifest(tmp_path, text):
    out = tmp_path / "c"
    write_cache(out, PER_ITEM, shard_items=S, k=K, vocab=V)
    (out / tc.MANIFEST).write_text(text)
    with pytest.raises(tc.CacheError, match=r"manifest.json: Expecting|was damaged"):
        tc.TeacherCache(out)


@pytest.mark.parametrize("text", ["[]", '{"name": "some other tool"}', '{"complete": false}'])
def test_manifest_of_another_shape_is_a_cache_error(tmp_path, text):
    out = tmp_path / "c"
    write_cache(out, PER_ITEM, shard_items=S, k=K, vocab=V)
    (out / tc.MANIFEST).write_text(text)
    with pytest.raises(tc.CacheError, match="not the manifest of a cache"):
        tc.check_out(out, synthetic_fp(K, V), S)
    with pytest.raises(tc.CacheError, match="not the manifest of a cache"):
        tc.TeacherCache(out)


@pytest.mark.parametrize("key", ["format", "fingerprint", "items", "rows", "shard_items", "shards", "id_bits",
                                 "complete", "fingerprint.vocab", "fingerprint.k", "fingerprint.temperature",
                                 "fingerprint.dtype", "fingerprint.tokenizer", "fingerprint.data.train",
                                 "fingerprint.data.max_len", "fingerprint.data.pack"])
def test_manifest_without_a_required_key(tmp_path, key):
    out = tmp_path / "c"
    write_cache(out, PER_ITEM, shard_items=S, k=K, vocab=V)
    fp_key = key.removeprefix("fingerprint.")
    edit_manifest(out, lambda m: m["fingerprint"].pop(fp_key) if fp_key != key else m.pop(key))
    for call in (lambda: tc.TeacherCache(out), lambda: tc.check_out(out, synthetic_fp(K, V), S)):
        with pytest.raises(tc.CacheError, match=r"manifest\.json: not the manifest of a cache; it was not written by "
                                                r"this kd-train's mode=cache-teacher"):
            call()


@pytest.mark.parametrize("fmt", [1, 3, "2"])
def test_manifest_of_another_format(tmp_path, fmt):
    out = tmp_path / "c"
    write_cache(out, PER_ITEM, shard_items=S, k=K, vocab=V)
    edit_manifest(out, lambda m: m.update(format=fmt))
    before = snapshot(out)
    layout, offsets = layout_of(PER_ITEM, S, V)
    for call in (lambda: tc.TeacherCache(out), lambda: tc.check_out(out, synthetic_fp(K, V), S),
                 lambda: tc.prepare(out, synthetic_fp(K, V), layout, offsets)):
        with pytest.raises(tc.CacheError, match=rf"manifest\.json: format {fmt}, this kd-train reads format 2.*"
                                                r"Write the cache again"):
            call()
    assert snapshot(out) == before


# ---------------------------------------------------------------------------------------------------- prepare


def test_prepare_fresh(tmp_path):
    out = tmp_path / "a" / "b"
    assert tc.check_out(out, synthetic_fp(K, V), S) is None                 # nothing there
    (tmp_path / "empty").mkdir()
    assert tc.check_out(tmp_path / "empty", synthetic_fp(K, V), S) is None  # an empty directory
    layout, offsets = layout_of(PER_ITEM, S, V)
    assert tc.prepare(out, synthetic_fp(K, V), layout, offsets) is False
    m = json.loads((out / tc.MANIFEST).read_text())
    assert m["complete"] is False and m["fingerprint"] == synthetic_fp(K, V) and m["format"] == tc.FORMAT
    assert {k: m[k] for k in layout} == layout
    assert torch.equal(load_file(out / tc.OFFSETS)["offsets"], torch.from_numpy(offsets))
    assert sorted(p.name for p in out.iterdir()) == [tc.MANIFEST, tc.OFFSETS]   # no temporary left


def test_prepare_continues_same_fingerprint(tmp_path):
    out = tmp_path / "c"
    fp = synthetic_fp(K, V)
    layout, offsets = layout_of(PER_ITEM, S, V)
    write_cache(out, PER_ITEM, shard_items=S, k=K, vocab=V, complete=False, shards_written=1)
    shard0 = (out / "shard-00000.safetensors").read_bytes()
    assert tc.check_out(out, fp, S)["complete"] is False
    assert tc.prepare(out, fp, layout, offsets) is False
    assert (out / "shard-00000.safetensors").read_bytes() == shard0      # written shards are kept
    for s in (1, 2):
        put_shard(out, s, offsets, S, K, V)
    with pytest.raises(tc.CacheError, match="incomplete"):
        tc.TeacherCache(out)
    mark_complete(out)
    assert tc.prepare(out, fp, layout, offsets) is True
    tc.TeacherCache(out)


def test_prepare_removes_only_stale_temporaries(tmp_path):
    """A part-written file untouched for ``_STALE_S`` seconds is a killed writer's, removed; a fresher one may
    belong to a writer still running (another job on the same cache.out), kept."""
    out = tmp_path / "c"
    layout, offsets = layout_of(PER_ITEM, S, V)
    write_cache(out, PER_ITEM, shard_items=S, k=K, vocab=V, complete=False, shards_written=1)
    fresh = out / ".shard-00001.safetensors.tmp-nodeA-4242"
    recent = out / ".shard-00002.safetensors.tmp-nodeB-77"
    stale = [out / ".shard-00002.safetensors.tmp-nodeA-17", out / ".manifest.json.tmp-nodeC-9"]
    for f in (fresh, recent, *stale):
        f.write_bytes(b"half a shard")
    now = time.time()
    os.utime(recent, (now - store._STALE_S + 60, now - store._STALE_S + 60))
    for f in stale:
        os.utime(f, (now - store._STALE_S - 60, now - store._STALE_S - 60))
    other = out / "notes.tmp-1"                                        # not a writer's temporary
    other.write_text("x")
    os.utime(other, (0, 0))
    assert tc.prepare(out, synthetic_fp(K, V), layout, offsets) is False
    assert fresh.read_bytes() == recent.read_bytes() == b"half a shard"
    assert not any(f.exists() for f in stale)
    assert other.exists() and (out / "shard-00000.safetensors").exists()


@pytest.mark.parametrize("key, new", [("k", 8), ("data.max_len", 64), ("data.pack", True), ("dtype", "bf16"),
                                      ("teacher.digest", "preset:other"), ("temperature", 2.0),
                                      ("model.dtype", "bf16"), ("vocab", V + 1), ("tokenizer", "u" * 32)])
def test_prepare_refuses_other_fingerprint(tmp_path, key, new):
    out = tmp_path / "c"
    write_cache(out, PER_ITEM, shard_items=S, k=K, vocab=V, complete=False, shards_written=2)
    (out / ".shard-00002.safetensors.tmp-1").write_bytes(b"partial")
    os.utime(out / ".shard-00002.safetensors.tmp-1", (0, 0))          # stale, but not this setup's to remove
    before = snapshot(out)
    layout, offsets = layout_of(PER_ITEM, S, V)
    old = synthetic_fp(K, V)[key]
    fp = synthetic_fp(K, V, over={key: new})
    for call in (lambda: tc.check_out(out, fp, S), lambda: tc.prepare(out, fp, layout, offsets)):
        with pytest.raises(tc.CacheError) as e:
            call()
        assert f"{key}: {old!r} there, {new!r} now" in str(e.value)
        assert "choose a new cache.out" in str(e.value)
        assert snapshot(out) == before


def test_check_out_ignores_the_teacher_path_when_its_digest_matches(tmp_path):
    out = tmp_path / "c"
    write_cache(out, PER_ITEM, shard_items=S, k=K, vocab=V, complete=False, shards_written=1)
    moved = synthetic_fp(K, V, over={"teacher": "/elsewhere/demo-teacher"})
    assert tc.check_out(out, moved, S)["fingerprint"]["teacher"] == "demo-teacher"
    layout, offsets = layout_of(PER_ITEM, S, V)
    assert tc.prepare(out, moved, layout, offsets) is False
    with pytest.raises(tc.CacheError, match=r"another setup \(teacher\.digest: 'preset:demo-teacher' there, "
                                            r"'sha' now\)"):
        tc.check_out(out, {**moved, "teacher.digest": "sha"}, S)


def test_check_out_refuses_a_file(tmp_path):
    out = tmp_path / "cache"
    out.write_text("not a directory")
    layout, offsets = layout_of(PER_ITEM, S, V)
    for call in (lambda: tc.check_out(out, synthetic_fp(K, V), S), lambda: tc.check_out(out, synthetic_fp(K, V), None),
                 lambda: tc.prepare(out, synthetic_fp(K, V), layout, offsets)):
        with pytest.raises(tc.CacheError, match=r"cache\.out=.*cache is a file; the cache is a directory\. "
                                                r"Choose another cache\.out"):
            call()
    assert out.read_text() == "not a directory"


def test_prepare_refuses_other_shard_items_and_layout(tmp_path):
    out = tmp_path / "c"
    write_cache(out, PER_ITEM, shard_items=S, k=K, vocab=V, complete=False, shards_written=1)
    before = snapshot(out)
    layout, offsets = layout_of(PER_ITEM, 4, V)
    with pytest.raises(tc.CacheError, match=r"shard_items: 3 there, 4 now"):
        tc.prepare(out, synthetic_fp(K, V), layout, offsets)
    assert snapshot(out) == before
    per = list(PER_ITEM)
    per[3] += 1                                              # same fingerprint, other tokenization
    layout, offsets = layout_of(per, S, V)
    with pytest.raises(tc.CacheError, match=r"8 items and 24 rows \(items digest synthetic-it\), this data 8 and 25 "
                                            r"\(synthetic-it\).*tokenization changed"):
        tc.prepare(out, synthetic_fp(K, V), layout, offsets)
    layout, offsets = layout_of(PER_ITEM + [1], S, V)
    with pytest.raises(tc.CacheError, match=r"8 items and 24 rows .*this data 9 and 25"):
        tc.prepare(out, synthetic_fp(K, V), layout, offsets)
    layout, offsets = layout_of(PER_ITEM, S, V, items_sha256="ab" * 32)    # the same counts, other ids
    with pytest.raises(tc.CacheError, match=r"8 items and 24 rows \(items digest synthetic-it\), this data 8 and 24 "
                                            r"\(abababababab\).*tokenization changed"):
        tc.prepare(out, synthetic_fp(K, V), layout, offsets)
    assert snapshot(out) == before


def test_prepare_refuses_a_directory_that_is_not_a_cache(tmp_path):
    out = tmp_path / "run"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / "sub" / "x.bin").write_bytes(b"\0\1")
    before = snapshot(out)
    layout, offsets = layout_of(PER_ITEM, S, V)
    with pytest.raises(tc.CacheError, match=r"holds other files than a cache.*nothing there is removed"):
        tc.prepare(out, synthetic_fp(K, V), layout, offsets)
    assert snapshot(out) == before and not (out / tc.MANIFEST).exists()


def test_check_out_without_shard_items_does_not_compare_them(tmp_path):
    out = tmp_path / "c"
    write_cache(out, PER_ITEM, shard_items=S, k=K, vocab=V, complete=False, shards_written=1)
    assert tc.check_out(out, synthetic_fp(K, V), None)["shard_items"] == S
    with pytest.raises(tc.CacheError, match=r"k: 6 there, 7 now"):
        tc.check_out(out, synthetic_fp(K, V, over={"k": 7}), None)


# ---------------------------------------------------------------------------------------------------- check


def _tree(demo, out, **data_over) -> dict:
    return {"model": {"student": "demo-student", "teacher": "demo-teacher", "dtype": "fp32"},
            "data": {"train": str(demo["train"]), "tokenizer": str(demo["tokA"]), "max_len": 48, **data_over},
            "loss": {"method": "grkd", "params": {"k": 4}},
            "cache": {"k": 8, "shard_items": 16, "out": str(out)}}


@pytest.fixture(scope="module")
def real_cache(demo, tmp_path_factory):
    """A cache with the fingerprint mode=cache-teacher would write for the demo data, and a run's config."""
    out = tmp_path_factory.mktemp("real") / "cache"
    w = config_from_dict(_tree(demo, out), ["mode=cache-teacher"])
    tok = demo["tok"]
    vocab = tc.distill_vocab(w, tok)
    assert vocab == tok.vocab_size                            # a preset teacher: the tokenizer's vocabulary
    fp = tc.fingerprint(w, tok, vocab)
    assert fp["k"] == 8 and fp["vocab"] == vocab and fp["data.max_len"] == 48 and fp["data.pack"] is False
    assert fp["teacher.digest"] == "preset:demo-teacher" and fp["data.chat_template"] is False
    assert fp["model.dtype"] == "fp32" and fp["dtype"] == "fp16" and fp["temperature"] == 1.0
    items = tc.items(w, tok)
    write_cache(out, tc.counted(items), shard_items=16, k=fp["k"], vocab=vocab, fp=fp,
                items_sha256=tc.items_digest(items))
    return {"out": out, "vocab": vocab, "tree": _tree(demo, out), "items": len(items)}


def run_cfg(real_cache, *overrides):
    return config_from_dict(real_cache["tree"], [f"model.teacher=cache:{real_cache['out']}", *overrides])


def check(real_cache, demo, *overrides, tok=None, vocab=None):
    cfg = run_cfg(real_cache, *overrides)
    cache = tc.TeacherCache(cfg.teacher_cache)
    cache.check(cfg, tok or demo["tok"], real_cache["vocab"] if vocab is None else vocab)
    return cache


def test_check_matching_run(real_cache, demo):
    cfg = run_cfg(real_cache)
    assert cfg.teacher_cache == real_cache["out"]
    cache = check(real_cache, demo)
    cache.check_items(tc.items(cfg, demo["tok"]))
    check(real_cache, demo, f"data.train={demo['copy']}")      # the same content elsewhere: the same data
    check(real_cache, demo, "loss.method=forward_kl", "loss.params={}")
    check(real_cache, demo, "loss.params.k=8", "loss.metrics_k=8")   # at the cache's k
    check(real_cache, demo, "model.dtype=bf16")               # the student's dtype: not the teacher's business


@pytest.mark.parametrize("override, match", [
    ("data.max_len=64", r"written for data\.max_len=48, this run has data\.max_len=64"),
    ("data.pack=true", r"written for data\.pack=false, this run has data\.pack=true"),
    ("data.train=OTHER", r"written for another data\.train file \(sha256 [0-9a-f]{12}\W.*other\.jsonl is [0-9a-f]{12}\)"),
])
def test_check_names_the_data_field(real_cache, demo, override, match):
    override = override.replace("OTHER", str(demo["other"]))
    with pytest.raises(tc.CacheError, match=match) as e:
        check(real_cache, demo, override)
    assert "mode=cache-teacher cache.out=NEW_DIR" in str(e.value)


def test_check_other_tokenizer(real_cache, demo):
    with pytest.raises(tc.CacheError, match=r"written for another tokenizer \(digest [0-9a-f]{12}; this run's, "
                                            r".*tokB, is [0-9a-f]{12}\)"):
        check(real_cache, demo, f"data.tokenizer={demo['tokB']}", tok=demo["tok_b"], vocab=demo["tok_b"].vocab_size)


def test_check_vocab_student_larger(real_cache, demo):
    """A student with more rows than the cache's vocabulary (padding): the fix is model.vocab_size."""
    v = real_cache["vocab"]
    with pytest.raises(tc.CacheError, match=rf"holds a teacher over {v} vocabulary rows and this run distils over "
                                            rf"{v + 64} \(the student rows\): set model\.vocab_size={v} if the "
                                            r"student's extra rows are padding"):
        check(real_cache, demo, vocab=v + 64)
    check(real_cache, demo, f"model.vocab_size={v}", vocab=v + 64)        # as the message says: fine


def test_check_vocab_run_smaller(real_cache, demo):
    """A run over fewer rows than the cache's: the cache is to be written over them."""
    v = real_cache["vocab"]
    with pytest.raises(tc.CacheError, match=rf"over {v} vocabulary rows and this run distils over {v - 20} "
                                            rf"\(model\.vocab_size\): write the cache with model\.vocab_size={v - 20}\."):
        check(real_cache, demo, f"model.vocab_size={v - 20}", vocab=v + 64)
    with pytest.raises(tc.CacheError, match=rf"distils over {v - 20} \(the student rows\): write the cache with "
                                            rf"model\.vocab_size={v - 20}\."):
        check(real_cache, demo, vocab=v - 20)


def test_check_vocab_run_larger_by_setting(real_cache, demo):
    v = real_cache["vocab"]
    with pytest.raises(tc.CacheError, match=rf"distils over {v + 8} \(model\.vocab_size\): train with "
                                            rf"model\.vocab_size={v}\."):
        check(real_cache, demo, f"model.vocab_size={v + 8}", vocab=v + 64)


@pytest.mark.parametrize("overrides, match", [
    (["loss.temperature=2.0"], r"loss\.temperature=2 but the cached teacher was written at temperature 1"),
    (["loss.method=rlkd", "loss.params={}"], r"ranks the union of the teacher's and the student's own top tokens.*"
                                             r"live teacher for this method \(rlkd\)"),
    (["loss.params.k=9"], r"k=9 is more than the cache's k=8"),
    (["loss.params={}"], r"k=32 is more than the cache's k=8"),    # GRKD's default group
    (["loss.metrics_k=9"], r"loss\.metrics_k=9 is more than the cache's k=8"),
    (["loss.params.standardize=true"], r"standardize=true"),
    (["loss.params.k_student=2"], r"k_student=2"),
])
def test_check_loss(real_cache, demo, overrides, match):
    with pytest.raises(tc.CacheError, match=r"model\.teacher=cache:.* \(k=8\): .*" + match):
        check(real_cache, demo, *overrides)


# ---------------------------------------------------------------------------------------------------- fingerprint


def test_fingerprint_and_run_fields(demo, tmp_path):
    w = config_from_dict(_tree(demo, tmp_path / "c"), ["mode=cache-teacher", "cache.k=100000"])
    tok = demo["tok"]
    fp = tc.fingerprint(w, tok, tok.vocab_size)
    assert fp["k"] == tok.vocab_size                         # at most the vocabulary
    fields = run_fields(w, tok)
    assert set(fields) == {"tokenizer", "data.train", "data.max_len", "data.pack", "data.chat_template"}
    assert {key: fp[key] for key in fields} == fields
    assert set(fp) == set(fields) | {"teacher", "teacher.digest", "model.dtype", "vocab", "k", "temperature", "dtype"}
    assert fields["tokenizer"] == tc.tokenizer_digest(tok, False) != tc.tokenizer_digest(demo["tok_b"], False)
    assert re.fullmatch(r"[0-9a-f]{32}", fields["tokenizer"])
    assert fields["data.train"] == tc.data_digest(str(demo["copy"])) != tc.data_digest(str(demo["other"]))
    # a training run from the cache gives the same fields; model.dtype is in the fingerprint, not a run field
    run = config_from_dict(_tree(demo, tmp_path / "c"), [f"model.teacher=cache:{tmp_path / 'c'}", "model.dtype=bf16"])
    assert run_fields(run, tok) == fields
    assert tc.fingerprint(config_from_dict(_tree(demo, tmp_path / "c"), ["mode=cache-teacher", "model.dtype=bf16"]),
                          tok, tok.vocab_size)["model.dtype"] == "bf16"


def test_data_digest_file_and_directory(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.jsonl").write_text("one\n")
    (tmp_path / "d" / "sub" / "b.arrow").write_bytes(b"\0two")
    assert tc.data_digest(str(tmp_path / "d" / "a.jsonl")) == hashlib.sha256(b"one\n").hexdigest()
    d = tc.data_digest(str(tmp_path / "d"))
    shutil.copytree(tmp_path / "d", tmp_path / "e")
    assert tc.data_digest(str(tmp_path / "e")) == d          # names and contents, not the place
    (tmp_path / "e" / "sub" / "b.arrow").rename(tmp_path / "e" / "sub" / "c.arrow")
    assert tc.data_digest(str(tmp_path / "e")) != d


class _FakeTokenizer:
    def __init__(self, template, pad_id=0, vocab="v1"):
        self.tok = SimpleNamespace(chat_template=template)
        self.pad_id, self.eos_id, self.bos_id, self._vocab = pad_id, 1, 2, vocab

    def vocab_hash(self) -> str:
        return self._vocab


def test_tokenizer_digest_counts_the_template_only_when_used():
    a, b, none = _FakeTokenizer("{{ A }}"), _FakeTokenizer("{{ B }}"), _FakeTokenizer(None)
    plain = tc.tokenizer_digest(a, False)
    assert plain == tc.tokenizer_digest(b, False) == tc.tokenizer_digest(none, False) == tc.tokenizer_digest(none, True)
    assert len({plain, tc.tokenizer_digest(a, True), tc.tokenizer_digest(b, True)}) == 3
    assert tc.tokenizer_digest(_FakeTokenizer("{{ A }}", pad_id=5), False) != plain      # the special ids
    assert tc.tokenizer_digest(_FakeTokenizer("{{ A }}", vocab="v2"), False) != plain    # the vocabulary


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    """Two tiny Llama checkpoints of the same shapes, from different seeds (weight files over 64 KiB: the
    digest reads sampled blocks of them)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    root = tmp_path_factory.mktemp("llamas")
    config = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    with torch.random.fork_rng():
        for seed in (0, 1):
            torch.manual_seed(seed)
            LlamaForCausalLM(config).save_pretrained(root / f"seed{seed}")
    return root


def _header(path: Path) -> bytes:
    raw = path.read_bytes()
    return raw[:8 + int.from_bytes(raw[:8], "little")]


def test_model_digest_reads_the_weights(llamas, tmp_path):
    a, b = llamas / "seed0", llamas / "seed1"
    wa, wb = a / "model.safetensors", b / "model.safetensors"
    assert wa.stat().st_size == wb.stat().st_size > 2 * (1 << 16)
    assert _header(wa) == _header(wb) and (a / "config.json").read_bytes() == (b / "config.json").read_bytes()
    da = tc.model_digest(str(a))
    assert re.fullmatch(r"[0-9a-f]{64}", da)
    assert tc.model_digest(str(a)) == da                     # the same dir twice
    assert tc.model_digest(str(b)) != da                     # same shapes and config, other weights
    c = tmp_path / "copy"
    shutil.copytree(a, c)
    assert tc.model_digest(str(c)) == da                     # the contents, not the place
    (c / "README.md").write_text("not a weight file")
    assert tc.model_digest(str(c)) == da
    for at in (len(_header(wa)), wa.stat().st_size - 1):     # the first and the last byte of tensor data
        raw = bytearray(wa.read_bytes())
        raw[at] ^= 0xFF
        (c / "model.safetensors").write_bytes(bytes(raw))
        assert tc.model_digest(str(c)) != da
    shutil.copy(wa, c / "model.safetensors")
    cfg = json.loads((c / "config.json").read_text())
    (c / "config.json").write_text(json.dumps({**cfg, "rope_theta": 1234.0}))
    assert tc.model_digest(str(c)) != da                     # the config counts too
    assert tc.model_digest(str(wa)) == hashlib.sha256(wa.read_bytes()).hexdigest()   # a file: its sha256
    assert tc.model_digest("demo-teacher") == "preset:demo-teacher"


# ---------------------------------------------------------------------------------------------------- plan


@pytest.mark.parametrize("pack", [False, True])
def test_plan_text(demo, tmp_path, pack):
    assert tc.plan_text is importlib.import_module("train.cache.writer").plan_text
    tok, vocab = demo["tok"], demo["tok"].vocab_size
    out = tmp_path / "c"
    cfg = config_from_dict(_tree(demo, out), ["mode=cache-teacher", f"data.pack={str(pack).lower()}",
                                              "cache.shard_items=7"])
    items = tc.items(cfg, tok)
    assert isinstance(items, data.PackedDataset) == pack
    n_rows = int(tc.counted(items).sum())
    unpacked = data.TokenizedDataset(demo["train"], tok, 48)
    assert n_rows == unpacked.stats.n_label_tokens          # every example's first token is a prompt token
    per = tc.row_bytes(8, vocab, "fp16")
    bits = tc.id_bits(vocab)
    assert per == math.ceil(8 * bits / 8) + 8 * 2 + 4        # 8 packed ids, fp16 values, fp32 tail
    text = tc.plan_text(cfg, tok, vocab)
    unit = "packed rows" if pack else "examples"
    assert f"{len(items)} {unit}, {n_rows} counted tokens" in text
    assert f"k=8, ids {bits} bits, values fp16, log tail fp32: {per} bytes per token" in text
    shards = math.ceil(len(items) / 7)
    assert re.search(rf"([0-9.]+) GB in {shards} shards of 7 items -> {re.escape(str(out))}$", text)
    gb = float(re.search(r"([0-9.]+) GB", text).group(1))
    assert gb == pytest.approx(n_rows * per / 1e9, abs=5e-4)
    # the bytes the plan counts are the bytes the shards hold (tensor data)
    write_cache(out, tc.counted(items), shard_items=7, k=8, vocab=vocab, complete=False, shards_written=2)
    from safetensors import safe_open
    held = 0
    for f in out.glob("shard-*.safetensors"):
        with safe_open(f, framework="pt") as fh:
            held += sum(fh.get_tensor(n).numel() * fh.get_tensor(n).element_size() for n in fh.keys())
    written_rows = int(layout_of(tc.counted(items), 7, vocab)[1][min(14, len(items))])
    assert held == written_rows * per
    assert tc.plan_text(cfg, tok, vocab).endswith("(2 already written)")


# ---------------------------------------------------------------------------------------------------- config


BASE = ["model.student=demo-student", "model.teacher=demo-teacher", "data.train=data/train.jsonl"]


def test_config_cache_paths():
    c = load_config(None, BASE + ["model.teacher=cache:/x/y"])
    assert c.teacher_cache == Path("/x/y")
    assert load_config(None, BASE).teacher_cache is None
    c = load_config(None, BASE + ["mode=cache-teacher", "run_name=r", "output_dir=o"])
    assert c.cache_out == Path("o") / "r-teacher-cache"       # beside the run, not in it
    assert load_config(None, BASE + ["mode=cache-teacher", "cache.out=/c"]).cache_out == Path("/c")


@pytest.mark.parametrize("overrides, match", [
    (["mode=cache-teacher", "model.teacher=cache:X"], r"mode=cache-teacher .*is not a model"),
    (["model.teacher=cache:X", "onpolicy.mode=gkd"], r"cached teacher.*onpolicy\.mode=gkd"),
    (["model.teacher=cache:X", "onpolicy.mode=always"], r"cached teacher.*onpolicy\.mode=always"),
    (["model.teacher=cache:X", "model.classmate=demo-student"], r"model\.classmate"),
    (["model.teacher=cache:X", "model.classmate=demo-student", "onpolicy.mode=gkd"], r"model\.classmate|onpolicy"),
    (["cache.dtype=int8"], r"cache\.dtype expects one of 'fp16', 'bf16', 'fp32'"),
    (["cache.k=0"], r"cache\.k expects an integer > 0"),
])
def test_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, BASE + overrides)


@pytest.mark.parametrize("value, want", [("float16", "fp16"), ("half", "fp16"), ("bfloat16", "bf16"),
                                         ("FP32", "fp32"), ("float32", "fp32")])
def test_config_cache_dtype_aliases(value, want):
    assert load_config(None, BASE + [f"cache.dtype={value}"]).cache.dtype == want


def test_config_cache_defaults():
    c = load_config(None, BASE)
    assert (c.mode, c.cache.out, c.cache.k, c.cache.dtype, c.cache.shard_items) == ("train", None, 64, "fp16", None)
    load_config(None, BASE + ["mode=cache-teacher"])          # a real teacher: fine


def test_shard_items_explicit():
    per = np.full(10, 4, dtype=np.int64)
    assert tc.shard_items(load_config(None, BASE + ["cache.shard_items=3"]), per) == 3


@pytest.mark.parametrize("n, each, rows", [
    (10, 4, store.MIN_SHARD_ROWS),                 # little data: a floor of rows per shard (one shard here)
    (1000, 10 ** 5, 10 ** 8 // store.MIN_SHARDS),  # mid-sized: MIN_SHARDS shards or more to deal to the replicas
    (10_000, 2 ** 20, tc.SHARD_ROWS),              # much data: about SHARD_ROWS rows per shard
    (3, tc.SHARD_ROWS * 5, 15 * tc.SHARD_ROWS // store.MIN_SHARDS),   # items larger than a shard: never 0
])
def test_shard_items_from_the_data(n, each, rows):
    auto = load_config(None, BASE)
    per = np.full(n, each, dtype=np.int64)
    got = tc.shard_items(auto, per)
    total = n * each
    assert rows == min(tc.SHARD_ROWS, max(store.MIN_SHARD_ROWS, total // store.MIN_SHARDS))
    assert got == max(1, rows * n // total)
    assert got >= 1 and got * each <= max(rows, each)
    if store.MIN_SHARD_ROWS < total // store.MIN_SHARDS <= tc.SHARD_ROWS and each <= rows:
        assert math.ceil(n / got) >= store.MIN_SHARDS
    # a function of the data alone: the same per-item counts in another order, the same shards
    assert tc.shard_items(auto, per[::-1].copy()) == got


@pytest.mark.parametrize("cap", [None, 3.0])
def test_top_rows_against_the_materialised_logits(cap):
    """The writer's rows: Gemma-2's softcap applied, the vocabulary cut, the top-k in decreasing order less
    the row's top logit, and the tail's log mass at the temperature, chunk by chunk as one."""
    from kd.head import softcap
    g = torch.Generator().manual_seed(11)
    h, w = torch.randn(37, 8, generator=g), torch.randn(30, 8, generator=g) * 2
    vocab, k, T = 27, 5, 2.0
    ids, vals, tail = tc.top_rows(h, w, cap, vocab, k, T, chunk=8)
    a = softcap((h @ w.T).double(), cap)[:, :vocab]
    a = a - a.max(-1, keepdim=True).values
    want_vals, want_ids = a.topk(k, dim=-1)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(vals.double(), want_vals, rtol=0, atol=1e-5)
    outside = torch.ones_like(a, dtype=torch.bool).scatter(-1, want_ids, False)
    torch.testing.assert_close(tail.double(), torch.logsumexp((a / T).masked_fill(~outside, float("-inf")), -1),
                               rtol=0, atol=1e-5)
    assert (vals[:, 0] == 0).all() and (vals[:, :-1] >= vals[:, 1:]).all()
    full = tc.top_rows(h, w, cap, vocab, vocab, T, chunk=8)[2]
    assert torch.isinf(full).all()                                        # k = V: an empty tail
