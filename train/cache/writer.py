"""``kd-train RECIPE mode=cache-teacher``: the frozen teacher once over ``data.train``, its top-k written.

The data-parallel replicas take whole shards in turn; the sequence-parallel ranks of a replica gather
their slices' rows on its first rank, which writes. A shard's rows depend on its items alone
(micro-batches start at its first item), never on the number of ranks: 1 or 16 data-parallel ranks
write the same bytes (sequence parallelism the same rows up to float rounding in attention).
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.distributed as dist

from kd import topk
from kd.head import softcap
from .. import data
from ..config import Config
from .fingerprint import CacheError, counted, distill_vocab, fingerprint, items, items_digest
from .store import _shard_name, finish, id_bits, prepare, row_bytes, shard_items, stored, write_shard


def plan_text(cfg: Config, tokenizer, vocab: int) -> str:
    """``--dry-run``: what the cache will hold and how big it will be; nothing loaded but the data."""
    ds = items(cfg, tokenizer)
    per_item = counted(ds)
    n_rows, S = int(per_item.sum()), shard_items(cfg, per_item)
    k = min(cfg.cache.k, vocab)
    per = row_bytes(k, vocab, cfg.cache.dtype)
    out = cfg.cache_out
    done = len(list(out.glob("shard-*.safetensors"))) if out.is_dir() else 0
    return (f"cache of model.teacher={cfg.model.teacher} over data.train={cfg.data.train}\n"
            f"  {len(ds)} {'packed rows' if cfg.data.pack else 'examples'}, {n_rows} counted tokens\n"
            f"  k={k}, ids {id_bits(vocab)} bits, values {cfg.cache.dtype}, log tail fp32: {per} bytes per token\n"
            f"  {n_rows * per / 1e9:.3f} GB in {math.ceil(len(ds) / S)} shards of {S} items -> {out}"
            + (f" ({done} already written)" if done else ""))


def top_rows(hidden: torch.Tensor, weight: torch.Tensor, cap: float | None, vocab: int, k: int, temperature: float,
             chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids [n, k], logits less the row max [n, k] fp32, log of the tail mass at ``temperature`` [n] fp32)
    of ``hidden [n, H]``, ``chunk`` rows at a time (never an [n, V] tensor)."""
    out = []
    for s in range(0, hidden.shape[0], chunk):
        a = softcap((hidden[s:s + chunk] @ weight[:vocab].T).float(), cap)
        a = a - a.max(-1, keepdim=True).values
        vals, ids = a.topk(k, dim=-1)
        out.append((ids, vals, topk.log_tail(a / temperature, ids)))
    if not out:
        return (torch.empty((0, k), dtype=torch.long, device=hidden.device),
                torch.empty((0, k), device=hidden.device), torch.empty(0, device=hidden.device))
    return tuple(torch.cat(x) for x in zip(*out))


