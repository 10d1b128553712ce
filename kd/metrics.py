"""Teacher-student alignment on counted tokens: OR@k, CR@k and top-1 agreement.

``OR@k = |topk(a) ∩ topk(z)| / k``; ``CR@k = 1[the ordered top-k lists agree]``; top-1 agreement
``1[argmax a = argmax z]``. ``alignment_sums`` returns sums and a count so that chunks and ranks
can add them up before dividing (see :func:`kd.reduce.all_reduce_dict`).
"""
from __future__ import annotations

import torch

from .reduce import IGNORE_INDEX
from .topk import TopK

Tensor = torch.Tensor


def alignment_sums(student_logits: Tensor, teacher_logits: Tensor | TopK, mask: Tensor | None = None,
                   k: int = 5) -> dict[str, Tensor]:
    """``teacher_logits`` may be a cached teacher (``kd.topk.TopK``, no mask) of at least k ids."""
    z = student_logits.detach()
    k = min(k, z.shape[-1])
    if isinstance(teacher_logits, TopK):
        if mask is not None:
            raise ValueError("alignment_sums: a cached teacher's rows are counted tokens already; pass no mask")
        ti = teacher_logits.ids[:, :k]
    else:
        a = teacher_logits.detach()
        if mask is not None:
            z, a = z[mask], a[mask]
        ti = a.topk(k, dim=-1).indices
    si = z.topk(k, dim=-1).indices
    overlap = (ti.unsqueeze(-1) == si.unsqueeze(-2)).any(-1).sum(-1).double() / k
    consistent = (ti == si).all(-1).double()
    top1 = (ti[:, 0] == si[:, 0]).double()
    return {f"overlap@{k}": overlap.sum(), f"consistency@{k}": consistent.sum(),
            "top1_agreement": top1.sum(), "tokens": torch.tensor(float(z.shape[0]), dtype=torch.float64)}


def means(sums: dict[str, Tensor]) -> dict[str, float]:
    """Divide every summed metric by the ``tokens`` count."""
    n = max(float(sums["tokens"]), 1.0)
    return {key: float(v) / n for key, v in sums.items() if key != "tokens"}


def alignment(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None,
              k: int = 5) -> dict[str, float]:
    """Mean OR@k, CR@k and top-1 agreement over positions whose label is not -100."""
    V = student_logits.shape[-1]
    z, a = student_logits.reshape(-1, V), teacher_logits.reshape(-1, V)
    mask = None if labels is None else labels.reshape(-1) != IGNORE_INDEX
    return means(alignment_sums(z, a, mask, k))
