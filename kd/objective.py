"""A distillation method as weighted per-token terms, and ``distill_loss`` on materialised logits.

``build_objective(method, progress, **cfg)`` validates the config and resolves it into a list of
``Term``s (a registered per-token loss, its params and a weight that already holds T^2 and the
method's mixing, e.g. GRKD's lambda(progress)). Both the materialised path (``distill_loss``) and
the fused chunked head (:mod:`kd.head`) evaluate the same ``Objective``, so they cannot drift.
"""
from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import losses, schedule, topk
from .reduce import IGNORE_INDEX

Tensor = torch.Tensor

# Method-level keys, beside the params of the per-token functions a method uses.
_COMMON = {"temperature": 1.0, "ce_weight": 0.0, "standardize": False}
_GRKD = {"lambda_start": 0.0, "lambda_end": 0.5, "transition": 0.5, "transition_shape": "linear"}
_RLKD = {"divergence": "forward_kl"}

METHODS = ("grkd", "rlkd", "sft") + tuple(sorted(losses.REGISTRY))


@dataclass(frozen=True)
class Term:
    name: str           # key in the stats
    fn: losses.LossFn
    weight: float       # applied per token; already includes T^2 where the term is a divergence
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Objective:
    method: str
    temperature: float
    terms: tuple[Term, ...]
    ce_weight: float
    standardize: bool
    extras: dict = field(default_factory=dict)   # logged scalars such as GRKD's lambda

    @property
    def needs_teacher(self) -> bool:
        return bool(self.terms)

    def token_losses(self, student_logits: Tensor, teacher_logits: Tensor | None,
                     labels: Tensor, classmate_logits: Tensor | None = None,
                     misfeedback_weight: float = 0.1, kappa: float = 1.0) -> dict[str, Tensor]:
        """Per-token losses ``[N]`` of every term and their weighted total under key ``loss``.

        With ``classmate_logits`` (class KD, student-generated batches) the total gains
        ``misfeedback_weight * losses.misfeedback(z, c, T, kappa)``, logged as ``misfeedback``
        beside the uncapped ``classmate_kl``. That term always sees the raw logits: ``standardize``
        is for the teacher terms only (the misfeedback's kappa is in nats of the real q and c).
        Rows whose label is ``IGNORE_INDEX`` are computed too; the caller masks them. ``teacher_logits`` may
        be a ``kd.topk.TopK`` (a cached teacher, checked by ``topk.check_objective``): each term then
        computes from the top-k ids and the tail (docs/methods.md, "A cached teacher").
        """
        z, a = student_logits, teacher_logits
        cached = isinstance(a, topk.TopK)
        dt = torch.promote_types(z.dtype, torch.float32)
        out: dict[str, Tensor] = {}
        total = torch.zeros(z.shape[0], dtype=dt, device=z.device)
        if self.terms:
            zs, as_ = (losses.standardize(z), losses.standardize(a)) if self.standardize else (z, a)
            for t in self.terms:
                T = self.temperature
                if cached:
                    zs, as_, T = topk.term_inputs(t.fn, z, a)
                    T = self.temperature if T is None else T
                v = t.fn(zs, as_, T, **t.params)
                out[t.name] = v.detach()
                total = total + t.weight * v
        if self.ce_weight:
            ce = F.cross_entropy(z.to(dt), labels.clamp_min(0), reduction="none")
            out["ce"] = ce.detach()
            total = total + self.ce_weight * ce
        if classmate_logits is not None:
            mis, kl = losses._misfeedback_and_kl(z, classmate_logits, self.temperature, kappa)
            out["misfeedback"], out["classmate_kl"] = mis.detach(), kl.detach()
            total = total + misfeedback_weight * mis
        out["loss"] = total
        return out


def _params_of(fn) -> set[str]:
    return set(list(inspect.signature(fn).parameters)[3:])


def _reject_unknown(method: str, cfg: dict, allowed: set[str]) -> None:
    for key in cfg:
        if key not in allowed:
            near = difflib.get_close_matches(key, sorted(allowed), n=1)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            raise ValueError(f"unknown setting {key!r} for loss method {method!r}.{hint} "
                             f"Accepted: {', '.join(sorted(allowed))}")


def _pick(cfg: dict, fn) -> dict:
    return {k: cfg[k] for k in _params_of(fn) if k in cfg}


