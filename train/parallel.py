"""Process groups: starting torch.distributed, and sequence parallelism for both engines.

Sequence parallelism (``parallel.sequence=N``, DeepSpeed Ulysses)
    Ranks ``g*N .. g*N+N-1`` form sequence-parallel group ``g``; the ``world/N`` groups are the
    data-parallel replicas. All ranks of a group load the same batch (the loader is sharded over
    groups, not ranks), shift the labels on the whole sequence, then each keeps 1/N of every
    sequence (``SequenceParallel.shard``). Inside attention, DeepSpeed's ``UlyssesSPAttentionHF``
    all-to-alls q/k/v from "my tokens, all heads" to "all tokens, my heads", runs the core attention
    (sdpa, or flash-attn 2 on GPU) on the whole sequence and swaps back. Everything else (MLPs,
    norms, the fused kd head) only ever sees this rank's slice.

    Why not ``UlyssesSPAttentionHF.register_with_transformers``: it builds ONE wrapper for one
    model's head geometry and installs it for every model in the process, and a teacher with other
    head counts or head size then fails inside it. ``attach`` installs one dispatcher per core
    attention that keeps a DeepSpeed Ulysses module per geometry (and micro-batch size: eval
    batches can be shorter). Ulysses drops the attention mask; for sdpa the dispatcher rebuilds
    the global one from the gathered position ids when plain causal attention would be wrong
    (packed rows, sliding windows); for flash-attn it passes the documents' cumulative lengths
    (``flash_varlen_kwargs``). The flash part also runs at SP=1: transformers itself finds packed
    documents from position ids only in a batch of one row, so with more rows they would attend
    to each other.

    The engines get no ``mpu``: DeepSpeed then averages gradients over all DP x SP ranks, the
    convention of ``kd.fused_distill_loss(..., group=WORLD)`` (global token mean, backward scaled by
    the group size), so SP=N gives the loss and gradients of SP=1 on the same global batch.
"""
from __future__ import annotations

import contextlib
import warnings

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from . import data

SP_CORES = ("sdpa", "flash_attention_2", "flash_attention_3")


class ParallelError(ValueError):
    """A parallel setting that cannot work with this world size or these models."""


def init_distributed() -> None:
    """nccl on GPU, gloo on CPU.

    On CPU, DeepSpeed builds its shared-memory all-reduce kernel at the first init. Only
    tensor-parallel inference uses it, and the C++ build takes 10+ minutes on a 2-core machine; a
    build killed midway leaves a lock file that hangs every later run. Marking the op unavailable
    makes DeepSpeed use plain gloo collectives, which is all the training path needs.
    """
    # DeepSpeed still calls collectives this torch deprecates: noise on every rank, nothing to act on
    warnings.filterwarnings("ignore", r"`torch\.distributed\.\w+` is deprecated", FutureWarning)
    if get_accelerator().device_name() == "cpu":
        from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder
        deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def check_world(size: int, world: int) -> None:
    """Raise ``ParallelError`` unless ``world`` ranks split into groups of ``size``."""
    if size < 1 or world % size:
        raise ParallelError(f"parallel.sequence={size} does not divide the {world} ranks (parallel.nproc; default: "
                            f"every GPU, or 2 on CPU): each sequence-parallel group needs {size} ranks. Launch a "
                            f"multiple of {size} ranks or change parallel.sequence.")


def check_model(config, role: str, size: int, attn: str) -> None:
    """Raise ``ParallelError`` naming the setting when ``config`` cannot be split ``size`` ways."""
    if size == 1:
        return
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    where = f"parallel.sequence={size} with {role} ({type(config).__name__})"
    if heads % size:
        raise ParallelError(f"{where}: num_attention_heads={heads} is not divisible by {size}; Ulysses gives "
                            f"each rank whole heads. Use a parallel.sequence that divides {heads}.")
    if kv % size and size % kv:
        raise ParallelError(f"{where}: num_key_value_heads={kv} neither divides nor is divisible by {size}; "
                            "Ulysses splits or replicates whole KV heads. Use a parallel.sequence that divides "
                            f"{kv} or is a multiple of it.")
    if attn not in SP_CORES:
        raise ParallelError(
            f"{where}: attention '{attn}' cannot run sequence-parallel (model.attn_implementation). Ulysses "
            "drops the [T, T] mask that eager attention needs; use sdpa (CPU/GPU) or flash_attention_2 (GPU)."
            + (" Gemma-2's attention softcap needs flash_attention_2."
               if getattr(text, "attn_logit_softcapping", None) else ""))
    if attn == "sdpa" and getattr(text, "attn_logit_softcapping", None):
        raise ParallelError(f"{where}: sdpa cannot apply the attention-logit softcap "
                            f"({text.attn_logit_softcapping}) and transformers refuses it for this model; "
                            "use model.attn_implementation=flash_attention_2 (GPU) with sequence parallelism.")


