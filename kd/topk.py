"""A teacher known only by its top-k: the loss rule of a cached teacher (docs/methods.md, "A cached
teacher: top-k plus a tail bucket").

A cache row holds, per counted token, the teacher's top-k ids ``K`` (in decreasing order), their
logits ``a_K`` (after any softcap, divided by the cache's temperature) and the log-partition
``log Z = logsumexp(a)`` over the whole vocabulary. Both distributions are collapsed onto k + 1
categories, ``K`` and one tail bucket holding the rest of the mass, and returned as log-probabilities
``[N, k + 1]``: every divergence of ``kd.losses`` takes them as logits at temperature 1 and gives the
divergence between the collapsed distributions (the full one when k = V). GRKD's group relative term
needs only the teacher's order and probabilities on its top-k group: ``group_inputs`` gives the
student's and teacher's logits on ``K``, exact whenever the cache's k is at least GRKD's k.
"""
from __future__ import annotations

import torch

Tensor = torch.Tensor

# log-probability given to an empty tail (k = V, or a mass that underflows): exp() of it is 0 in
# every float type, and unlike -inf it keeps 0 * (log x - log y) at 0 in the divergences
EMPTY_TAIL = -1e4


def _with_tail(log_p_k: Tensor) -> Tensor:
    """[N, k] log-probabilities of K -> [N, k + 1] with log(1 - sum p_K) appended."""
    inside = torch.logsumexp(log_p_k, dim=-1, keepdim=True).clamp_max(0.0)
    mass = -torch.expm1(inside)                 # 1 - sum p_K, exact for small tails
    # an empty tail becomes EMPTY_TAIL; log is taken only where the mass is positive, so that no
    # infinite derivative of log(0) meets a zero one (their product would be NaN)
    has = mass > 0
    tail = torch.where(has, torch.log(torch.where(has, mass, torch.ones_like(mass))), EMPTY_TAIL)
    return torch.cat([log_p_k, tail.clamp_min(EMPTY_TAIL)], dim=-1)


def student_log_probs(student_logits: Tensor, ids: Tensor, temperature: float = 1.0) -> Tensor:
    """The student's distribution at ``temperature`` collapsed onto the cached ids and a tail:
    ``[N, k + 1]`` log-probabilities, differentiable in ``student_logits`` ``[N, V]``."""
    z = student_logits.to(torch.promote_types(student_logits.dtype, torch.float32)) / temperature
    log_q = z.gather(-1, ids) - torch.logsumexp(z, dim=-1, keepdim=True)
    return _with_tail(log_q)


def teacher_log_probs(values: Tensor, log_z: Tensor) -> Tensor:
    """The teacher's distribution from a cache row (``values`` [N, k], ``log_z`` [N]) collapsed the
    same way: ``[N, k + 1]`` log-probabilities."""
    dt = torch.promote_types(values.dtype, torch.float32)
    return _with_tail(values.to(dt) - log_z.to(dt).unsqueeze(-1))


def check_group(cached_k: int, k: int, k_student: int = 0) -> None:
    """GRKD's group from a cache: the teacher's top-k must be cached, and a union with the student's
    own top-k (RLKD's ``k_student``) would need teacher logits outside it."""
    if k > cached_k:
        raise ValueError(f"group_relative: k={k} is more than the cache's k={cached_k}; the teacher's top-{k} "
                         f"group is not in the cache. Use loss.params.k <= {cached_k}, or write the cache with a "
                         f"larger k.")
    if k_student:
        raise ValueError(f"group_relative: k_student={k_student} adds the student's own top tokens to the group, "
                         "and the cache has no teacher logits for them. Use k_student=0 with a cached teacher, "
                         "or the live teacher.")


def group_inputs(student_logits: Tensor, ids: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """(student logits on K, teacher logits on K), both ``[N, k]``: ``kd.losses.group_relative`` on
    them equals the full computation when its k is at most the cache's (the teacher's top-k is K in
    order; the ``prob_gap`` weights are the full ones up to one factor per row, which the term's
    weighted mean cancels)."""
    return student_logits.gather(-1, ids), values
