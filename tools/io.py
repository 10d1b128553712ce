"""Shared I/O: atomic output directories, a sharded safetensors writer, a lazy HF reader and the
validation every conversion runs its tensors through before they reach disk."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tools.errors import ConvertError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
# Files that travel with a model but are not weights; copied verbatim by zero-to-hf / vocab-check.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise ConvertError(f"unknown dtype '{name}': choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def parse_size(text: str | int) -> int:
    """'5GB' -> 5e9 bytes (decimal units like the HF hub; KiB/MiB/GiB are binary)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise ConvertError(f"cannot parse size '{text}': use e.g. 5GB, 500MB, 2GiB or a byte count")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}.get(unit)
    if scale is None:
        raise ConvertError(f"cannot parse size '{text}': use e.g. 5GB, 500MB, 2GiB or a byte count")
    return int(float(m.group(1)) * scale)


def has_module(name: str) -> bool:
    """Whether an optional dependency is importable (without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def torch_load(path: Path, weights_only: bool = True):
    """torch.load on CPU, memory-mapped so that only the tensors actually read are paged in."""
    if not Path(path).is_file():
        raise ConvertError(f"missing file {path}")
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=weights_only)
    except Exception:
        pass
    try:  # legacy (non-zip) torch.save files cannot be memory-mapped: read them whole
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:
        raise ConvertError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


@contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp directory next to `out`; rename it to `out` only if the block succeeds.

    A failed conversion therefore leaves `out` exactly as it was (absent, or the old contents).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConvertError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConvertError(f"output directory {out} already exists and is not empty; "
                           "pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


class ShardedSafetensorsWriter:
    """Buffers tensors until the next one would overflow `max_shard_bytes`, then writes a shard.

    Shards get their final `model-0000i-of-0000N` names in `close()`, once N is known; a single
    shard is written as `model.safetensors` without an index, like `save_pretrained` does.
    """

    def __init__(self, out_dir: Path, max_shard_bytes: int):
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0
        self.peak_buffered_bytes = 0  # what the writer held at most; tests check the streaming
        self.names: list[str] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.names or name in self._pending:
            raise ConvertError(f"tensor '{name}' produced twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        # A view of another tensor's storage (tied weights, a slice of a fused qkv) would make
        # safetensors refuse the shard or store the whole storage: give each tensor its own.
        if tensor.untyped_storage().nbytes() != nbytes or any(
                t.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr() for t in self._pending.values()):
            tensor = tensor.clone()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += nbytes
        self.peak_buffered_bytes = max(self.peak_buffered_bytes, self._pending_bytes)

    def _flush(self) -> None:
        path = self.out_dir / f".shard-{len(self._shards):05d}.safetensors"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self._shards.append((path, list(self._pending)))
        self.names.extend(self._pending)
        self.total_bytes += self._pending_bytes
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            os.replace(self._shards[0][0], self.out_dir / SAFETENSORS_SINGLE)
            return [SAFETENSORS_SINGLE]
        weight_map, files = {}, []
        for i, (path, names) in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(path, self.out_dir / final)
            files.append(final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return files


class HFReader:
    """Lazy access to the safetensors weights of an HF model directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / SAFETENSORS_INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: self.path / f for name, f in weight_map.items()}
        elif (self.path / SAFETENSORS_SINGLE).is_file():
            single = self.path / SAFETENSORS_SINGLE
            with safe_open(single, "pt") as f:
                self.files = {name: single for name in f.keys()}
        else:
            raise ConvertError(f"no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX} in {self.path}; "
                               "kd-convert reads HF checkpoints saved with safetensors")
        for f in set(self.files.values()):
            if not f.is_file():
                raise ConvertError(f"missing shard {f} (listed in {index})")

    def keys(self) -> list[str]:
        return list(self.files)

    def get(self, name: str) -> torch.Tensor:
        with safe_open(self.files[name], "pt") as f:
            return f.get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        with safe_open(self.files[name], "pt") as f:
            return tuple(f.get_slice(name).get_shape())


def expected_hf_shapes(config) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every weight an HF checkpoint of `config` must contain, in module order.

    Built on the meta device (no memory). Tied aliases (lm_head when embeddings are tied) are left
    out: `from_pretrained` re-ties them, and writing both trips safetensors' shared-memory check.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {}) if config.tie_word_embeddings else set()
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied}


def validate_stream(stream: Iterable[tuple[str, torch.Tensor, str]], expected: dict[str, tuple[int, ...]],
                    what: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Check (hf_name, tensor, origin) triples against `expected`; yield (name, tensor).

    `origin` names the file the tensor came from, so every error points at the culprit.
    """
    seen = set()
    for name, tensor, origin in stream:
        if name not in expected:
            raise ConvertError(f"unknown tensor '{name}' from {origin}: a {what} model has no such weight "
                               "(wrong family, or a module that is not part of the model?)")
        if name in seen:
            raise ConvertError(f"tensor '{name}' appears twice (second time from {origin})")
        if tuple(tensor.shape) != expected[name]:
            raise ConvertError(f"shape mismatch for '{name}' from {origin}: got {tuple(tensor.shape)}, "
                               f"the config implies {expected[name]}")
        seen.add(name)
        yield name, tensor
    missing = [n for n in expected if n not in seen]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ConvertError(f"{what} checkpoint is missing tensor(s) {', '.join(missing[:5])}{more}")


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def write_hf_checkpoint(source, out: str | Path, dtype: torch.dtype | None = None,
                        max_shard_size: str | int = "5GB", overwrite: bool = False) -> dict:
    """Write a converter source as an HF model directory, atomically.

    A source has `family`, `config` (HF), `tensors(dtype, budget_bytes)` yielding
    (hf_name, tensor, origin) and optionally `generation_config()`, `save_extras(dir)`, `report`.

    Returns a small report (files, bytes, peak bytes buffered) for the CLI and tests.
    """
    from transformers import GenerationConfig

    max_bytes = parse_size(max_shard_size)
    config = source.config
    expected = expected_hf_shapes(config)
    with atomic_output_dir(out, overwrite) as tmp:
        writer = ShardedSafetensorsWriter(tmp, max_bytes)
        stream = source.tensors(dtype=dtype, budget_bytes=max_bytes)
        out_dtype = dtype
        for name, tensor in validate_stream(stream, expected, source.family):
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            out_dtype = out_dtype or tensor.dtype
            writer.add(name, tensor)
        files = writer.close()
        config.dtype = out_dtype or torch.float32
        config.save_pretrained(tmp)
        gen = source.generation_config() if hasattr(source, "generation_config") else None
        (gen or GenerationConfig.from_model_config(config)).save_pretrained(tmp)
        extras = source.save_extras(tmp) if hasattr(source, "save_extras") else []
    return {"out": str(out), "files": files, "bytes": writer.total_bytes,
            "peak_buffered_bytes": writer.peak_buffered_bytes, "tensors": len(writer.names), "extras": extras,
            **getattr(source, "report", {})}