def _continues(position_ids: torch.Tensor) -> torch.Tensor:
    """``[B, T-1]`` bool: position ``i`` continues the document of ``i - 1`` (packed rows restart)."""
    return position_ids[:, 1:] == position_ids[:, :-1] + 1


def global_attention_mask(position_ids: torch.Tensor, sliding_window: int | None = None) -> torch.Tensor | None:
    """``[B, 1, T, T]`` bool (True: may attend) for whole rows, from their position ids; None when
    plain causal attention is exact. Position ids that do not continue (``p[i] != p[i-1] + 1``)
    start a new document (packing); a key further back than ``sliding_window`` is masked (the HF
    rule: ``kv > q - window``)."""
    _, T = position_ids.shape
    restart = torch.ones_like(position_ids, dtype=torch.bool)
    restart[:, 1:] = ~_continues(position_ids)
    windowed = sliding_window is not None and T > sliding_window
    if not windowed and not bool(restart[:, 1:].any()):
        return None
    doc = restart.cumsum(1)
    i = torch.arange(T, device=position_ids.device)
    allowed = i[:, None] >= i[None, :]
    if windowed:
        allowed = allowed & (i[None, :] > i[:, None] - sliding_window)
    return (allowed[None] & (doc[:, :, None] == doc[:, None, :]))[:, None]


def attention_window(module, kwargs: dict) -> int | None:
    """The sliding window of this attention call: the kwarg most models pass, else the module's own
    (Qwen2-MoE applies its window only through the mask transformers builds, which Ulysses drops)."""
    return kwargs.get("sliding_window") or getattr(module, "sliding_window", None)


def shard(batch: dict[str, torch.Tensor], rank: int, size: int, packed: bool = False) -> dict[str, torch.Tensor]:
    """The batch as this rank's models see it.

    ``targets``: the labels shifted on the WHOLE sequence (the target of a slice's last token is
    the next slice's first label), then every ``[B, T]`` tensor cut to slice ``rank`` of ``size``;
    position ids stay global, as Ulysses and RoPE need. ``n_real``: the slice's non-padding tokens.
    The attention mask goes where attention must follow the position ids instead: packed rows
    (transformers keeps packed examples apart only for restarting position ids and no mask) and
    sequence-parallel slices (the mask is rebuilt for the whole sequence inside attention).
    """
    batch = dict(batch)
    batch.pop("prompt_len", None)             # the rollout's and the loader's; the models never need them
    batch.pop("index", None)
    batch["targets"] = data.shift_labels(batch.pop("labels"))
    if size > 1:
        T = batch["input_ids"].shape[1]
        if T % size:
            raise ParallelError(f"sequence length {T} is not a multiple of parallel.sequence={size}; build the "
                                "loader with pad_to_multiple_of=SequenceParallel.pad_to_multiple_of")
        n = T // size
        batch = {k: v[:, rank * n:(rank + 1) * n] for k, v in batch.items()}
    batch["n_real"] = batch["attention_mask"].sum()
    if packed or size > 1:
        del batch["attention_mask"]
    return batch


def flash_varlen_kwargs(position_ids: torch.Tensor) -> dict:
    """Cumulative document lengths for flash-attn's varlen kernel from ``[B, T]`` position ids whose
    rows all start at 0 (every row start is then a document start, and transformers flattens the
    batch); ``{}`` when no row restarts inside, where plain causal flash attention is exact."""
    if bool(_continues(position_ids).all()):
        return {}
    if bool((position_ids[:, 0] != 0).any()):
        raise ParallelError("packed rows must start at position 0 (train.data.Collator does this)")
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids
    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(position_ids)
    return dict(cu_seq_lens_q=cu_q, cu_seq_lens_k=cu_k, max_length_q=int(max_q), max_length_k=int(max_k))


