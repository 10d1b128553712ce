"""Data: records -> examples -> prompt-masked token sequences -> (packed) batches, with an exactly resumable loader.

Records
    ``load_records`` reads JSONL, JSON (a list, or ``{"data": [...]}``), parquet (needs ``pyarrow``) or a
    directory written by HF ``datasets.save_to_disk`` (uses ``datasets`` when installed, else ``pyarrow``).
    The format of each record is detected from its keys (``detect_format``) and counted in the dataset stats:

    - chat: ``messages: [{role, content}, ...]``; see "Chat" below
    - sharegpt: ``conversations: [{from, value}, ...]``; as chat (human -> user, gpt -> assistant)
    - prompt_response: ``prompt`` + ``response`` (or ``completion``); used verbatim
    - alpaca: ``instruction`` [+ ``input``] + ``output``; prompt ``ALPACA_PROMPT`` (``ALPACA_PROMPT_NO_INPUT``
      when the input is empty, the Stanford Alpaca templates), response ``output``
    - dolly: ``instruction`` [+ ``context``] + ``response``; as Alpaca with the context as input
    - gsm8k: ``question`` + ``answer``; prompt ``GSM8K_PROMPT`` ("Question: {q}\\nAnswer:"), response the answer
      verbatim (calculator notes ``<<...>>`` and the final ``#### N`` line kept)

Chat
    With a tokenizer that has a chat template, the conversation is rendered by it; every assistant turn (the
    text the template adds for it, end-of-turn marker included) is trained on, everything else is masked.
    Turns are found by rendering growing prefixes; a template that does not render prefixes as prefixes of
    the whole falls back to training the final assistant turn only. Without a template a plain one is used
    (``PLAIN_ROLES``): segments ``"System: ...\\nUser: ...\\nAssistant:"`` | ``reply`` | ``"\\nUser: ...\\nAssistant:"``
    | ``reply`` ..., loss on the replies (and eos after the last); SentencePiece's dummy prefix makes the
    separately encoded reply read as "Assistant: reply". Messages after the last assistant turn are dropped
    (there is nothing to learn from them).

Tokens (``tokenize_example``)
    ``[bos] + prompt + response + [eos]``, each segment encoded on its own so the mask boundary is exact.
    ``labels`` are UNSHIFTED: ``labels[i]`` is ``input_ids[i]`` where trained, else -100 (bos and prompt).
    The trainer shifts with ``shift_labels`` (logits at ``i`` predict ``labels[i + 1]``); the sequence-parallel
    sharder must shift with the same function before splitting the sequence.
    Too long: cut from the right to ``max_len`` (the kept part is exactly what the model would see, and eos
    is lost so the model is not taught to stop early) and counted in ``n_truncated``; an example left with no
    trained token (the prompt alone fills ``max_len``) is dropped and counted in ``n_dropped``.

Batches (``make_loader``)
    ``input_ids``, ``labels`` (unshifted), ``attention_mask``, ``position_ids``, all ``[B, L]`` int64, L the
    longest in the batch rounded up to ``pad_to_multiple_of``. Padding: pad id, label -100, mask 0.
    Unpacked: position ids ``0..L-1``. Packed (``pack=True``): examples concatenated greedily into rows of
    at most ``max_len``, position ids restarting at 0 for each example (and for the padding tail), the first
    token of each example labelled -100 so nothing is predicted across a boundary. To keep packed examples
    from attending to each other, call HF models with ``attention_mask=None``, these ``position_ids`` and
    ``use_cache=False``: transformers then builds a block-diagonal causal mask from the position-id restarts
    (it skips that when given a 2D mask or a cache, and ``config.use_cache`` is on by default, even in
    train mode; ``test_packed_rows_do_not_attend_across_examples`` pins this).
"""
from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

IGNORE_INDEX = -100

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
GSM8K_PROMPT = "Question: {question}\nAnswer:"
PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                   "assistant": "assistant", "bot": "assistant", "model": "assistant"}
FORMATS = ("chat", "sharegpt", "prompt_response", "alpaca", "dolly", "gsm8k")
_FORMAT_HELP = ("expected one of: messages (chat), conversations (ShareGPT), prompt + response/completion, "
                "instruction + output (Alpaca), instruction + response (Dolly), question + answer (GSM8K)")


class DataError(ValueError):
    """Bad or unusable training data; the message names the file (and line) and says what to do."""


# --------------------------------------------------------------------------------------------------------------
# Records


