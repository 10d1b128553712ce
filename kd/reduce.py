"""The loss over a batch sharded across ranks (data parallel, sequence parallel, or both).

Each rank holds some of the counted tokens. The loss is ``sum of per-token losses / number of
counted tokens`` over the whole global batch: every rank computes its local sum and count, both
are all-reduced, and the value equals the one-process loss on the whole batch. Gradients: the
backward of the sum's all-reduce passes the local gradient through, scaled by the group size when
the engine averages gradients over the group (DeepSpeed does), so that after the engine's
all-reduce every rank holds the one-process gradient.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

Tensor = torch.Tensor
IGNORE_INDEX = -100


def masked_sum_count(per_token: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Sum of ``per_token`` where ``mask`` holds (NaNs in masked-out rows do not leak), and the count."""
    zero = torch.zeros((), dtype=per_token.dtype, device=per_token.device)
    return torch.where(mask, per_token, zero).sum(), mask.sum()


def world_size(group=None) -> int:
    """Ranks in ``group``; ``None`` means no reduction at all (not torch's default group)."""
    if group is None or not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group, grad_scale: float) -> Tensor:
        ctx.grad_scale = grad_scale
        y = x.detach().clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.grad_scale, None, None


def all_reduce_sum(x: Tensor, group=None, grads_averaged: bool = True) -> Tensor:
    """Differentiable sum over ``group``; see the module doc for the gradient convention."""
    n = world_size(group)
    if n == 1:
        return x
    return _AllReduceSum.apply(x, group, float(n) if grads_averaged else 1.0)


def global_mean(local_sum: Tensor, local_count: Tensor, group=None,
                grads_averaged: bool = True) -> Tensor:
    """``sum over ranks of local_sum / sum over ranks of local_count`` (0 when nothing is counted).

    ``grads_averaged``: the caller's engine averages gradients over ``group`` (DeepSpeed's data
    parallel all-reduce does); with False the gradients are meant to be summed across ranks.
    """
    count = local_count.detach().to(local_sum.dtype).clone()
    if world_size(group) > 1:
        dist.all_reduce(count, op=dist.ReduceOp.SUM, group=group)
    return all_reduce_sum(local_sum, group, grads_averaged) / count.clamp_min(1)


def all_reduce_values(values: list[float], group=None, op: str = "sum", device="cpu") -> list[float]:
    """Python numbers summed (``op="sum"``) or maxed (``"max"``) over ``group`` in one collective,
    in float64; ``device`` is where the backend wants tensors (the engine's device)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=group)
    return t.tolist()


def all_reduce_dict(sums: dict[str, Tensor], group=None) -> dict[str, Tensor]:
    """All-reduce a dict of detached scalars in one collective (for logging statistics)."""
    if world_size(group) == 1 or not sums:
        return dict(sums)
    keys = sorted(sums)
    flat = torch.stack([sums[k].detach().to(torch.float64).reshape(()) for k in keys])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    return dict(zip(keys, flat.unbind()))