def _gather(t: torch.Tensor, group, size: int) -> torch.Tensor:
    """Concatenate a tensor of any first dimension from every rank of ``group`` (in rank order)."""
    if size == 1:
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    ns = [torch.zeros_like(n) for _ in range(size)]
    dist.all_gather(ns, n, group=group)
    most = int(max(ns))
    pad = torch.zeros((most - t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
    parts = [torch.empty((most, *t.shape[1:]), dtype=t.dtype, device=t.device) for _ in range(size)]
    dist.all_gather(parts, torch.cat([t, pad]), group=group)
    return torch.cat([p[:int(c)] for p, c in zip(parts, ns)])


def _assign(todo: list[int], S: int, n: int, micro_batch: int, dp_rank: int, dp_world: int):
    """This replica's micro-batches ``(shard, item ids)``: whole shards, dealt in turn to the replicas,
    each cut into micro-batches from its first item; and the number of rounds every rank runs (ZeRO-3's
    gathers are collective: a replica out of work repeats a batch and drops its rows)."""
    batches = [[(s, list(range(a, min(a + micro_batch, (s + 1) * S, n))))
                for a in range(s * S, min((s + 1) * S, n), micro_batch)] for s in todo]
    mine = [b for i, shard in enumerate(batches) if i % dp_world == dp_rank for b in shard]
    rounds = max(sum(len(batches[i]) for i in range(r, len(batches), dp_world)) for r in range(dp_world))
    return mine, rounds


def _on_rank0(fn, device):
    """``fn()`` on rank 0, its result on every rank; an error there is raised on every rank."""
    from .. import launch
    result, failure = None, None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except Exception as e:          # noqa: BLE001 - re-raised below, on every rank
            failure = e
    launch.agree(failure if launch.is_user_error(failure) or failure is None else CacheError(
        f"writing the cache failed on rank 0: {type(failure).__name__}: {failure}"), device)
    box = [result]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def build(cfg: Config) -> None:
    """The ranks' side of ``mode=cache-teacher`` (every rank, under any launcher or kd-train's self-launch)."""
    from .. import engines, launch, parallel
    from ..tokenizer import load_tokenizer

    _, device = launch.join(cfg)                # the checks kd-train's self-launch ran, under other launchers too
    rank, world = dist.get_rank(), dist.get_world_size()
    sp = parallel.SequenceParallel(cfg.parallel.sequence)
    tokenizer = load_tokenizer(cfg.data.tokenizer or cfg.model.student)
    dataset = items(cfg, tokenizer)
    per_item = counted(dataset)
    offsets = np.concatenate([[0], np.cumsum(per_item)]).astype(np.int64)
    out, S, n = cfg.cache_out, shard_items(cfg, per_item), len(dataset)
    vocab = distill_vocab(cfg, tokenizer)
    k, T = min(cfg.cache.k, vocab), cfg.loss.temperature
    layout = {"items": n, "rows": int(offsets[-1]), "shard_items": S, "shards": math.ceil(n / S),
              "id_bits": id_bits(vocab), "items_sha256": items_digest(dataset)}
    log = (lambda msg: print(f"[kd-train cache] {msg}", flush=True)) if rank == 0 else (lambda msg: None)

    def missing():                              # rank 0 decides: nodes may see a shared filesystem late
        if prepare(out, fingerprint(cfg, tokenizer, vocab), layout, offsets):
            return None
        return [s for s in range(layout["shards"]) if not (out / _shard_name(s)).exists()]
    todo = _on_rank0(missing, device)
    if todo is None:
        log(f"{out} is complete already ({layout['shards']} shards, {layout['rows']} rows): nothing to do")
        return
    left = int(sum(offsets[min((s + 1) * S, n)] - offsets[s * S] for s in todo))
    per = row_bytes(k, vocab, cfg.cache.dtype)
    log(f"{world} ranks, {sp.dp_world} replicas: {len(todo)} of {layout['shards']} shards to write, {left} tokens "
        f"x {per} bytes = {left * per / 1e9:.3f} GB, k={k}, T={T:g}, values {cfg.cache.dtype} -> {out}")
    teacher = engines.frozen_teacher(cfg, world, tokenizer.vocab_size, sp) if todo else None

    mine, rounds = _assign(todo, S, n, cfg.train.micro_batch, sp.dp_rank, sp.dp_world)
    collate = data.Collator(tokenizer.pad_id, sp.pad_to_multiple_of)
    writer, blocks = sp.rank == 0, []
    from tqdm import tqdm
    bar = tqdm(total=left, unit="tok", unit_scale=True, disable=rank != 0, desc="teacher top-k", mininterval=5)
    t0 = time.perf_counter()
    for r in range(rounds):
        real = r < len(mine)                    # else: a repeat whose rows are dropped
        s, members = mine[r] if real else mine[-1] if mine else (None, [0])
        batch = sp.shard(data.to_device(collate([dataset[i] for i in members]), device), packed=cfg.data.pack)
        with torch.no_grad():
            hidden = teacher.forward_hidden(batch)
            B, L = batch["targets"].shape
            mask = batch["targets"] != data.IGNORE_INDEX
            pos = (torch.arange(B, device=device).unsqueeze(-1) * L * sp.size + sp.rank * L
                   + torch.arange(L, device=device)).masked_select(mask)        # place in the whole batch
            with teacher.gathered_head() as w:
                rows = top_rows(hidden[mask], w, teacher.softcap, vocab, k, T, cfg.loss.chunk_size)
        # the replica's sequence slices, gathered and put back in sequence order
        pos, *rows = (_gather(x, sp.group, sp.size) for x in (pos, *rows))
        done = torch.tensor([float(pos.numel()) if real and writer else 0.0], device=device)
        dist.all_reduce(done)
        bar.update(int(done))
        if not (real and writer):
            continue
        order = pos.argsort()
        blocks.append([x.cpu() for x in stored(*(x[order] for x in rows), vocab, cfg.cache.dtype)])
        end = min((s + 1) * S, n)
        if members[-1] == end - 1:              # the shard's last batch
            write_shard(out / _shard_name(s), blocks, int(offsets[end] - offsets[s * S]))
            blocks = []
    bar.close()
    dist.barrier()
    m = _on_rank0(lambda: finish(out), device)
    secs = time.perf_counter() - t0
    log(f"done: {left} tokens in {secs:.1f} s ({left / max(secs, 1e-9):.0f} tokens/s), "
        f"{m['bytes_per_token']:.1f} bytes per token on disk, {m['bytes'] / 1e9:.3f} GB in {out}")