_TRANSFORMERS_CORE: dict[str, callable] = {}    # the functions transformers registered, before any wrapping


class SequenceParallel:
    """This rank's place in the DP x SP grid, the batch sharder, and the attention dispatcher."""

    def __init__(self, size: int):
        world, rank = dist.get_world_size(), dist.get_rank()
        check_world(size, world)
        self.size, self.dp_rank, self.dp_world = size, rank // size, world // size
        self.group, self.rank = None, 0
        if size > 1:
            from deepspeed.runtime.sequence_parallel import parallel_state_sp as mpu
            mpu.initialize_sequence_parallel(size)
            self.group, self.rank = mpu.get_sequence_parallel_group(), mpu.get_sequence_parallel_rank()
        self._core: dict[str, callable] = {}
        self._whole = False
        self._ulysses: dict[tuple, torch.nn.Module] = {}
        self._masks: dict[int | None, tuple] = {}

    @property
    def pad_to_multiple_of(self) -> int | None:
        return self.size if self.size > 1 else None

    def shard(self, batch: dict[str, torch.Tensor], packed: bool = False) -> dict[str, torch.Tensor]:
        return shard(batch, self.rank, self.size, packed)

    def attach(self, model, role: str) -> None:
        """Check ``model`` can be split and route its attention through Ulysses (SP > 1) and, for
        flash-attn, through the packed-document handling (any SP)."""
        attn = model.config._attn_implementation
        check_model(model.config, role, self.size, attn)
        if attn in self._core or not (self.size > 1 or attn.startswith("flash_attention")):
            return
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        self._core[attn] = _TRANSFORMERS_CORE.setdefault(attn, ALL_ATTENTION_FUNCTIONS[attn])
        # Replace the core in place (as DeepSpeed does): transformers keeps taking its
        # implementation-specific paths (masks, flash varlen) for the name it knows.
        route = self._attention if self.size > 1 else self._core_attention

        def dispatch(*args, **kwargs):
            if self._whole:                      # generation: transformers' own attention, its own mask
                return self._core[attn](*args, **kwargs)
            return route(attn, *args, **kwargs)
        ALL_ATTENTION_FUNCTIONS[attn] = dispatch

    @contextlib.contextmanager
    def whole_sequences(self):
        """Forwards that see whole sequences on this rank (generation: every rank holds its prompts and
        the KV cache of its own samples) bypass Ulysses and the packed-document handling; the scored
        batch is sharded afterwards."""
        self._whole = True
        try:
            yield
        finally:
            self._whole = False

    def _attention(self, attn, module, query, key, value, attention_mask, *args, **kwargs):
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
        batch, heads, _, head_dim = query.shape
        geometry = (attn, batch, heads, key.shape[1], head_dim)
        if geometry not in self._ulysses:
            self._ulysses[geometry] = UlyssesSPAttentionHF(
                attn=lambda *a, **kw: self._core_attention(attn, *a, **kw), batch_size=batch,
                attn_head_count=heads, attn_head_size=head_dim, kv_head_count=key.shape[1],
                num_hidden_layers=module.config.num_hidden_layers, process_group=self.group,
                seq_length_is_variable=True)
        # the mask was built by transformers for the local slice: meaningless for the whole sequence
        return self._ulysses[geometry](module, query, key, value, None, *args, **kwargs)

    def _core_attention(self, attn, module, query, key, value, attention_mask, *args, **kwargs):
        """The core attention on whole sequences (after Ulysses' all-to-all when SP > 1)."""
        if attn == "sdpa":
            attention_mask = self._cached_mask(kwargs["position_ids"], attention_window(module, kwargs))
        elif attention_mask is None and kwargs.get("position_ids") is not None and "cu_seq_lens_q" not in kwargs:
            kwargs.update(flash_varlen_kwargs(kwargs["position_ids"]))
        return self._core[attn](module, query, key, value, attention_mask, *args, **kwargs)

    def _cached_mask(self, position_ids, sliding_window):
        """Every layer of one forward sees the same positions: one mask per forward and window size."""
        cached = self._masks.get(sliding_window)
        if cached is None or cached[0].shape != position_ids.shape or not torch.equal(cached[0], position_ids):
            cached = self._masks[sliding_window] = (position_ids, global_attention_mask(position_ids, sliding_window))
        return cached[1]
