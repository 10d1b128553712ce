"""What a cache is valid for: the teacher, the tokenizer, the data file and how it is cut into items."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from .. import data
from ..config import Config


class CacheError(ValueError):
    """A cache that cannot serve this run (or this build); the message names the field and what to do."""


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def data_digest(path: str) -> str:
    """sha256 of a data file, or of every file of a data directory (names and contents)."""
    p = Path(path)
    if p.is_file():
        return _sha256_file(p)
    h = hashlib.sha256()
    for f in sorted(x for x in p.rglob("*") if x.is_file()):
        h.update(str(f.relative_to(p)).encode() + b"\0" + _sha256_file(f).encode())
    return h.hexdigest()


def _sampled(path: Path, h, blocks: int = 16, size: int = 1 << 16) -> None:
    """Feed ``h`` a weight file's size, its safetensors header (names, dtypes, shapes) and ``blocks``
    evenly spaced blocks of its contents: another checkpoint of the same architecture differs in every
    block, and a 140 GB teacher is fingerprinted in a few hundred reads rather than a full pass."""
    total = path.stat().st_size
    h.update(f"{path.name}:{total}".encode())
    with open(path, "rb") as f:
        start = 0
        if path.suffix == ".safetensors":
            n = int.from_bytes(f.read(8), "little")
            h.update(f.read(n))
            start = 8 + n
        for i in range(blocks):
            f.seek(start + (total - start - size) * i // max(1, blocks - 1) if total - start > size else start)
            h.update(f.read(size))


def model_digest(spec: str) -> str:
    """A preset's name, or the sha256 of a model's config.json and sampled weight files (``_sampled``)."""
    p = Path(spec)
    if not p.exists():
        return f"preset:{spec}"
    if p.is_file():
        return _sha256_file(p)
    h = hashlib.sha256()
    for f in sorted(p.iterdir()):
        if f.name == "config.json":
            h.update(f.read_bytes())
        elif f.suffix in (".safetensors", ".bin", ".pt"):
            _sampled(f, h)
    return h.hexdigest()


def tokenizer_digest(tokenizer, templated: bool) -> str:
    """The vocabulary, the special ids and, when records go through it, the chat template. (The ids
    the data becomes are compared exactly by ``items_digest``; this names the tokenizer as the cause.)"""
    template = (getattr(getattr(tokenizer, "tok", None), "chat_template", None) or "") if templated else ""
    special = (tokenizer.pad_id, tokenizer.eos_id, getattr(tokenizer, "bos_id", None))
    return hashlib.sha256(f"{tokenizer.vocab_hash()}|{special}|{template}".encode()).hexdigest()[:32]


def run_fields(cfg: Config, tokenizer) -> dict:
    """The fields a training run must share with its cache."""
    templated = data.uses_chat_template(tokenizer, cfg.data.chat_template)
    return {"tokenizer": tokenizer_digest(tokenizer, templated), "data.train": data_digest(cfg.data.train),
            "data.max_len": cfg.data.max_len, "data.pack": cfg.data.pack, "data.chat_template": templated}


def fingerprint(cfg: Config, tokenizer, vocab: int) -> dict:
    """What the cache written by ``cfg`` is valid for (``vocab``: the distillation vocabulary)."""
    return {"teacher": cfg.model.teacher, "teacher.digest": model_digest(cfg.model.teacher),
            "model.dtype": cfg.model.dtype, **run_fields(cfg, tokenizer), "vocab": vocab,
            "k": min(cfg.cache.k, vocab), "temperature": cfg.loss.temperature, "dtype": cfg.cache.dtype}


def distill_vocab(cfg: Config, tokenizer) -> int:
    """The vocabulary the cache covers: ``model.vocab_size``, else the teacher's logit rows."""
    from ..preflight import vocab_rows
    return cfg.model.vocab_size or vocab_rows("model.teacher", cfg.model.teacher, tokenizer.vocab_size)


def items(cfg: Config, tokenizer):
    """The loader's items, in order: the dataset the cache rows belong to."""
    ds = data.TokenizedDataset(cfg.data.train, tokenizer, cfg.data.max_len, chat_template=cfg.data.chat_template)
    return data.PackedDataset(ds, ds.max_len) if cfg.data.pack else ds


def counted(dataset) -> np.ndarray:
    """Rows per item: positions whose shifted target is trained on."""
    return np.array([int((np.asarray(dataset[i]["labels"][1:]) != data.IGNORE_INDEX).sum())
                     for i in range(len(dataset))], dtype=np.int64)


def items_digest(dataset) -> str:
    """sha256 of every item's token ids and labels: the same data, tokenizer and cut give the same items."""
    h = hashlib.sha256()
    for i in range(len(dataset)):
        item = dataset[i]
        h.update(np.asarray(item["input_ids"], dtype=np.int64).tobytes())
        h.update(np.asarray(item["labels"], dtype=np.int64).tobytes())
    return h.hexdigest()
