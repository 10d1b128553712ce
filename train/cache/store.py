"""The cache's files: the bit-packed ids, the manifest and offsets, shards written atomically, and
``TeacherCache``, which checks a cache against a run and reads its rows back."""
from __future__ import annotations

import json
import os
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from kd import topk
from .. import data
from ..config import CACHE_PREFIX, Config, torch_dtype
from .fingerprint import CacheError, counted, items_digest, run_fields

MANIFEST, OFFSETS = "manifest.json", "offsets.safetensors"
FORMAT = 2                       # 2: bit-packed ids, the tail's log mass, the items' digest
SHARD_ROWS, MIN_SHARD_ROWS, MIN_SHARDS = 2 ** 22, 2 ** 14, 256
_STALE_S = 600                   # a temporary file untouched this long belongs to a dead writer
_OPEN_SHARDS = 64                # shard files a reader keeps mapped (the OS caps a process's mappings)


# --------------------------------------------------------------------------------------------
# Ids, bit-packed


def id_bits(vocab: int) -> int:
    """Bits per stored id: the fewest that hold ``vocab - 1`` (17 for Llama-3's 128256, 18 for Gemma-2)."""
    return max(1, (vocab - 1).bit_length())


def _id_layout(k: int, bits: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Id j of a row starts at bit ``j * bits``: its first byte, its shift in that byte, and the row's bytes."""
    start = torch.arange(k, dtype=torch.long) * bits
    return start // 8, start % 8, (k * bits + 7) // 8


def pack_ids(ids: torch.Tensor, bits: int) -> torch.Tensor:
    """``[n, k]`` ids below ``2 ** bits`` -> ``[n, ceil(k * bits / 8)]`` uint8, ``bits`` bits each, little-endian
    (on ``ids``' device)."""
    if bits > 25:
        raise ValueError(f"ids of {bits} bits: at most 25 (a vocabulary of 33 million) are supported")
    n, k = ids.shape
    byte, shift, width = (x.to(ids.device) if torch.is_tensor(x) else x for x in _id_layout(k, bits))
    spread = ids.long() << shift                                        # at most 32 bits: 4 bytes
    out = torch.zeros((n, width + 3), dtype=torch.long, device=ids.device)
    for m in range(4):                                                  # bit ranges do not overlap: add == or
        out.scatter_add_(1, (byte + m).expand(n, k), (spread >> (8 * m)) & 0xFF)
    return out[:, :width].to(torch.uint8)


def unpack_ids(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """The inverse of ``pack_ids``: ``[n, k]`` int64, on ``packed``'s device."""
    byte, shift, _ = _id_layout(k, bits)
    padded = torch.nn.functional.pad(packed.long(), (0, 3))
    b = padded[:, (byte.unsqueeze(-1) + torch.arange(4)).to(packed.device)]     # [n, k, 4]: the bytes of id j
    word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)
    return (word >> shift.to(packed.device)) & ((1 << bits) - 1)


def row_bytes(k: int, vocab: int, dtype: str) -> int:
    """Bytes on disk per counted token (tensor data; headers are a few hundred bytes per shard)."""
    return _id_layout(k, id_bits(vocab))[2] + k * torch_dtype(dtype).itemsize + 4


def stored(ids: torch.Tensor, values: torch.Tensor, log_tail: torch.Tensor, vocab: int, dtype: str) -> tuple:
    """Rows as the shard holds them (packed ids, ``dtype`` values, fp32 tail), on their device."""
    return pack_ids(ids, id_bits(vocab)), values.to(torch_dtype(dtype)), log_tail.float()


# --------------------------------------------------------------------------------------------
# Files


def shard_items(cfg: Config, per_item: np.ndarray) -> int:
    """Items per shard: ``cache.shard_items``, else enough for about ``SHARD_ROWS`` counted tokens, fewer
    for small data so that there are ``MIN_SHARDS`` to deal to the replicas (a function of the data
    alone, never of the ranks: the shards stay the same files)."""
    if cfg.cache.shard_items:
        return cfg.cache.shard_items
    total = max(1, int(per_item.sum()))
    rows = min(SHARD_ROWS, max(MIN_SHARD_ROWS, total // MIN_SHARDS))
    return max(1, int(rows * len(per_item) // total))


def _shard_name(s: int) -> str:
    return f"shard-{s:05d}.safetensors"


def _read_manifest(path: Path) -> dict | None:
    f = path / MANIFEST
    if not f.is_file():
        return None
    try:
        m, why = json.loads(f.read_text()), None
    except (OSError, ValueError) as e:
        m, why = None, str(e)
    keys = ("format", "fingerprint", "items", "rows", "shard_items", "shards", "id_bits", "items_sha256", "complete")
    fields = ("vocab", "k", "temperature", "dtype", "tokenizer", "data.train", "data.max_len", "data.pack")
    if why is None and isinstance(m, dict) and "format" in m and m["format"] != FORMAT:
        why = f"format {m['format']}, this kd-train reads format {FORMAT}"
    elif why is None and not (isinstance(m, dict) and all(k in m for k in keys)
                              and isinstance(m["fingerprint"], dict) and all(k in m["fingerprint"] for k in fields)):
        why = "not the manifest of a cache"
    if why:
        raise CacheError(f"{f}: {why}; it was not written by this kd-train's mode=cache-teacher, or was damaged. "
                         "Write the cache again into a new or empty cache.out (nothing there is removed).")
    return m


def _write_atomic(path: Path, write) -> None:
    """``write(tmp)``, flushed to disk, then renamed to ``path``: a reader sees the whole file or none."""
    tmp = path.with_name(f".{path.name}.tmp-{os.uname().nodename}-{os.getpid()}")
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)               # safetensors creates 0600: readable like the job's other files
    os.replace(tmp, path)


def write_shard(path: Path, blocks: list, want: int) -> None:
    """Shard file ``path`` from ``blocks`` of ``stored`` rows, in row order, ``want`` rows in all."""
    from safetensors.torch import save_file
    ids, values, tail = (torch.cat(x).cpu().contiguous() for x in zip(*blocks))
    if ids.shape[0] != want:
        raise RuntimeError(f"{path.name}: {ids.shape[0]} rows computed, {want} expected")
    _write_atomic(path, lambda p: save_file({"ids": ids, "values": values, "log_tail": tail}, str(p)))


def check_out(out: Path, fp: dict, items_per_shard: int | None) -> dict | None:
    """The manifest of the cache already in ``out`` (None: nothing there yet); a ``CacheError`` when
    ``out`` holds anything this setup cannot continue (``items_per_shard`` None: not compared). Writes
    nothing (every rank runs it before the teacher is loaded)."""
    if out.exists() and not out.is_dir():
        raise CacheError(f"cache.out={out} is a file; the cache is a directory. Choose another cache.out.")
    m = _read_manifest(out)
    if m is None and out.is_dir() and any(out.iterdir()):
        raise CacheError(f"cache.out={out} exists and holds other files than a cache; write the cache into a new or "
                         "empty directory (nothing there is removed).")
    if m is None:
        return None
    old, new = {**m["fingerprint"], "shard_items": m["shard_items"]}, {**fp, "shard_items": items_per_shard}
    if items_per_shard is None:
        del new["shard_items"]
    diff = [k for k in new if old.get(k) != new[k] and k != "teacher"]   # its digest says if it is the same
    if diff:
        shown = "; ".join(f"{k}: {old.get(k)!r} there, {new[k]!r} now" for k in diff)
        raise CacheError(f"cache.out={out} holds a cache of another setup ({shown}). Its shards cannot be continued "
                         "with this one: choose a new cache.out, or remove that directory yourself if it is no longer "
                         "needed.")
    return m


def prepare(out: Path, fp: dict, layout: dict, offsets: np.ndarray) -> bool:
    """Create or continue a cache directory (one process); True when it is already complete. Leaves every
    file of another setup untouched: a different fingerprint is an error."""
    from safetensors.torch import save_file
    m = check_out(out, fp, layout["shard_items"])
    if m is not None:
        if any(m.get(k) != layout[k] for k in ("items", "rows", "items_sha256")):
            raise CacheError(f"cache.out={out}: its manifest counts {m.get('items')} items and {m.get('rows')} rows "
                             f"(items digest {str(m.get('items_sha256'))[:12]}), this data {layout['items']} and "
                             f"{layout['rows']} ({layout['items_sha256'][:12]}), for the same fingerprint: the "
                             "tokenization changed (another transformers or tokenizers version?). Write a new cache.")
        for tmp in out.glob(".*.tmp-*"):        # part-written files of a killed job (not of a live one)
            if time.time() - tmp.stat().st_mtime > _STALE_S:
                tmp.unlink(missing_ok=True)
        return bool(m["complete"])
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / OFFSETS, lambda p: save_file({"offsets": torch.from_numpy(offsets)}, str(p)))
    _write_atomic(out / MANIFEST, lambda p: p.write_text(json.dumps(
        {"format": FORMAT, "fingerprint": fp, **layout, "complete": False}, indent=1)))
    return False


def finish(out: Path) -> dict:
    """Mark the cache complete once every shard is there (one process); its manifest."""
    m = _read_manifest(out)
    missing = [s for s in range(m["shards"]) if not (out / _shard_name(s)).exists()]
    if missing:
        raise CacheError(f"{out}: shards {missing[:5]} are missing after every rank finished: is cache.out on a "
                         "filesystem that every node shares? Run the same command again to write them.")
    size = sum((out / _shard_name(s)).stat().st_size for s in range(m["shards"]))
    m.update(complete=True, bytes=size, bytes_per_token=size / max(m["rows"], 1))
    _write_atomic(out / MANIFEST, lambda p: p.write_text(json.dumps(m, indent=1)))
    return m


# --------------------------------------------------------------------------------------------
# Reading


def _yaml(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


class TeacherCache:
    """A complete cache on disk: ``check`` it against a run, then ``mark`` batches and read their ``rows``."""

    def __init__(self, path: str | Path):
        from safetensors.torch import load_file
        self.path = Path(path)
        where = f"model.teacher={CACHE_PREFIX}{self.path}"
        m = _read_manifest(self.path)
        if m is None:
            raise CacheError(f"{where}: {self.path / MANIFEST} does not exist; write the cache first with "
                             f"kd-train RECIPE mode=cache-teacher cache.out={self.path}")
        have = [s for s in range(m["shards"]) if (self.path / _shard_name(s)).is_file()]
        if not m["complete"] or len(have) < m["shards"]:
            state = "incomplete" if not m["complete"] else "damaged: shard files are missing"
            raise CacheError(f"{where}: the cache is {state} ({len(have)} of {m['shards']} shards there). Run the "
                             "mode=cache-teacher command that wrote it again: it writes the missing shards only.")
        fp = m["fingerprint"]
        self.manifest, self.fingerprint = m, fp
        self.k, self.vocab, self.temperature, self.bits = fp["k"], fp["vocab"], fp["temperature"], m["id_bits"]
        self.offsets = load_file(self.path / OFFSETS)["offsets"]
        S, n = m["shard_items"], len(self.offsets) - 1
        self.bounds = [int(self.offsets[min(s * S, n)]) for s in range(m["shards"] + 1)]   # shard s: [b_s, b_s+1)
        self._open: OrderedDict[int, object] = OrderedDict()

    def check(self, cfg: Config, tokenizer, student_rows: int) -> None:
        """Raise ``CacheError`` naming the first setting where this run differs from what the cache holds
        (before any rank starts: the items themselves are compared by ``check_items``)."""
        where = f"model.teacher={cfg.model.teacher}"
        now = run_fields(cfg, tokenizer)
        for key, value in now.items():
            was = self.fingerprint.get(key)
            if was == value:
                continue
            if key == "tokenizer":
                detail = (f"another tokenizer (digest {str(was)[:12]}; this run's, "
                          f"{cfg.data.tokenizer or cfg.model.student}, is {value[:12]})")
            elif key == "data.train":
                detail = f"another data.train file (sha256 {str(was)[:12]}; {cfg.data.train} is {value[:12]})"
            elif key == "data.chat_template":
                detail = (f"records {'' if was else 'not '}rendered by the chat template, and this run's "
                          f"data.chat_template={cfg.data.chat_template} {'does' if value else 'does not'} render them")
            else:
                detail = f"{key}={_yaml(was)}, this run has {key}={_yaml(value)}"
            raise CacheError(f"{where} was written for {detail}: its rows stand for other tokens than this run's. "
                             f"Train with the settings and files the cache was written for (its {self.path / MANIFEST} "
                             "lists them), or write a cache for this run: kd-train RECIPE mode=cache-teacher "
                             "cache.out=NEW_DIR.")
        vocab = cfg.model.vocab_size or student_rows
        if vocab != self.vocab:
            how = (f"set model.vocab_size={self.vocab} if the student's extra rows are padding of the same tokenizer"
                   if cfg.model.vocab_size is None and student_rows > self.vocab else
                   f"write the cache with model.vocab_size={vocab}" if vocab < self.vocab else
                   f"train with model.vocab_size={self.vocab}")
            raise CacheError(f"{where} holds a teacher over {self.vocab} vocabulary rows and this run distils over "
                             f"{vocab} ({'model.vocab_size' if cfg.model.vocab_size else 'the student rows'}): {how}.")
        from kd import build_objective
        try:
            topk.check_objective(build_objective(cfg.loss.method, 0.0, **cfg.loss.objective_kwargs()), self.k,
                                 self.temperature, cfg.loss.metrics_k)
        except ValueError as e:
            raise CacheError(f"{where} (k={self.k}): {e}") from None

    def check_items(self, dataset) -> None:
        """The run's items are the cache's: as many, each with as many counted tokens, the same ids."""
        per_item = counted(dataset)
        cached = np.diff(self.offsets.numpy())
        why = None
        if len(per_item) != len(cached):
            why = f"this run's data makes {len(per_item)} items, the cache holds {len(cached)}"
        elif (per_item != cached).any():
            i = int(np.nonzero(per_item != cached)[0][0])
            why = f"item {i} has {per_item[i]} counted tokens in this run, {cached[i]} in the cache"
        elif items_digest(dataset) != self.manifest["items_sha256"]:
            why = "the items' token ids differ from the cache's"
        if why:
            raise CacheError(f"{self.path}: {why}, although files and settings match: the data is tokenized "
                             "differently here (another transformers / tokenizers / sentencepiece version, or a "
                             "tokenizer file with the same vocabulary but other merges). Write a cache with this "
                             "environment.")

    def mark(self, batch: dict) -> dict:
        """The loader's batch with ``cache_rows [B, L]``: each counted position's row number (-1 elsewhere),
        aligned with the shifted targets so that sequence parallelism slices it with them."""
        batch = dict(batch)
        index = batch.pop("index")
        mask = data.shift_labels(batch["labels"]) != data.IGNORE_INDEX
        batch["cache_rows"] = torch.where(mask, self.offsets[index].unsqueeze(-1) + mask.cumsum(-1) - 1, -1)
        return batch

    def rows(self, numbers: torch.Tensor, device=None) -> topk.TopK:
        """The cached rows ``numbers`` (a CPU tensor, any order; each run of consecutive rows is one read
        per shard), moved to ``device`` as stored and widened there."""
        n = numbers.numel()
        if n and not (0 <= int(numbers.min()) and int(numbers.max()) < self.bounds[-1]):
            raise CacheError(f"{self.path}: rows {int(numbers.min())}..{int(numbers.max())} asked, the cache holds "
                             f"0..{self.bounds[-1] - 1}")
        packed = torch.empty((n, _id_layout(self.k, self.bits)[2]), dtype=torch.uint8)
        values = torch.empty((n, self.k), dtype=torch_dtype(self.fingerprint["dtype"]))
        log_tail = torch.empty(n, dtype=torch.float32)
        breaks = (torch.nonzero(numbers[1:] != numbers[:-1] + 1).squeeze(-1) + 1).tolist() if n else []
        for a, b in zip([0] + breaks, breaks + [n]) if n else ():
            first = int(numbers[a])
            while a < b:                        # a run may cross into the next shard
                s = int(np.searchsorted(self.bounds, first, side="right")) - 1
                take, lo, f = min(b - a, self.bounds[s + 1] - first), first - self.bounds[s], self._shard(s)
                packed[a:a + take] = f.get_slice("ids")[lo:lo + take]
                values[a:a + take] = f.get_slice("values")[lo:lo + take]
                log_tail[a:a + take] = f.get_slice("log_tail")[lo:lo + take]
                a, first = a + take, first + take
        return topk.TopK(unpack_ids(packed.to(device), self.bits, self.k), values.to(device).float(),
                         log_tail.to(device), self.temperature)

    def _shard(self, s: int):
        from safetensors import safe_open
        if s in self._open:
            self._open.move_to_end(s)
        else:
            if len(self._open) >= _OPEN_SHARDS:
                self._open.popitem(last=False)[1].__exit__(None, None, None)
            self._open[s] = safe_open(self.path / _shard_name(s), framework="pt").__enter__()
        return self._open[s]
