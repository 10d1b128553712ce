"""Per-token distillation losses and their registry.

Every function takes ``(student_logits [N, V], teacher_logits [N, V], temperature=1.0, **params)``
and returns per-token losses ``[N]`` with no T^2 factor and no reduction (see
``docs/methods.md``). Math runs in float32 at least (float64 stays float64, so gradcheck
works). Masking, T^2, term weights and the reduction belong to :mod:`kd.objective`, so every
method reduces the same way.

Adding a loss: write one function here, add one line to ``REGISTRY``, add one test.
``misfeedback`` (class KD) is an extra term beside a method, so it stays out of ``REGISTRY``.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _log_probs(logits: Tensor, temperature: float) -> Tensor:
    return F.log_softmax(logits.to(_compute_dtype(logits)) / temperature, dim=-1)


def _kl(log_x: Tensor, log_y: Tensor) -> Tensor:
    """KL(x || y) per row from log-probabilities; 0 * (finite) terms stay 0 for underflowed x."""
    return (log_x.exp() * (log_x - log_y)).sum(-1)


def _log_mix(log_x: Tensor, log_y: Tensor, w: float) -> Tensor:
    """log(w x + (1 - w) y) computed in log space, so underflowing probabilities stay exact."""
    if w <= 0.0:
        return log_y
    if w >= 1.0:
        return log_x
    return torch.logaddexp(log_x + math.log(w), log_y + math.log1p(-w))


def standardize(logits: Tensor, eps: float = 1e-7) -> Tensor:
    """Logit standardization Z(x) = (x - mean) / (std + eps) over the vocabulary."""
    x = logits.to(_compute_dtype(logits))
    return (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + eps)


# --- the divergence family ------------------------------------------------------------------


def forward_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(p || q): Hinton's soft-target loss (mode covering)."""
    return _kl(_log_probs(teacher_logits, temperature), _log_probs(student_logits, temperature))


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(q || p): mode seeking."""
    return _kl(_log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature))


def jsd(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0, beta: float = 0.5) -> Tensor:
    """Generalized JSD (GKD): beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q."""
    if not 0.0 < beta < 1.0:
        raise ValueError(
            f"jsd: beta={beta} must lie strictly between 0 and 1; for beta=0 or 1 the divergence "
            "degenerates to 0 -- use method 'forward_kl' or 'reverse_kl' instead")
    log_p = _log_probs(teacher_logits, temperature)
    log_q = _log_probs(student_logits, temperature)
    log_m = _log_mix(log_p, log_q, beta)
    return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)


def _check_alpha(name: str, alpha: float) -> None:
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"{name}: alpha={alpha} must lie in [0, 1) (DistiLLM uses 0.1)")


def skew_forward_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0,
                    alpha: float = 0.1) -> Tensor:
    """DistiLLM SKL: KL(p || alpha p + (1 - alpha) q)."""
    _check_alpha("skew_forward_kl", alpha)
    log_p = _log_probs(teacher_logits, temperature)
    log_q = _log_probs(student_logits, temperature)
    return _kl(log_p, _log_mix(log_p, log_q, alpha))


def skew_reverse_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0,
                    alpha: float = 0.1) -> Tensor:
    """DistiLLM SRKL: KL(q || (1 - alpha) p + alpha q)."""
    _check_alpha("skew_reverse_kl", alpha)
    log_p = _log_probs(teacher_logits, temperature)
    log_q = _log_probs(student_logits, temperature)
    return _kl(log_q, _log_mix(log_q, log_p, alpha))


def tvd(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Total variation distance 0.5 sum |p - q|."""
    p = _log_probs(teacher_logits, temperature).exp()
    q = _log_probs(student_logits, temperature).exp()
    return 0.5 * (p - q).abs().sum(-1)


# --- class KD's misfeedback (not a method: an extra term on student-generated batches) ----------


def _check_kappa(kappa: float) -> None:
    if not kappa > 0:
        raise ValueError(f"misfeedback: kappa={kappa} must be positive (nats; the default is 1.0)")


def _misfeedback_and_kl(student_logits: Tensor, classmate_logits: Tensor, temperature: float,
                        kappa: float) -> tuple[Tensor, Tensor]:
    """``(L_mis, KL(q || c))`` per token; the stats need the uncapped KL, so compute it once."""
    _check_kappa(kappa)
    # the classmate is a fixed target here: the student moves away from it, never the reverse
    kl = reverse_kl(student_logits, classmate_logits.detach(), temperature)
    # clamp: constant (zero gradient) above kappa, otherwise the objective is unbounded
    return -kl.clamp_max(kappa), kl


def misfeedback(student_logits: Tensor, classmate_logits: Tensor, temperature: float = 1.0,
                kappa: float = 1.0) -> Tensor:
    """Class KD's misfeedback ``L_mis = -min(KL(q || c), kappa)``, q and c at ``temperature``.

    Per token ``[N]``, no T^2 factor; the classmate's logits get no gradient. Minimising it pushes
    the student away from the classmate until their KL reaches ``kappa`` nats.
    """
    return _misfeedback_and_kl(student_logits, classmate_logits, temperature, kappa)[0]


# --- ranking losses ---------------------------------------------------------------------------


