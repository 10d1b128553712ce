"""Tokens: ``Example`` -> prompt-masked token ids, and the tokenized dataset.

``tokenize_example``: ``[bos] + prompt + response + [eos]``, each segment encoded on its own so the mask
boundary is exact. ``labels`` are UNSHIFTED: ``labels[i]`` is ``input_ids[i]`` where trained, else -100
(bos and prompt). The trainer shifts with ``shift_labels`` (logits at ``i`` predict ``labels[i + 1]``); the
sequence-parallel sharder must shift with the same function before splitting the sequence.
Too long: cut from the right to ``max_len`` (the kept part is exactly what the model would see, and eos is
lost so the model is not taught to stop early) and counted in ``n_truncated``; an example left with no
trained token (the prompt alone fills ``max_len``) is dropped and counted in ``n_dropped``.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from kd.reduce import IGNORE_INDEX

from .errors import DataError
from .formats import Example, to_example, uses_chat_template
from .records import iter_records


class TokenizedExample(NamedTuple):
    input_ids: list[int]
    labels: list[int]
    truncated: bool
    prompt_len: int = 0     # tokens before the final response: what on-policy sampling continues


def _encode_segments(segments, tokenizer) -> tuple[list[int], list[int], list[int], int]:
    """bos + each segment encoded on its own: (ids, unshifted labels, ids of the last trained segment,
    the number of ids before it)."""
    ids: list[int] = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    labels: list[int] = [IGNORE_INDEX] * len(ids)
    last_trained: list[int] = []
    before_last = len(ids)
    for text, trainable in segments:
        if not text:
            continue
        toks = tokenizer.encode(text)
        if trainable:
            last_trained, before_last = toks, len(ids)
        ids += toks
        labels += toks if trainable else [IGNORE_INDEX] * len(toks)
    return ids, labels, last_trained, before_last


def encode_prompt(prompt: str | Example, tokenizer) -> list[int]:
    """The ids ``tokenize_example`` puts before the final response: what an evaluator generates from.
    Pass the ``Example``: a multi-turn prompt is several separately encoded segments, which encoding the
    ``prompt`` string in one piece may tokenize differently at their seams."""
    if isinstance(prompt, Example):
        return _encode_segments(prompt.as_segments()[:-1], tokenizer)[0]
    return _encode_segments([(prompt, False)], tokenizer)[0]


def tokenize_example(ex: Example, tokenizer, max_len: int) -> TokenizedExample | None:
    """``(input_ids, labels, truncated, prompt_len)`` with unshifted labels (-100 on bos and prompt), or None when
    truncation to ``max_len`` left no trained token (the caller counts it as dropped)."""
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2, got {max_len}")
    ids, labels, last_trained, prompt_len = _encode_segments(ex.as_segments(), tokenizer)
    # A template's end-of-turn marker may already be eos (e.g. <|im_end|>); do not add a second one.
    if tokenizer.eos_id is not None and not (ex.from_template and tokenizer.eos_id in last_trained):
        ids.append(tokenizer.eos_id)
        labels.append(tokenizer.eos_id)
    truncated = len(ids) > max_len
    if truncated:
        ids, labels = ids[:max_len], labels[:max_len]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return TokenizedExample(ids, labels, truncated, min(prompt_len, len(ids)))


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
    """Every record tokenized once, up front. Items are ``{"input_ids", "labels"}`` int32 numpy arrays and
    ``prompt_len`` (the tokens before the final response);
    ``examples[i]`` is item i's ``Example`` (for evaluation and debugging), ``stats`` the counts, per-format
    detection included (``stats.summary()`` is one log line).

    ``source`` is a path (see ``iter_records``) or an iterable of record dicts; ``chat_template`` is
    ``"auto"``, ``"true"`` or ``"false"`` (see ``train.data.formats``)."""

    def __init__(self, source: str | os.PathLike | Iterable[dict], tokenizer, max_len: int, *,
                 limit: int | None = None, split: str = "train", chat_template: str | bool = "auto"):
        uses_chat_template(tokenizer, chat_template)  # a bad mode, or true without a template: fail before reading
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
            ex = to_example(record, tokenizer, where=where, chat_template=chat_template)
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
                               "labels": np.asarray(tokens.labels, dtype=np.int32),
                               "prompt_len": np.int32(tokens.prompt_len)})
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
