"""On-policy batches: the student's own samples in place of the dataset's responses.

The rollout seam of the step: loader batch -> (on-policy modes) responses replaced by student samples
-> collate -> the sequence-parallel shard (``train.parallel``). ``Rollout.next`` decides, per micro-batch,
where its responses come from (``onpolicy.mode``, definitions in docs/methods.md):

- ``off``: the dataset's.
- ``gkd``: the student's fresh samples with probability ``onpolicy.fraction`` (GKD's lambda).
- ``distillm``: DistiLLM's adaptive off-policy schedule: a replay buffer of student samples and a
  threshold phi that rises when the validation loss does (``on_eval``); each micro-batch draws r: fresh
  samples if ``r < phi * (1 - progress)`` (or ``r < phi`` while the buffer is not yet full), a replayed
  batch if ``r < phi``, else the dataset's.
- ``always``: fresh samples for every micro-batch.

The draw is the same on every rank (one generator seeded by ``train.seed``): generation under ZeRO-3
gathers parameters collectively, so every rank must sample in the same micro-batches. Each data-parallel
rank samples its own prompts with its own seeded generator; the ranks of a sequence-parallel group share
their batch, so the group's first rank samples and sends the result to the others. Everything that moves
(the draws, phi, the sampling generators and the replay buffer) is in the checkpoint.
"""
from __future__ import annotations

import contextlib
import time

import numpy as np
import torch
import torch.distributed as dist
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from kd.reduce import IGNORE_INDEX

SOURCES = ("dataset", "fresh", "replay")


class _Vocabulary(LogitsProcessor):
    """Only ids below ``size`` can be sampled: rows past it are padding of the embedding matrix (or past
    the teacher's rows, ``model.vocab_size``), which the tokenizer cannot decode nor the teacher score."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, input_ids, scores):
        scores[:, self.size:] = float("-inf")
        return scores


@torch.no_grad()
def sample(model, prompts: list[list[int]], *, max_new_tokens: int, pad_id: int, eos_id: int | list[int] | None,
           max_len: int, temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False,
           synced: bool = False, vocab_size: int | None = None) -> list[list[int]]:
    """Continuations of ``prompts`` by an HF causal LM: one left-padded batch, KV cache on, sampled at
    ``temperature`` / ``top_p`` (no top-k) from the global torch RNG, or ``greedy``, among the first
    ``vocab_size`` ids. Each continuation ends after its first stop id (``eos_id``: one or several, e.g.
    EOS and an instruct model's end-of-turn; kept: the model is taught to stop) and is cut so that
    prompt + continuation fits in ``max_len``. ``synced``: ranks step together until all are done
    (ZeRO-3's layer-by-layer gathers are collective)."""
    device = next(model.parameters()).device
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    stops = [] if eos_id is None else [eos_id] if isinstance(eos_id, int) else list(eos_id)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=not greedy, pad_token_id=pad_id,
                              eos_token_id=stops or None, use_cache=True,
                              **({} if greedy else dict(temperature=temperature, top_p=top_p, top_k=0)))
    extra = dict(logits_processor=LogitsProcessorList([_Vocabulary(vocab_size)])) if vocab_size else {}
    # transformers fills what ``config`` leaves unset from the model's own generation_config.json
    # (repetition penalties, n-gram bans of released chat models): those must not shape the samples
    saved, model.generation_config = model.generation_config, GenerationConfig()
    try:
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, synced_gpus=synced,
                             **extra)
    finally:
        model.generation_config = saved
    responses = []
    for prompt, row in zip(prompts, out[:, width:].tolist()):
        end = next((i for i, t in enumerate(row) if t in stops), None)
        if end is not None:
            row = row[: end + 1]
        responses.append(row[: max(0, max_len - len(prompt))])
    return responses


def stop_ids(model, eos_id: int | None) -> list[int]:
    """The tokenizer's EOS and the ids a released model's own generation_config.json ends on (an instruct
    model's end-of-turn: Llama-3's <|eot_id|>, Gemma-2's <end_of_turn>). A generation config derived from
    the model config (``_from_model_config``: random inits, models saved without one) holds the config's
    default ids, which need not be this tokenizer's: only the tokenizer's EOS then."""
    config = getattr(model, "generation_config", None)
    own = None if config is None or getattr(config, "_from_model_config", False) else config.eos_token_id
    own = [] if own is None else [own] if isinstance(own, int) else list(own)
    return sorted({*own, *([eos_id] if eos_id is not None else [])})


def prompts_of(batch: dict[str, torch.Tensor]) -> list[list[int]]:
    """Each row's prompt (the tokens before its final response) from a collated loader batch."""
    return [row[:n].tolist() for row, n in zip(batch["input_ids"], batch["prompt_len"].tolist())]