def build_objective(method: str = "grkd", progress: float = 0.0, **cfg) -> Objective:
    """Resolve ``method`` and its settings at training ``progress`` in [0, 1] into an Objective.

    Methods: ``grkd`` (soft target + group relative with the progressive transition), ``rlkd``
    (rank correlation + divergence / 2), ``sft`` (cross-entropy only, no teacher), or any
    registered per-token loss used alone (``forward_kl``, ``jsd``, ...). Every method accepts
    ``temperature``, ``ce_weight`` and ``standardize``; unknown keys are an error.
    """
    if method not in METHODS:
        raise ValueError(f"unknown loss method {method!r}; known methods: {', '.join(METHODS)}")
    common = {k: cfg.pop(k, v) for k, v in _COMMON.items()}
    T = float(common["temperature"])
    if T <= 0:
        raise ValueError(f"temperature={T} must be positive")
    extras: dict = {}
    if method == "grkd":
        _reject_unknown(method, cfg, set(_GRKD) | _params_of(losses.group_relative))
        s = {**_GRKD, **cfg}
        lam = schedule.transition(progress, s["lambda_start"], s["lambda_end"], s["transition"],
                                  s["transition_shape"])
        extras["lambda"] = lam
        terms = (Term("soft_target", losses.forward_kl, (1.0 - lam) * T * T),
                 Term("group_relative", losses.group_relative, lam, _pick(cfg, losses.group_relative)))
    elif method == "rlkd":
        div = cfg.get("divergence", _RLKD["divergence"])
        if div not in losses.DIVERGENCES:
            raise ValueError(f"rlkd: divergence={div!r} is not one of {', '.join(losses.DIVERGENCES)}")
        div_fn = losses.get(div)
        _reject_unknown(method, cfg, set(_RLKD) | _params_of(losses.rank_correlation) | _params_of(div_fn))
        terms = (Term("rank", losses.rank_correlation, 1.0, _pick(cfg, losses.rank_correlation)),
                 Term(div, div_fn, 0.5 * T * T, _pick(cfg, div_fn)))
    elif method == "sft":
        _reject_unknown(method, cfg, set())
        terms = ()
        common["ce_weight"] = common["ce_weight"] or 1.0
    else:
        fn = losses.get(method)
        _reject_unknown(method, cfg, _params_of(fn))
        # Divergences carry T^2 so gradients keep their scale across temperatures (Hinton).
        terms = (Term(method, fn, T * T if method in losses.DIVERGENCES else 1.0, dict(cfg)),)
    return Objective(method, T, terms, float(common["ce_weight"]), bool(common["standardize"]), extras)


def align_vocab(student: Tensor, teacher: Tensor | None, vocab_size: int | None,
                what: str = "logits") -> tuple[Tensor, Tensor | None]:
    """Cut both to the first ``vocab_size`` rows/columns along the last (logits) or first (weights)
    dimension; without ``vocab_size`` a size mismatch is an error saying how to fix it."""
    dim = -1 if what == "logits" else 0
    vs = student.shape[dim]
    vt = teacher.shape[dim] if teacher is not None else vs
    if vocab_size is None:
        if vs != vt:
            bigger = "student" if vs > vt else "teacher"
            raise ValueError(
                f"vocabulary mismatch: student {what} have {vs} entries, teacher {what} {vt} "
                f"(the {bigger} is larger). If the extra entries are padding rows of the same "
                f"tokenizer, pass vocab_size={min(vs, vt)}; if the tokenizers differ, token-level "
                "distillation is not meaningful (check with `kd-convert vocab-check`).")
        return student, teacher
    if not 0 < vocab_size <= min(vs, vt):
        raise ValueError(f"vocab_size={vocab_size} must be in 1..{min(vs, vt)} "
                         f"(student {vs}, teacher {vt})")
    cut = (lambda x: x[..., :vocab_size]) if dim == -1 else (lambda x: x[:vocab_size])
    return cut(student), (cut(teacher) if teacher is not None else None)


def distill_loss(student_logits: Tensor, teacher_logits: Tensor | None, labels: Tensor,
                 method: str = "grkd", progress: float = 0.0, vocab_size: int | None = None,
                 classmate_logits: Tensor | None = None, misfeedback_weight: float = 0.1,
                 kappa: float = 1.0, **cfg) -> tuple[Tensor, dict]:
    """The distillation loss on materialised logits: token-weighted mean over ``labels != -100``.

    ``student_logits``/``teacher_logits`` are ``[..., V]`` and ``labels`` the matching ``[...]``,
    already aligned (position i's logits predict ``labels[i]``). Returns ``(loss, stats)``: stats
    holds each term's mean over counted tokens, ``tokens`` and method scalars such as ``lambda``.
    ``classmate_logits`` (same shape as the student's, cut to ``vocab_size`` likewise) adds class
    KD's misfeedback term, see :meth:`Objective.token_losses`; it works with any method, ``sft``
    included.
    """
    from .reduce import masked_sum_count
    obj = build_objective(method, progress, **cfg)
    if obj.needs_teacher and teacher_logits is None:
        raise ValueError(f"loss method {method!r} needs teacher logits (only 'sft' runs without a teacher)")
    z, a = align_vocab(student_logits, teacher_logits if obj.needs_teacher else None, vocab_size)
    V = z.shape[-1]
    c = None
    if classmate_logits is not None:
        c = classmate_logits[..., :vocab_size] if vocab_size else classmate_logits
        if c.shape != z.shape:
            raise ValueError(f"classmate logits are {tuple(c.shape)}, the student's {tuple(z.shape)} "
                             "(after the vocab_size cut): the classmate shares the student's vocabulary")
        c = c.reshape(-1, V)
    z, labels = z.reshape(-1, V), labels.reshape(-1)
    a = a.reshape(-1, V) if a is not None else None
    if labels.shape[0] != z.shape[0]:
        raise ValueError(f"labels have {labels.shape[0]} positions but logits {z.shape[0]}")
    per = obj.token_losses(z, a, labels, c, misfeedback_weight, kappa)
    mask = labels != IGNORE_INDEX
    sums = {name: masked_sum_count(v, mask)[0] for name, v in per.items()}
    count = mask.sum()
    denom = count.clamp_min(1).to(sums["loss"].dtype)
    stats = {name: (s.detach() / denom).item() for name, s in sums.items()}
    stats.update(obj.extras, tokens=int(count))
    return sums["loss"] / denom, stats
