"""Batches: (packed) examples -> padded tensors, and the exactly resumable loader.

``make_loader`` batches are ``input_ids``, ``labels`` (unshifted), ``attention_mask``, ``position_ids``, all
``[B, L]`` int64, and ``index [B]``, each row's item in the dataset (unpacked: also ``prompt_len [B]``, where each
row's final response starts), L the longest in the batch rounded up to ``pad_to_multiple_of``. Padding: pad id, label
-100, mask 0. Unpacked: position ids ``0..L-1``. Packed (``pack=True``): examples concatenated greedily into
rows of at most ``max_len``, position ids restarting at 0 for each example (and for the padding tail), the
first token of each example labelled -100 so nothing is predicted across a boundary. To keep packed examples
from attending to each other, call HF models with ``attention_mask=None``, these ``position_ids`` and
``use_cache=False``: transformers then builds a block-diagonal causal mask from the position-id restarts (it
skips that when given a 2D mask or a cache, and ``config.use_cache`` is on by default, even in train mode;
``test_packed_rows_do_not_attend_across_examples`` pins this).
"""
from __future__ import annotations

import math
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from kd.reduce import IGNORE_INDEX

from .errors import DataError
from .tokens import TokenizedDataset


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
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
                 "position_ids": position_ids}
        if all("prompt_len" in it for it in items):   # unpacked rows: where each row's prompt ends
            batch["prompt_len"] = torch.tensor([int(it["prompt_len"]) for it in items], dtype=torch.long)
        if all("index" in it for it in items):        # the loader's: each row's dataset index
            batch["index"] = torch.tensor([int(it["index"]) for it in items], dtype=torch.long)
        return batch


class _RepeatMarked(Dataset):
    """Serves ``(index, repeated)`` sampler entries, each item with its ``index`` (a cached teacher finds its
    rows by it); a repeated item keeps its tokens but loses its labels."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, bool]) -> dict[str, np.ndarray]:
        index, repeated = key
        item = {**self.dataset[index], "index": index}
        if repeated:
            item["labels"] = np.full_like(item["labels"], IGNORE_INDEX)
        return item


class ResumableLoader:
    """Batches for one rank, with a position that can be saved and restored exactly.

    - ``next(loader)`` never ends: it rolls into the next epoch (step-based training).
    - ``for batch in loader`` yields the rest of the current epoch, like a ``DataLoader`` (a fresh loader:
      one full epoch; evaluation).

    Each epoch is a seeded permutation of the dataset (``DistributedSampler``, ``set_epoch`` per epoch),
    the same whatever the world size; the sampler deals its position p to rank ``p % world_size``, so after
    B batches on every rank exactly positions ``[0, B * batch_size * world_size)`` are consumed.
    ``state_dict()`` saves that global position: the epoch and ``consumed``, the number of positions of the
    epoch's permutation consumed by all ranks together. It is the same on every rank (saving rank 0's is
    enough), and ``load_state_dict`` accepts it at another world size or batch size when ``consumed`` is a
    multiple of the new ``batch_size * world_size``: the next batches then cover exactly the positions not
    yet consumed, no example lost or repeated (a run moving from 8 to 16 ranks). With ``drop_last`` the
    epoch's end may move a little at the new size (which tail is dropped depends on it). The position is
    reached by skipping sampler indices, not by reading data. ``len(loader)`` is batches per epoch.

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
        """What makes the permutations, and so the meaning of a position: must match to resume."""
        return {"seed": self.seed, "num_samples": len(self.dataset), "drop_last": self.drop_last}

    def state_dict(self) -> dict[str, Any]:
        # Capped at the dataset size: at the end of a drop_last=False epoch the ranks have also consumed
        # the top-up repeats, whose number depends on the world size.
        consumed = min(self.batch_in_epoch * self.batch_size * self.world_size, len(self.dataset))
        # world_size and batch_size are only informative (error messages); they may change on resume
        return {"epoch": self.epoch, "consumed": consumed, **self._fingerprint(),
                "world_size": self.world_size, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self._fingerprint()
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            what = ", ".join(f"{k}: saved {a} vs now {b}" for k, (a, b) in diff.items())
            raise DataError(f"cannot resume the data loader exactly, the setup changed ({what}); resume with the "
                            "saved data and seed, or start a fresh run")
        saved = f"world_size={state.get('world_size')} x batch_size={state.get('batch_size')}"
        if "consumed" in state:
            consumed = int(state["consumed"])
        else:  # saved before positions were global: batches of the saving run's size on each of its ranks
            consumed = int(state["batch_in_epoch"]) * int(state["batch_size"]) * int(state["world_size"])
        step = self.batch_size * self.world_size
        if not 0 <= consumed <= len(self.dataset):
            raise DataError(f"loader state consumed={consumed} is outside an epoch of {len(self.dataset)} samples")
        if consumed == len(self.dataset) or consumed >= self.batches_per_epoch * step:
            batch_in_epoch = self.batches_per_epoch   # no whole batch of this geometry is left in the epoch
        elif consumed % step:
            raise DataError(
                f"cannot resume the data loader: {consumed} samples of epoch {state['epoch']} were consumed (saved "
                f"with {saved}), which is not a multiple of world_size={self.world_size} x "
                f"batch_size={self.batch_size} = {step} now, so the next batches could not start where the saved "
                f"run stopped; choose a world size and micro batch whose product divides {consumed} (the saved "
                f"{saved} does), or resume from a checkpoint at an epoch's end")
        else:
            batch_in_epoch = consumed // step  # at most batches_per_epoch: consumed <= len(dataset)
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = batch_in_epoch
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