def iter_records(path: str | os.PathLike, limit: int | None = None,
                 split: str = "train") -> Iterator[tuple[str, dict]]:
    """Yield ``(location, record)`` pairs; ``location`` ("file line 7") is what error messages cite.

    ``limit`` stops after that many records (reading only that far in JSONL); ``split`` picks the split of a
    saved HF ``DatasetDict`` directory."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or directory")
    if p.is_dir():
        rows = _hf_dataset_rows(p, split, limit)
        yield from ((f"{p} row {i}", r) for i, r in enumerate(rows))
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
            try:
                rec = json.loads(line)
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


def _require_pyarrow(what: str):
    try:
        import pyarrow
    except ImportError:
        raise DataError(f"{what} needs the optional package pyarrow: pip install pyarrow") from None
    return pyarrow


def _parquet_rows(p: Path, limit: int | None) -> list[dict]:
    _require_pyarrow(f"reading {p}")
    import pyarrow.parquet as pq

    rows: list[dict] = []
    for batch in pq.ParquetFile(p).iter_batches(batch_size=1024):
        rows += batch.to_pylist()
        if limit is not None and len(rows) >= limit:
            return rows[:limit]
    return rows


def _hf_dataset_rows(d: Path, split: str, limit: int | None) -> list[dict]:
    """A ``save_to_disk`` directory: through ``datasets`` when installed, else its Arrow files via pyarrow."""
    is_dict = (d / "dataset_dict.json").exists()
    if not is_dict and not (d / "state.json").exists():
        raise DataError(f"{d} is a directory but not a saved HF dataset (no state.json or dataset_dict.json); "
                        "pass a .jsonl/.json/.parquet file or a datasets.save_to_disk directory")
    if is_dict:
        splits = json.loads((d / "dataset_dict.json").read_text())["splits"]
        if split not in splits:
            raise DataError(f"{d}: no split {split!r} in this DatasetDict; it has {splits}")
        d = d / split
    try:
        import datasets
    except ImportError:
        datasets = None
    if datasets is not None:
        ds = datasets.load_from_disk(str(d))
        if limit is not None and limit < len(ds):
            ds = ds.select(range(limit))
        return ds.to_list()
    pa = _require_pyarrow(f"reading the saved dataset {d} without the datasets package")
    state = json.loads((d / "state.json").read_text())
    if state.get("_indices_data_files"):
        raise DataError(f"{d} was saved with an indices mapping, which only the datasets package can apply: "
                        "pip install datasets (or save it again after flatten_indices())")
    rows: list[dict] = []
    for entry in state["_data_files"]:
        with pa.memory_map(str(d / entry["filename"])) as src:
            rows += pa.ipc.open_stream(src).read_all().to_pylist()
        if limit is not None and len(rows) >= limit:
            return rows[:limit]
    return rows


# --------------------------------------------------------------------------------------------------------------
# Examples


@dataclass(frozen=True)
class Example:
    """One training example. ``segments`` is the whole text as ``(text, trainable)`` pieces in order; for
    single-turn formats it is ``((prompt, False), (response, True))``. ``prompt`` is everything before the
    final trainable piece and ``response`` that piece, so an evaluator can generate from ``prompt``."""
    prompt: str
    response: str
    fmt: str = "prompt_response"
    segments: tuple[tuple[str, bool], ...] | None = None
    from_template: bool = False  # segments rendered by the tokenizer's chat template

    def as_segments(self) -> tuple[tuple[str, bool], ...]:
        return self.segments if self.segments is not None else ((self.prompt, False), (self.response, True))


def detect_format(record: dict) -> str | None:
    """The record format (one of ``FORMATS``) from its keys, or None when unrecognised."""
    if "messages" in record:
        return "chat"
    if "conversations" in record:
        return "sharegpt"
    if "prompt" in record and ("response" in record or "completion" in record):
        return "prompt_response"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "instruction" in record and "response" in record:
        return "dolly"
    if "question" in record and "answer" in record:
        return "gsm8k"
    return None


def _text(record: dict, key: str, where: str, optional: bool = False) -> str:
    value = record.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}; fix the record")
    return value


def _alpaca_prompt(instruction: str, extra: str) -> str:
    if extra.strip():
        return ALPACA_PROMPT.format(instruction=instruction, input=extra)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def to_example(record: dict, tokenizer=None, *, where: str = "record", use_chat_template: bool = False) -> Example:
    """Convert one record to an ``Example``. ``tokenizer`` is needed only for chat templates;
    ``use_chat_template`` also wraps single-turn formats as a user/assistant exchange in that template."""
    fmt = detect_format(record)
    if fmt is None:
        raise DataError(f"{where}: cannot tell the record format from its keys {sorted(record)}; {_FORMAT_HELP}. "
                        "Rename the fields or convert the file")
    if fmt in ("chat", "sharegpt"):
        return _chat_example(_messages(record, fmt, where), fmt, tokenizer, where)
    if fmt == "prompt_response":
        prompt = _text(record, "prompt", where)
        response = _text(record, "response" if "response" in record else "completion", where)
    elif fmt == "alpaca":
        prompt = _alpaca_prompt(_text(record, "instruction", where), _text(record, "input", where, optional=True))
        response = _text(record, "output", where)
    elif fmt == "dolly":
        prompt = _alpaca_prompt(_text(record, "instruction", where), _text(record, "context", where, optional=True))
        response = _text(record, "response", where)
    else:  # gsm8k
        prompt = GSM8K_PROMPT.format(question=_text(record, "question", where))
        response = _text(record, "answer", where)
    if use_chat_template and tokenizer is not None and _has_template(tokenizer):
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        return _chat_example(messages, fmt, tokenizer, where)
    return Example(prompt, response, fmt)


def _messages(record: dict, fmt: str, where: str) -> list[dict]:
    if fmt == "chat":
        key, role_key, content_key = "messages", "role", "content"
    else:
        key, role_key, content_key = "conversations", "from", "value"
    raw = record[key]
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{where}: {key!r} must be a non-empty list of turns")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or not isinstance(m.get(content_key), str):
            raise DataError(f"{where}: {key}[{i}] must be an object with a string {content_key!r}")
        role = _SHAREGPT_ROLES.get(str(m.get(role_key)).lower())
        if role is None:
            raise DataError(f"{where}: {key}[{i}] has {role_key}={m.get(role_key)!r}; use system, user or assistant")
        messages.append({"role": role, "content": m[content_key]})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant turn, so nothing to train on; "
                        "drop the record or add the reply")
    return messages


def _has_template(tokenizer) -> bool:
    known = getattr(tokenizer, "has_chat_template", None)
    if known is not None:
        return bool(known)
    return tokenizer.apply_chat_template([{"role": "user", "content": "x"}]) is not None


def _chat_example(messages: list[dict], fmt: str, tokenizer, where: str) -> Example:
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    messages = messages[:last + 1]
    if tokenizer is not None and _has_template(tokenizer):
        segments = _template_segments(messages, tokenizer, where)
        bos = getattr(tokenizer, "bos_token", None)
        if bos and segments[0][0].startswith(bos):  # tokenize_example adds bos itself
            segments[0] = (segments[0][0][len(bos):], segments[0][1])
        templated = True
    else:
        segments, pending = [], ""
        for m in messages:
            if m["role"] == "assistant":
                segments += [(pending + PLAIN_ROLES["assistant"] + ":", False), (m["content"], True)]
                pending = "\n"
            else:
                pending += f"{PLAIN_ROLES[m['role']]}: {m['content']}\n"
        templated = False
    prompt = "".join(t for t, _ in segments[:-1])
    return Example(prompt, segments[-1][0], fmt, tuple(segments), from_template=templated)


def _template_segments(messages: list[dict], tokenizer, where: str) -> list[tuple[str, bool]]:
    def render(msgs, gen):
        try:
            return tokenizer.apply_chat_template(msgs, add_generation_prompt=gen)
        except Exception as e:  # templates raise on role orders they do not support
            raise DataError(f"{where}: the chat template of {tokenizer.name} rejected this conversation: {e}") from None

    segments, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        with_prompt = render(messages[:i], True) if i else ""
        full = render(messages[:i + 1], False)
        if not (with_prompt.startswith(done) and full.startswith(with_prompt)):
            break
        segments += [(with_prompt[len(done):], False), (full[len(with_prompt):], True)]
        done = full
    else:
        return segments
    # Prefix rendering is not stable for this template: train on the final reply only.
    prompt = render(messages[:-1], True)
    full = render(messages, False)
    if not full.startswith(prompt):
        raise DataError(f"{where}: the chat template of {tokenizer.name} does not render the conversation as "
                        "prompt + reply, so the reply cannot be located; use a plain-text format instead")
    return [(prompt, False), (full[len(prompt):], True)]


# --------------------------------------------------------------------------------------------------------------
# Tokens


class TokenizedExample(NamedTuple):
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def _encode_segments(segments, tokenizer) -> tuple[list[int], list[int], list[int]]:
    """bos + each segment encoded on its own: (ids, unshifted labels, ids of the last trained segment)."""
    ids: list[int] = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    labels: list[int] = [IGNORE_INDEX] * len(ids)
    last_trained: list[int] = []
    for text, trainable in segments:
        if not text:
            continue
        toks = tokenizer.encode(text)
        ids += toks
        labels += toks if trainable else [IGNORE_INDEX] * len(toks)
        if trainable:
            last_trained = toks
    return ids, labels, last_trained


def encode_prompt(prompt: str | Example, tokenizer) -> list[int]:
    """The ids ``tokenize_example`` puts before the final response: what an evaluator generates from.
    Pass the ``Example`` for chat, whose prompt is several separately encoded segments."""
    if isinstance(prompt, Example):
        return _encode_segments(prompt.as_segments()[:-1], tokenizer)[0]
    return _encode_segments([(prompt, False)], tokenizer)[0]


def tokenize_example(ex: Example, tokenizer, max_len: int) -> TokenizedExample | None:
    """``(input_ids, labels, truncated)`` with unshifted labels (-100 on bos and prompt), or None when
    truncation to ``max_len`` left no trained token (the caller counts it as dropped)."""
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2, got {max_len}")
    ids, labels, last_trained = _encode_segments(ex.as_segments(), tokenizer)
    # A template's end-of-turn marker may already be eos (e.g. <|im_end|>); do not add a second one.
    if tokenizer.eos_id is not None and not (ex.from_template and tokenizer.eos_id in last_trained):
        ids.append(tokenizer.eos_id)
        labels.append(tokenizer.eos_id)
    truncated = len(ids) > max_len
    if truncated:
        ids, labels = ids[:max_len], labels[:max_len]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return TokenizedExample(ids, labels, truncated)


def shift_labels(labels):
    """Next-token targets: ``labels[1:] + [-100]`` along the last dim (list, numpy array or tensor).
    The one definition the trainer and the sequence-parallel sharder share: shift before sharding."""
    if isinstance(labels, torch.Tensor):
        pad = torch.full_like(labels[..., :1], IGNORE_INDEX)
        return torch.cat([labels[..., 1:], pad], dim=-1)
    if isinstance(labels, np.ndarray):
        return np.concatenate([labels[..., 1:], np.full_like(labels[..., :1], IGNORE_INDEX)], axis=-1)
    return list(labels[1:]) + [IGNORE_INDEX]


@dataclass
class DataStats:
    source: str
    n_records: int = 0
    n_examples: int = 0
    n_truncated: int = 0
    n_dropped: int = 0
    n_tokens: int = 0
    n_label_tokens: int = 0
    formats: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        fmts = ", ".join(f"{k}={v}" for k, v in sorted(self.formats.items()))
        return (f"{self.source}: {self.n_records} records ({fmts}) -> {self.n_examples} examples, "
                f"{self.n_truncated} truncated, {self.n_dropped} dropped, {self.n_tokens} tokens "
                f"({self.n_label_tokens} trained)")


class TokenizedDataset(Dataset):
    """Every record tokenized once, up front. Items are ``{"input_ids", "labels"}`` int32 numpy arrays;
    ``examples[i]`` is item i's ``Example`` (for evaluation and debugging), ``stats`` the counts, per-format
    detection included (``stats.summary()`` is one log line).

    ``source`` is a path (see ``iter_records``) or an iterable of record dicts."""

    def __init__(self, source: str | os.PathLike | Iterable[dict], tokenizer, max_len: int, *,
                 limit: int | None = None, split: str = "train", use_chat_template: bool = False):
        self.max_len = max_len
        self.pad_id = tokenizer.pad_id
        if isinstance(source, (str, os.PathLike)):
            name, records = str(source), iter_records(source, limit, split)
        else:
            name = "records"
            records = ((f"record {i}", r) for i, r in enumerate(source) if limit is None or i < limit)
        self.stats = DataStats(name)
        formats: Counter[str] = Counter()
        self.items: list[dict[str, np.ndarray]] = []
        self.examples: list[Example] = []
        for where, record in records:
            self.stats.n_records += 1
            ex = to_example(record, tokenizer, where=where, use_chat_template=use_chat_template)
            formats[ex.fmt] += 1
            tokens = tokenize_example(ex, tokenizer, max_len)
            if tokens is None:
                self.stats.n_dropped += 1
                continue
            self.stats.n_truncated += tokens.truncated
            self.stats.n_tokens += len(tokens.input_ids)
            self.stats.n_label_tokens += sum(label != IGNORE_INDEX for label in tokens.labels)
            # int32 arrays: a quarter of the memory of Python int lists for large corpora
            self.items.append({"input_ids": np.asarray(tokens.input_ids, dtype=np.int32),
                               "labels": np.asarray(tokens.labels, dtype=np.int32)})
            self.examples.append(ex)
        self.stats.formats = dict(formats)
        self.stats.n_examples = len(self.items)
        if self.stats.n_records == 0:
            raise DataError(f"{name}: the dataset is empty; point the config at a file with at least one record")
        if not self.items:
            raise DataError(f"{name}: all {self.stats.n_dropped} examples were dropped because the prompt alone "
                            f"fills max_len={max_len}; raise max_len")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return self.items[i]


class PackedDataset(Dataset):
    """Examples concatenated greedily, in dataset order, into rows of at most ``max_len`` tokens.
    Items add ``position_ids`` restarting at 0 per example; each example's first label is -100."""

    def __init__(self, dataset: Sequence[dict], max_len: int):
        self.max_len = max_len
        self.pad_id = getattr(dataset, "pad_id", 0)
        self.items: list[dict[str, np.ndarray]] = []
        rows: list[list[dict]] = []
        row_len = 0
        for i in range(len(dataset)):
            item = dataset[i]
            n = len(item["input_ids"])
            if n > max_len:
                raise ValueError(f"example {i} has {n} tokens, more than max_len={max_len}")
            if not rows or row_len + n > max_len:
                rows.append([])
                row_len = 0
            rows[-1].append(item)
            row_len += n
        for row in rows:
            labels = [it["labels"].copy() for it in row]
            for lab in labels:
                lab[0] = IGNORE_INDEX  # never predict an example's first token from the previous example
            self.items.append({
                "input_ids": np.concatenate([it["input_ids"] for it in row]),
                "labels": np.concatenate(labels),
                "position_ids": np.concatenate([np.arange(len(it["input_ids"]), dtype=np.int32) for it in row]),
            })
        self.n_examples = len(dataset)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return self.items[i]


