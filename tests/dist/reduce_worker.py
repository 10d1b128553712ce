"""Worker for test_reduce: each rank holds part of the tokens; loss and gradients must equal
the one-process values on the whole batch. Writes its findings as JSON (rank 0)."""
import argparse
import json

import torch
import torch.distributed as dist

import kd
from train.parallel import init_distributed
from kd.reduce import global_mean, masked_sum_count

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--local_rank", type=int, default=0)   # the deepspeed launcher adds it
out_path = parser.parse_args().out
init_distributed()
rank, world = dist.get_rank(), dist.get_world_size()

g = torch.Generator().manual_seed(0)
B, T, H, V = 3, 10, 8, 29
hs = torch.randn(B, T, H, generator=g, dtype=torch.float64)
ws = torch.randn(V, H, generator=g, dtype=torch.float64) / 2
ht = torch.randn(B, T, H, generator=g, dtype=torch.float64)
wt = torch.randn(V, H, generator=g, dtype=torch.float64) / 2
labels = torch.randint(0, V, (B, T), generator=g)
labels[0, :6] = -100            # uneven counts per rank under both splits
labels[2, 7:] = -100
cfg = dict(method="grkd", progress=0.3, k=5, ce_weight=0.1, metrics_k=3)


def one_process():
    h, w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    loss, stats = kd.fused_distill_loss(h.reshape(-1, H), w, ht.reshape(-1, H), wt, labels.reshape(-1),
                                        chunk_size=4, **cfg)
    loss.backward()
    return loss.item(), h.grad, w.grad, stats


def sharded(split, grads_averaged):
    """split 'dp': rank r holds whole sequences; 'sp': rank r holds a slice of every sequence."""
    sl = (slice(rank, None, world), slice(None)) if split == "dp" else \
         (slice(None), slice(rank * T // world, (rank + 1) * T // world))
    h, w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    loss, stats = kd.fused_distill_loss(h[sl].reshape(-1, H), w, ht[sl].reshape(-1, H), wt,
                                        labels[sl].reshape(-1), chunk_size=4, group=dist.group.WORLD,
                                        grads_averaged=grads_averaged, **cfg)
    loss.backward()
    op = dist.ReduceOp.AVG if grads_averaged else dist.ReduceOp.SUM
    gh, gw = h.grad.clone(), w.grad.clone()
    if not hasattr(dist.ReduceOp, "AVG") or grads_averaged:   # gloo has no AVG: sum then divide
        dist.all_reduce(gh), dist.all_reduce(gw)
        if grads_averaged:
            gh, gw = gh / world, gw / world
    else:
        dist.all_reduce(gh, op=op), dist.all_reduce(gw, op=op)
    return loss.item(), gh, gw, stats


def materialised_sharded():
    """The same reduction through kd.reduce on a materialised loss (what a custom caller does)."""
    sl = (slice(rank, None, world), slice(None))
    z = (hs[sl] @ ws.T).requires_grad_()
    obj = kd.build_objective("forward_kl")
    per = obj.token_losses(z.reshape(-1, V), (ht[sl] @ wt.T).reshape(-1, V), labels[sl].reshape(-1))["loss"]
    s, c = masked_sum_count(per, labels[sl].reshape(-1) != -100)
    return global_mean(s, c, dist.group.WORLD).item()


ref_loss, ref_gh, ref_gw, ref_stats = one_process()
result = {"world": world, "ref_loss": ref_loss}
for split in ("dp", "sp"):
    for averaged in (True, False):
        loss, gh, gw, stats = sharded(split, averaged)
        result[f"{split}_{averaged}"] = {
            "loss": loss,
            "grad_h_maxdiff": (gh - ref_gh).abs().max().item(),
            "grad_w_maxdiff": (gw - ref_gw).abs().max().item(),
            "stats_maxdiff": max(abs(stats[k] - ref_stats[k]) for k in ref_stats),
        }
# a rank without a single counted token still joins every reduction (stats included)
h, w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
lab_empty = labels.clone()
if rank == 1:
    lab_empty[:] = -100
loss, stats = kd.fused_distill_loss(h.reshape(-1, H), w, ht.reshape(-1, H), wt, lab_empty.reshape(-1), chunk_size=4,
                                    group=dist.group.WORLD, **cfg)
ref, ref_st = kd.fused_distill_loss(hs.reshape(-1, H), ws, ht.reshape(-1, H), wt, labels.reshape(-1), chunk_size=4, **cfg)
result["one_rank_empty"] = {"loss": loss.item(), "ref": ref.item(), "tokens": stats["tokens"], "ref_tokens": ref_st["tokens"]}

z_full = (hs @ ws.T).reshape(-1, V)
result["materialised"] = materialised_sharded()
result["materialised_ref"] = kd.distill_loss(z_full, (ht @ wt.T).reshape(-1, V), labels.reshape(-1),
                                             method="forward_kl")[0].item()
if rank == 0:
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
# A clean shutdown: a rank leaving with live communicator threads can abort ("terminate called").
dist.barrier()
dist.destroy_process_group()