def as_items(prompts: list[list[int]], responses: list[list[int]]) -> list[dict[str, np.ndarray]]:
    """Dataset items (the loader's form: unshifted labels, -100 on the prompt) of prompt + response."""
    return [{"input_ids": np.asarray(p + r, dtype=np.int64),
             "labels": np.asarray([IGNORE_INDEX] * len(p) + r, dtype=np.int64), "prompt_len": np.int64(len(p))}
            for p, r in zip(prompts, responses)]


class ReplayBuffer:
    """DistiLLM's buffer of student samples (prompt, response), first in first out, ``capacity`` per
    data-parallel rank; ``sample`` draws without replacement with the caller's generator."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.items: list[tuple[list[int], list[int]]] = []

    def __len__(self) -> int:
        return len(self.items)

    @property
    def full(self) -> bool:
        return len(self.items) >= self.capacity

    def push(self, prompts: list[list[int]], responses: list[list[int]]) -> None:
        self.items.extend(zip(prompts, responses))
        del self.items[: max(0, len(self.items) - self.capacity)]

    def sample(self, n: int, generator: torch.Generator) -> tuple[list[list[int]], list[list[int]]]:
        picks = torch.randperm(len(self.items), generator=generator)[:n].tolist()
        while len(picks) < n:            # fewer samples than a batch: some repeat
            picks.append(int(torch.randint(len(self.items), (), generator=generator)))
        prompts, responses = zip(*(self.items[i] for i in picks))
        return list(prompts), list(responses)


class Rollout:
    """Where each micro-batch's responses come from, and the student samples that replace them."""

    def __init__(self, cfg, student, sp, collate, pad_id: int, eos_id: int | None, vocab_size: int | None = None):
        self.o, self.student, self.sp, self.collate = cfg.onpolicy, student, sp, collate
        self.pad_id, self.max_len = pad_id, cfg.data.max_len
        self.stops = stop_ids(getattr(student, "model", None), eos_id)
        # sampled ids stay among the tokenizer's, and the distilled rows (model.vocab_size)
        sizes = [n for n in (vocab_size, cfg.model.vocab_size) if n]
        self.vocab_size = min(sizes) if sizes else None
        self.draws = torch.Generator().manual_seed(cfg.train.seed)            # the same on every rank
        self.seed = cfg.train.seed * 1_000_003 + 7919 * (sp.dp_rank + 1)       # this replica's samples
        self.replay = torch.Generator().manual_seed(self.seed)
        self.sampling: dict | None = None          # the torch RNG state of this rank's sampling
        self.buffer = ReplayBuffer(self.o.buffer_size)
        self.phi, self.ref_loss = self.o.init_threshold, None
        self.counts = dict.fromkeys(SOURCES, 0)
        self.lengths: list[int] = []               # this step's sampled response lengths
        self._step: contextlib.ExitStack | None = None    # open during micro_batches: one generation context
        self._step_lm = None
        self.generation_s = 0.0                    # this step's time in generate

    @property
    def active(self) -> bool:
        return self.o.mode != "off"

    def source(self, progress: float) -> str:
        o = self.o
        if o.mode == "off":
            return "dataset"
        r = float(torch.rand((), generator=self.draws))
        if o.mode == "always":
            return "fresh"
        if o.mode == "gkd":
            return "fresh" if r < o.fraction else "dataset"
        # the share of fresh samples within phi (DistiLLM's finetune.py: its three replay ratios)
        fresh_below = self.phi * {"decreasing": 1.0 - progress, "increasing": progress, "constant": 0.5}[o.replay_ratio]
        if r < fresh_below or (r < self.phi and not self.buffer.full):
            return "fresh"
        return "replay" if r < self.phi else "dataset"

    def next(self, loader, progress: float) -> tuple[dict[str, torch.Tensor], str]:
        """The loader's next batch, its responses replaced by student samples where the schedule says so;
        and where they came from (one of ``SOURCES``)."""
        batch = next(loader)
        src = self.source(progress)
        self.counts[src] += 1
        if src == "dataset":
            return batch, src
        if src == "replay":
            prompts, responses = self._from_leader(self.buffer.sample(batch["input_ids"].shape[0], self.replay))
        else:
            prompts = prompts_of(batch)
            responses = self._generate(prompts)
            self.buffer.push(prompts, responses)
            self.lengths += map(len, responses)
        return self.collate(as_items(prompts, responses)), src

    def micro_batches(self, loader, n: int, progress: float) -> list[tuple[dict[str, torch.Tensor], str]]:
        """A step's ``n`` micro-batches (``next`` n times). Their samples are generated in one generation
        context: one gather of the student, and ZeRO-3's hooks re-installed once per step, not once per
        sampled micro-batch (each re-install makes the next forward re-record ZeRO's fetch order)."""
        with contextlib.ExitStack() as stack:
            self._step, self._step_lm = stack, None
            try:
                return [self.next(loader, progress) for _ in range(n)]
            finally:
                self._step = self._step_lm = None

    @contextlib.contextmanager
    def _generation(self, layerwise: bool):
        """The student ready to generate: the step's open context (entered at its first sampled
        micro-batch, on every rank alike: the draws agree), or one of its own outside a step."""
        if self._step is None:
            with self.student.for_generation(layerwise) as lm:
                yield lm
            return
        if self._step_lm is None:
            self._step_lm = self._step.enter_context(self.student.for_generation(layerwise))
        yield self._step_lm

    def _generate(self, prompts: list[list[int]]) -> list[list[int]]:
        t0 = time.perf_counter()
        layerwise = self.o.generation == "layerwise"
        leader = self.sp.rank == 0
        out = None
        with self._generation(layerwise) as lm, self.sp.whole_sequences(), self._rng():
            if leader or layerwise:      # layer-by-layer gathers are collective: every rank steps
                out = sample(lm, prompts, max_new_tokens=self.o.max_new_tokens, pad_id=self.pad_id,
                             eos_id=self.stops, max_len=self.max_len, temperature=self.o.temperature,
                             top_p=self.o.top_p, synced=layerwise and dist.get_world_size() > 1,
                             vocab_size=self.vocab_size)
        out = self._from_leader(out)
        self.generation_s += time.perf_counter() - t0
        return out

    def _from_leader(self, obj):
        """The sequence-parallel group's first rank's ``obj`` on every rank of the group: the group
        scores one batch, whatever its other ranks hold (their buffers differ after a resume with
        another ``parallel.sequence``)."""
        if self.sp.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=dist.get_rank() - self.sp.rank, group=self.sp.group)
        return box[0]

    @contextlib.contextmanager
    def _rng(self):
        """This rank's sampling stream: HF ``generate`` samples from the global RNG, so it runs on a
        fork of it holding this rank's own state (the training RNG is untouched)."""
        cuda = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=cuda):
            if self.sampling is None:
                torch.manual_seed(self.seed)
            else:
                torch.set_rng_state(self.sampling["cpu"])
                if cuda and self.sampling.get("cuda") is not None:
                    torch.cuda.set_rng_state(self.sampling["cuda"])
            yield
            self.sampling = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if cuda else None}

    def stats(self) -> dict:
        """This step's rollout figures for the log (then reset): the realised on-policy fraction so far,
        buffer size, phi, mean sampled length, generation seconds."""
        if not self.active:
            return {}
        total = max(1, sum(self.counts.values()))
        out = {"onpolicy_fraction": (self.counts["fresh"] + self.counts["replay"]) / total,
               "generation_s": self.generation_s}
        if self.lengths:
            out["sampled_len"] = sum(self.lengths) / len(self.lengths)
        if self.o.mode == "distillm":
            out.update(phi=self.phi, buffer=len(self.buffer), replay_fraction=self.counts["replay"] / total)
        self.lengths, self.generation_s = [], 0.0
        return out

    def on_eval(self, metrics: dict) -> None:
        """DistiLLM: the first evaluation (before the first step) sets the reference loss; a later one at
        least ``loss_eps`` above it raises phi by ``threshold_step`` and becomes the reference."""
        if self.o.mode != "distillm":
            return
        if self.o.val_metric not in metrics:
            raise KeyError(f"onpolicy.val_metric={self.o.val_metric!r} is not an evaluation figure; "
                           f"choose one of {', '.join(sorted(metrics))}")
        loss = float(metrics[self.o.val_metric])
        if self.ref_loss is None:
            self.ref_loss = loss
        elif loss >= self.ref_loss + self.o.loss_eps:
            self.phi = min(1.0, self.phi + self.o.threshold_step)
            self.ref_loss = loss

    # checkpoints: the shared part goes into the trainer state, this rank's into its own file
    def state_dict(self) -> dict:
        return {"draws": self.draws.get_state(), "phi": self.phi, "ref_loss": self.ref_loss,
                "counts": dict(self.counts)}

    def rank_state_dict(self) -> dict:
        return {"sampling": self.sampling, "replay": self.replay.get_state(), "buffer": list(self.buffer.items)}

    def load_state_dict(self, state: dict | None, rank_state: dict | None) -> None:
        """``rank_state`` is None when resuming at another world size: the buffer starts empty and the
        sampling streams restart from their seeds (samples cannot be mapped to other ranks)."""
        if state:
            self.draws.set_state(state["draws"])
            self.phi, self.ref_loss, self.counts = state["phi"], state["ref_loss"], dict(state["counts"])
        if rank_state:
            self.sampling = rank_state["sampling"]
            self.replay.set_state(rank_state["replay"])
            self.buffer.items = [tuple(x) for x in rank_state["buffer"]]
