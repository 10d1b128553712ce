"""A teacher known only by its top-k: the loss rule of a cached teacher (docs/methods.md, "A cached
teacher: top-k plus a tail bucket").

A cache row holds, per counted token, the teacher's top-k ids ``K`` (in decreasing order), their
logits ``a_K`` (after any softcap, less the row's top logit: a shift no loss sees) and the log of the
tail's mass ``log_tail = logsumexp_{i not in K}((a_i - max a) / T_c)`` at the cache's temperature, in
fp32. The log-partition is then ``logaddexp(logsumexp(a_K / T_c), log_tail)`` and every probability
of K and of the tail is exact (up to the rounding of the stored logits), with no ``1 - sum p_K``
cancellation. Both distributions are collapsed onto k + 1 categories, ``K`` and one tail bucket
holding the rest of the mass, and returned as log-probabilities ``[N, k + 1]``: every divergence of
``kd.losses`` takes them as logits at temperature 1 and gives the divergence between the collapsed
distributions (the full one when k = V, where both tails are empty). GRKD's group relative term
needs only the teacher's order and probabilities on its top-k group: ``group_inputs`` gives the
student's and teacher's logits on ``K``, exact whenever the cache's k is at least GRKD's k.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from . import losses

Tensor = torch.Tensor

# log-probability given to an empty tail (k = V): exp() of it is 0 in every float type, and unlike
# -inf it keeps 0 * (log x - log y) at 0 in the divergences
EMPTY_TAIL = -1e4


def _empty_to_floor(log_tail: Tensor) -> Tensor:
    return torch.where(torch.isfinite(log_tail), log_tail, EMPTY_TAIL)


def log_tail(x: Tensor, ids: Tensor) -> Tensor:
    """``log sum_{i not in ids} exp(x_i)`` per row of ``x [N, V]`` (-inf when ids cover the vocabulary);
    differentiable, its gradient reaching the entries outside ``ids`` only."""
    if ids.shape[-1] >= x.shape[-1]:
        return torch.full(x.shape[:-1], float("-inf"), dtype=x.dtype, device=x.device)
    return torch.logsumexp(x.scatter(-1, ids, float("-inf")), dim=-1)


def student_log_probs(student_logits: Tensor, ids: Tensor, temperature: float = 1.0) -> Tensor:
    """The student's distribution at ``temperature`` collapsed onto the cached ids and a tail:
    ``[N, k + 1]`` log-probabilities, differentiable in ``student_logits`` ``[N, V]``."""
    z = student_logits.to(torch.promote_types(student_logits.dtype, torch.float32)) / temperature
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    tail = _empty_to_floor(log_tail(z, ids).unsqueeze(-1) - lse)
    return torch.cat([z.gather(-1, ids) - lse, tail], dim=-1)


def teacher_log_probs(values: Tensor, log_tail: Tensor, temperature: float = 1.0) -> Tensor:
    """The teacher's distribution from a cache row (``values`` [N, k], ``log_tail`` [N] at
    ``temperature``) collapsed the same way: ``[N, k + 1]`` log-probabilities."""
    dt = torch.promote_types(values.dtype, torch.float32)
    x, tail = values.to(dt) / temperature, log_tail.to(dt).unsqueeze(-1)
    lse = torch.logaddexp(torch.logsumexp(x, dim=-1, keepdim=True), tail)
    return torch.cat([x - lse, _empty_to_floor(tail - lse)], dim=-1)


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


@dataclass(frozen=True)
class TopK:
    """The cached teacher rows of N counted tokens, in the order of the rows they stand for."""
    ids: Tensor          # [N, k] int64, the teacher's top-k in decreasing order
    values: Tensor       # [N, k] their logits less the row's top logit
    log_tail: Tensor     # [N] log of the tail's mass of exp((a - max a) / temperature); -inf: empty
    temperature: float

    @property
    def k(self) -> int:
        return self.ids.shape[-1]

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, rows: slice) -> "TopK":
        return TopK(self.ids[rows], self.values[rows], self.log_tail[rows], self.temperature)


def check_objective(obj, cached_k: int, temperature: float, metrics_k: int | None = None) -> None:
    """Raise unless every term of ``obj`` (a ``kd.objective.Objective``) can be computed from a cache of
    ``cached_k`` ids written at ``temperature``; the message says what to change."""
    if abs(obj.temperature - temperature) > 1e-9 * temperature:
        raise ValueError(f"loss.temperature={obj.temperature:g} but the cached teacher was written at temperature "
                         f"{temperature:g}: its log-partition holds for that temperature only. Train at "
                         f"loss.temperature={temperature:g}, or write a cache at the new temperature.")
    if obj.standardize:
        raise ValueError("standardize=true needs the mean and spread of the teacher's logits over the whole "
                         "vocabulary, which a top-k cache does not hold; use the live teacher, or standardize=false.")
    for t in obj.terms:
        if t.fn is losses.group_relative:
            defaults = inspect.signature(losses.group_relative).parameters
            check_group(cached_k, t.params.get("k", defaults["k"].default),
                        t.params.get("k_student", defaults["k_student"].default))
        elif t.fn.__name__ not in losses.DIVERGENCES:
            raise ValueError(f"the {t.name!r} term ranks the union of the teacher's and the student's own top "
                             "tokens, and the student's may lie outside the cached ids, where the cache has no "
                             "teacher logits; use the live teacher for this method (rlkd), or grkd / a divergence "
                             "with the cache.")
    if metrics_k and metrics_k > cached_k:
        raise ValueError(f"loss.metrics_k={metrics_k} is more than the cache's k={cached_k}: the teacher's top-"
                         f"{metrics_k} is not cached. Use loss.metrics_k <= {cached_k}.")


def term_inputs(fn, student_logits: Tensor, cached: TopK) -> tuple[Tensor, Tensor, float | None]:
    """``(student, teacher, temperature)`` arguments that make ``fn`` (a term of ``kd.losses``, checked by
    ``check_objective``) compute from the cache; temperature None: the objective's own."""
    if fn is losses.group_relative:
        z_k, a_k = group_inputs(student_logits, cached.ids, cached.values)
        return z_k, a_k, None
    T = cached.temperature
    return (student_log_probs(student_logits, cached.ids, T),
            teacher_log_probs(cached.values, cached.log_tail, T), 1.0)