def _union_topk(student_logits: Tensor, teacher_logits: Tensor, k: int, k_student: int):
    """Indices of topk(teacher, k) united with topk(student, k_student), deduplicated per token.

    Returns ``idx [N, K]`` and ``valid [N, K]`` (False marks a student index already in the
    teacher's group), so groups of different sizes share one dense tensor.
    """
    V = teacher_logits.shape[-1]
    if k < 1:
        raise ValueError(f"k={k} must be at least 1")
    idx = teacher_logits.topk(min(k, V), dim=-1).indices
    valid = torch.ones_like(idx, dtype=torch.bool)
    if k_student > 0:
        s_idx = student_logits.detach().topk(min(k_student, V), dim=-1).indices
        dup = (s_idx.unsqueeze(-1) == idx.unsqueeze(-2)).any(-1)
        idx = torch.cat([idx, s_idx], dim=-1)
        valid = torch.cat([valid, ~dup], dim=-1)
    return idx, valid


def group_relative(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0,
                   k: int = 32, tau: float = 1.0, k_student: int = 0,
                   pair_weight: str = "uniform") -> Tensor:
    """GRKD's group relative term: RankNet over the teacher's preference pairs in its top-k group.

    ``sum_{a_i > a_j} w_ij softplus(-(z_i - z_j) / tau) / sum w_ij`` over the group
    ``topk(a, k) [union topk(z, k_student)]``. O(V + K^2) per token; no V x V pairs. ``temperature``
    only enters the ``prob_gap`` weights ``p_i - p_j`` (detached). Tokens without any pair give 0.
    """
    if pair_weight not in ("uniform", "prob_gap"):
        raise ValueError(f"group_relative: pair_weight={pair_weight!r} is not one of 'uniform', 'prob_gap'")
    if tau <= 0:
        raise ValueError(f"group_relative: tau={tau} must be positive")
    dt = _compute_dtype(student_logits)
    a = teacher_logits.detach().to(dt)
    idx, valid = _union_topk(student_logits, a, k, k_student)
    a_g = a.gather(-1, idx)                                     # [N, K]
    z_g = student_logits.to(dt).gather(-1, idx)                 # [N, K]
    pair = (a_g.unsqueeze(-1) > a_g.unsqueeze(-2)) & valid.unsqueeze(-1) & valid.unsqueeze(-2)
    if pair_weight == "uniform":
        w = pair.to(dt)
    else:
        # p_g = softmax over the full vocabulary, gathered: log-sum-exp once per row.
        p_g = (a_g / temperature - torch.logsumexp(a / temperature, -1, keepdim=True)).exp()
        w = (p_g.unsqueeze(-1) - p_g.unsqueeze(-2)).clamp_min(0) * pair
    pair_loss = F.softplus(-(z_g.unsqueeze(-1) - z_g.unsqueeze(-2)) / tau)
    return (w * pair_loss).sum((-1, -2)) / w.sum((-1, -2)).clamp_min(torch.finfo(dt).tiny)


def soft_rank(x: Tensor, valid: Tensor, rank_temperature: float) -> Tensor:
    """Differentiable descending rank among the valid entries of each row (sigmoid pairwise).

    rank_i = 1 + sum_{j valid, j != i} sigmoid((x_j - x_i) / t); hard ranks as t -> 0.
    """
    cmp = torch.sigmoid((x.unsqueeze(-2) - x.unsqueeze(-1)) / rank_temperature)   # [.., i, j]
    mask = valid.unsqueeze(-2) & ~torch.eye(x.shape[-1], dtype=torch.bool, device=x.device)
    return 1.0 + (cmp * mask).sum(-1)


def _torchsort_rank(x: Tensor, valid: Tensor, rank_temperature: float) -> Tensor:
    try:
        import torchsort
    except ImportError as e:
        raise ImportError("rank_correlation: rank='torchsort' needs the torchsort package "
                          "(pip install torchsort), or use rank='sigmoid'") from e
    # Invalid entries are pushed to the bottom so they do not shift the valid ranks.
    x = torch.where(valid, x, x.detach().min(-1, keepdim=True).values - 1e4)
    return torchsort.soft_rank(-x.float(), regularization_strength=rank_temperature).to(x.dtype)


def rank_correlation(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0,
                     k: int = 5, rank_temperature: float = 1.0, rank: str = "sigmoid") -> Tensor:
    """RLKD's ranking term: 1 - rho, rho = Pearson correlation of teacher and student soft ranks.

    Ranks are taken over ``topk(a, k) union topk(z, k)`` deduplicated per token (a differentiable
    Spearman). ``temperature`` scales both logit vectors before ranking.
    """
    if rank not in ("sigmoid", "torchsort"):
        raise ValueError(f"rank_correlation: rank={rank!r} is not one of 'sigmoid', 'torchsort'")
    dt = _compute_dtype(student_logits)
    a = teacher_logits.detach().to(dt) / temperature
    z = student_logits.to(dt) / temperature
    idx, valid = _union_topk(z, a, k, k)
    ranker = soft_rank if rank == "sigmoid" else _torchsort_rank
    r_t = ranker(a.gather(-1, idx), valid, rank_temperature)
    r_s = ranker(z.gather(-1, idx), valid, rank_temperature)
    vf = valid.to(dt)
    n = vf.sum(-1, keepdim=True)
    d_t = (r_t - (r_t * vf).sum(-1, keepdim=True) / n) * vf
    d_s = (r_s - (r_s * vf).sum(-1, keepdim=True) / n) * vf
    eps = torch.finfo(dt).eps
    rho = (d_t * d_s).sum(-1) / ((d_t.square().sum(-1) * d_s.square().sum(-1)).sqrt() + eps)
    return 1.0 - rho


# --- registry ---------------------------------------------------------------------------------

LossFn = Callable[..., Tensor]

REGISTRY: dict[str, LossFn] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "tvd": tvd,
    "group_relative": group_relative,
    "rank_correlation": rank_correlation,
}

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")


def get(name: str) -> LossFn:
    """The per-token loss registered under ``name``; an unknown name lists the known ones."""
    if name not in REGISTRY:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]
