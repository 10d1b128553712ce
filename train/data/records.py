"""Records: the raw dicts of a dataset file, each with the location error messages cite.

``load_records`` / ``iter_records`` read JSONL (one object per line; also ``.ndjson`` and any unknown suffix),
JSON (a list, or ``{"data": [...]}``; a ``.json`` file holding several top-level objects is read as JSONL),
parquet (``pyarrow``) or a directory written by HF ``datasets.save_to_disk`` (``datasets``). Both optional
packages come with the ``data`` extra: ``pip install 'kd-stack[data]'``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

from .errors import DataError

DATA_EXTRA = "pip install 'kd-stack[data]'"


def iter_records(path: str | os.PathLike, limit: int | None = None,
                 split: str = "train") -> Iterator[tuple[str, dict]]:
    """Yield ``(location, record)`` pairs; ``location`` ("file line 7") is what error messages cite.

    ``limit`` stops after that many records (reading only that far in JSONL); ``split`` picks the split of a
    saved HF ``DatasetDict`` directory."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or directory")
    if p.is_dir():
        yield from ((f"{p} row {i}", r) for i, r in enumerate(_saved_dataset_rows(p, split, limit)))
        return
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        yield from ((f"{p} row {i}", r) for i, r in enumerate(_parquet_rows(p, limit)))
    elif suffix == ".json":
        yield from _json_records(p, limit)
    else:  # .jsonl, .ndjson and anything else: one JSON object per line
        yield from _jsonl_records(p, limit)


def load_records(path: str | os.PathLike, limit: int | None = None, split: str = "train") -> list[dict]:
    """All records of a file or saved dataset dir (at most ``limit``); an empty one is a ``DataError``."""
    records = [r for _, r in iter_records(path, limit, split)]
    if not records:
        raise DataError(f"{path}: the dataset is empty; point the config at a file with at least one record")
    return records


def _jsonl_records(p: Path, limit: int | None) -> Iterator[tuple[str, dict]]:
    n = 0
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and n >= limit:
                return
            if not line.strip():
                continue
            try:  # without its newline, so the error's column is a column of this line
                rec = json.loads(line.rstrip("\n"))
            except json.JSONDecodeError as e:
                raise DataError(f"{p} line {lineno}: not valid JSON ({e.msg} at column {e.colno}); each line must "
                                "hold one JSON object: fix or delete that line") from None
            if not isinstance(rec, dict):
                raise DataError(f"{p} line {lineno}: expected a JSON object, got {type(rec).__name__}; each line "
                                "must hold one record like {\"prompt\": ..., \"response\": ...}")
            n += 1
            yield f"{p} line {lineno}", rec


def _json_records(p: Path, limit: int | None) -> Iterator[tuple[str, dict]]:
    text = p.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several top-level values: a JSONL file with a .json name
            yield from _jsonl_records(p, limit)
            return
        raise DataError(f"{p} line {e.lineno}: not valid JSON ({e.msg} at column {e.colno}); fix the file or "
                        "convert it to JSONL (one object per line)") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{p}: expected a JSON list of records or {{\"data\": [...]}}, got {type(data).__name__}")
    for i, rec in enumerate(data[:limit] if limit is not None else data):
        if not isinstance(rec, dict):
            raise DataError(f"{p} item {i}: expected a JSON object, got {type(rec).__name__}")
        yield f"{p} item {i}", rec


def _parquet_rows(p: Path, limit: int | None) -> list[dict]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {p} needs the optional package pyarrow: {DATA_EXTRA}") from None
    rows: list[dict] = []
    try:
        for batch in pq.ParquetFile(p).iter_batches(batch_size=1024):
            rows += batch.to_pylist()
            if limit is not None and len(rows) >= limit:
                return rows[:limit]
    except pa.ArrowException as e:
        raise DataError(f"{p} is not a parquet file, or a damaged one ({e}); write it again as parquet, or "
                        "rename it to what it holds (.jsonl / .json)") from None
    return rows


def _saved_dataset_rows(d: Path, split: str, limit: int | None) -> Iterator[dict]:
    """The rows of a ``datasets.save_to_disk`` directory (a ``Dataset``, or ``split`` of a ``DatasetDict``)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{d} is a directory, read as a saved HF dataset, which needs the optional package "
                        f"datasets: {DATA_EXTRA} (or pass a .jsonl/.json/.parquet file)") from None
    try:
        ds = datasets.load_from_disk(str(d))
    except FileNotFoundError:
        raise DataError(f"{d} is a directory but not a saved HF dataset (datasets.load_from_disk cannot read it); "
                        "pass a .jsonl/.json/.parquet file or a datasets.save_to_disk directory") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{d}: no split {split!r} in this DatasetDict; it has {list(ds)}")
        ds = ds[split]
    if limit is not None and limit < len(ds):
        ds = ds.select(range(limit))
    return iter(ds)