# --------------------------------------------------------------------------------------------------------------
# Batches


class Collator:
    """Right-pads a list of items into ``[B, L]`` int64 tensors (see the module docstring)."""

    def __init__(self, pad_id: int, pad_to_multiple_of: int | None = None):
        self.pad_id = pad_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, items: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        length = max(len(it["input_ids"]) for it in items)
        if self.pad_to_multiple_of:
            length = math.ceil(length / self.pad_to_multiple_of) * self.pad_to_multiple_of
        b = len(items)
        input_ids = torch.full((b, length), self.pad_id, dtype=torch.long)
        labels = torch.full((b, length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((b, length), dtype=torch.long)
        position_ids = torch.arange(length, dtype=torch.long).repeat(b, 1)
        for row, it in enumerate(items):
            n = len(it["input_ids"])
            input_ids[row, :n] = torch.from_numpy(it["input_ids"].astype(np.int64))
            labels[row, :n] = torch.from_numpy(it["labels"].astype(np.int64))
            attention_mask[row, :n] = 1
            if "position_ids" in it:  # packed: the padding tail restarts at 0, a segment of its own
                position_ids[row, :n] = torch.from_numpy(it["position_ids"].astype(np.int64))
                position_ids[row, n:] = torch.arange(length - n)
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
                "position_ids": position_ids}


class _RepeatMarked(Dataset):
    """Serves ``(index, repeated)`` sampler entries; a repeated item keeps its tokens but loses its labels."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, bool]) -> dict[str, np.ndarray]:
        index, repeated = key
        item = self.dataset[index]
        if repeated:
            item = {**item, "labels": np.full_like(item["labels"], IGNORE_INDEX)}
        return item


class ResumableLoader:
    """Batches for one rank, with a position that can be saved and restored exactly.

    - ``next(loader)`` never ends: it rolls into the next epoch (step-based training).
    - ``for batch in loader`` yields the rest of the current epoch, like a ``DataLoader`` (a fresh loader:
      one full epoch; evaluation).

    Each epoch is a seeded ``DistributedSampler`` permutation (``set_epoch`` per epoch). ``state_dict()`` is
    the position (epoch, batches consumed in it); after ``load_state_dict`` the next batch is the one an
    uninterrupted run would have produced, reached by skipping sampler indices, not by reading data. The
    state is the same on every rank, so saving rank 0's is enough. ``len(loader)`` is batches per epoch.

    With ``drop_last=False`` every example is seen once per epoch: the sampler tops ranks up to equal
    length by repeating a few examples (ranks must run the same number of steps), and those repeats come
    with every label -100 so token-weighted metrics count each example exactly once."""

    def __init__(self, dataset: Dataset, batch_size: int, collate_fn, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, drop_last: bool = True, num_workers: int = 0):
        self.dataset = dataset
        self.batch_size = batch_size
        self.collate_fn = collate_fn
        self.rank = rank
        self.seed = seed
        self.world_size = world_size
        self.drop_last = drop_last
        self.num_workers = num_workers
        self.sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                          drop_last=drop_last)
        per_rank = len(self.sampler)
        self.batches_per_epoch = per_rank // batch_size if drop_last else math.ceil(per_rank / batch_size)
        self.epoch = 0
        self.batch_in_epoch = 0
        self._it: Iterator | None = None

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.batch_in_epoch >= self.batches_per_epoch:
            self._next_epoch()
        while self.batch_in_epoch < self.batches_per_epoch:
            yield next(self)

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.batch_in_epoch >= self.batches_per_epoch:
            self._next_epoch()
        if self._it is None:
            self._it = self._epoch_iter()
        batch = next(self._it)
        self.batch_in_epoch += 1
        return batch

    def _next_epoch(self) -> None:
        self.epoch += 1
        self.batch_in_epoch = 0
        self._it = None

    def _epoch_iter(self) -> Iterator:
        self.sampler.set_epoch(self.epoch)
        # The sampler deals global position p to rank p % world_size; positions past the dataset's end are
        # its top-up repeats.
        n = len(self.dataset)
        order = [(i, self.rank + k * self.world_size >= n) for k, i in enumerate(self.sampler)]
        order = order[self.batch_in_epoch * self.batch_size:]
        loader = DataLoader(_RepeatMarked(self.dataset), batch_size=self.batch_size, sampler=order,
                            collate_fn=self.collate_fn, drop_last=self.drop_last, num_workers=self.num_workers)
        return iter(loader)

    def _fingerprint(self) -> dict[str, Any]:
        return {"seed": self.seed, "world_size": self.world_size, "batch_size": self.batch_size,
                "num_samples": len(self.dataset), "drop_last": self.drop_last}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, **self._fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self._fingerprint()
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            what = ", ".join(f"{k}: saved {a} vs now {b}" for k, (a, b) in diff.items())
            raise DataError(f"cannot resume the data loader exactly, the setup changed ({what}); resume with the "
                            "saved data, seed, world size and batch size, or start a fresh run")
        if not 0 <= state["batch_in_epoch"] <= self.batches_per_epoch:
            raise DataError(f"loader state batch_in_epoch={state['batch_in_epoch']} is outside an epoch of "
                            f"{self.batches_per_epoch} batches")
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self._it = None


def to_device(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    """The batch on the engine's device (``train.parallel.shard`` then makes it what the models see)."""
    return {k: v.to(device) for k, v in batch.items()}


def make_loader(dataset: Dataset, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                pack: bool = False, pad_id: int | None = None, drop_last: bool = True, *,
                pad_to_multiple_of: int | None = None, num_workers: int = 0) -> ResumableLoader:
    """The one loader for student and teacher: this rank's shard of ``dataset`` (packed first if ``pack``).
    ``pad_id`` defaults to the dataset's tokenizer pad id."""
    if pack and not isinstance(dataset, PackedDataset):
        if not isinstance(dataset, TokenizedDataset):
            raise TypeError("pack=True needs a TokenizedDataset (or an already PackedDataset)")
        dataset = PackedDataset(dataset, dataset.max_len)
    if pad_id is None:
        pad_id = getattr(dataset, "pad_id", 0)
    need = world_size * batch_size if drop_last else world_size   # eval sets are topped up instead
    if len(dataset) < need:
        unit = "packed sequences" if isinstance(dataset, PackedDataset) else "examples"
        raise DataError(f"the dataset has {len(dataset)} {unit} but world_size={world_size} x batch_size={batch_size} "
                        f"needs at least {need} for one step; add data or lower the batch size")
    return ResumableLoader(dataset, batch_size, Collator(pad_id, pad_to_multiple_of), rank=rank,
                           world_size=world_size, seed=seed, drop_last=drop_last, num_workers=num_workers)
