"""The fused, chunked lm-head + distillation loss: never a ``[tokens, vocab]`` tensor.

For each chunk of counted tokens: ``logits = hidden @ weight^T`` (softcap inside the chunk),
per-token losses from the method's ``Objective``, the chunk's sum, and -- right there, while the
chunk's logits are alive -- the chunk's gradient for the student's hidden states and lm-head
weight. The forward thus returns the loss with its gradients already computed; the backward only
scales them by the incoming gradient. Peak extra memory grows with ``chunk_size * V`` (a few
such tensors per chunk), not ``N * V``; the price is holding ``d hidden [N, H]`` and
``d weight [V, H]`` from forward to backward.

Rows whose label is -100 are dropped before any matmul, so prompt tokens cost nothing.
"""
from __future__ import annotations

import torch

from . import losses, metrics, topk
from .objective import align_vocab, build_objective
from .reduce import IGNORE_INDEX, all_reduce_dict, global_mean

Tensor = torch.Tensor


def softcap(x: Tensor, cap: float | None) -> Tensor:
    """Gemma-2's final-logit softcap ``tanh(x / c) * c`` (identity for ``None``)."""
    return x if not cap else torch.tanh(x / cap) * cap


class _WithGrads(torch.autograd.Function):
    """Attach a value whose gradients for ``hidden`` and ``weight`` were computed in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, value, grad_hidden, grad_weight):
        ctx.save_for_backward(grad_hidden, grad_weight)
        return value.detach().clone()

    @staticmethod
    def backward(ctx, g):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * g.to(grad_hidden.dtype) if ctx.needs_input_grad[0] else None
        gw = grad_weight * g.to(grad_weight.dtype) if ctx.needs_input_grad[1] else None
        return gh, gw, None, None, None


def fused_distill_loss(student_hidden: Tensor, student_weight: Tensor,
                       teacher_hidden: Tensor | None, teacher_weight: Tensor | None,
                       labels: Tensor, method: str = "grkd", chunk_size: int = 1024,
                       student_softcap: float | None = None, teacher_softcap: float | None = None,
                       progress: float = 0.0, vocab_size: int | None = None, group=None,
                       grads_averaged: bool = True, metrics_k: int | None = None,
                       classmate_hidden: Tensor | None = None, classmate_weight: Tensor | None = None,
                       classmate_softcap: float | None = None, misfeedback_weight: float = 0.1,
                       kappa: float = 1.0, teacher_topk: topk.TopK | None = None, **cfg) -> tuple[Tensor, dict]:
    """Same loss and student gradients as :func:`kd.distill_loss` on the materialised logits.

    ``student_hidden [N, Hs]`` and ``teacher_hidden [N, Ht]`` are final hidden states (after the
    final norm), ``*_weight [V, H]`` the lm-head weights, ``labels [N]`` aligned with the rows.
    With ``group`` the loss is the mean over the counted tokens of every rank in the group (see
    :mod:`kd.reduce`). ``metrics_k`` adds OR@k / CR@k / top-1 agreement to the stats, computed
    inside the chunks. ``classmate_hidden [N, Hc]`` and ``classmate_weight [V, Hc]`` (class KD;
    any hidden size, the student's vocabulary) add the misfeedback term of ``distill_loss``'s
    ``classmate_logits``; the classmate gets no gradient. ``teacher_topk`` replaces the teacher's
    hidden states and weight by a cached teacher (:mod:`kd.topk`): one row per counted token, in the
    order of ``labels``. Returns ``(loss, stats)`` like ``distill_loss``.
    """
    obj = build_objective(method, progress, **cfg)
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be at least 1")
    live = teacher_topk is None
    if obj.needs_teacher and live and (teacher_hidden is None or teacher_weight is None):
        raise ValueError(f"loss method {method!r} needs teacher hidden states and lm-head weight, or a cached "
                         "teacher (only 'sft' runs without a teacher)")
    if obj.needs_teacher and not live:
        topk.check_objective(obj, teacher_topk.k, teacher_topk.temperature, metrics_k)
    H = student_hidden.shape[-1]
    hs_all, labels = student_hidden.reshape(-1, H), labels.reshape(-1)
    if labels.shape[0] != hs_all.shape[0]:
        raise ValueError(f"labels have {labels.shape[0]} positions but student hidden states {hs_all.shape[0]}")
    if student_weight.shape[-1] != H:
        raise ValueError(f"student lm-head weight is {tuple(student_weight.shape)}, expected [V, {H}]")
    W_s, W_t = align_vocab(student_weight, teacher_weight if obj.needs_teacher and live else None,
                           vocab_size, what="lm-head rows")
    if obj.needs_teacher and live:
        ht_all = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
        if ht_all.shape[0] != hs_all.shape[0]:
            raise ValueError(f"teacher hidden states have {ht_all.shape[0]} positions, student {hs_all.shape[0]}")
    if (classmate_hidden is None) != (classmate_weight is None):
        raise ValueError("the misfeedback term needs both classmate_hidden and classmate_weight")
    if classmate_hidden is not None:
        losses._check_kappa(kappa)   # up front: a rank without counted tokens must fail too
        hc_all = classmate_hidden.reshape(-1, classmate_hidden.shape[-1])
        if hc_all.shape[0] != hs_all.shape[0]:
            raise ValueError(f"classmate hidden states have {hc_all.shape[0]} positions, student {hs_all.shape[0]}")
        W_c = classmate_weight[:vocab_size] if vocab_size else classmate_weight
        if W_c.shape != (W_s.shape[0], hc_all.shape[1]):
            raise ValueError(f"classmate lm-head weight is {tuple(W_c.shape)} (after the vocab_size cut), "
                             f"expected [{W_s.shape[0]}, {hc_all.shape[1]}]: the student's vocabulary "
                             "and the classmate's hidden size")

    need_h = torch.is_grad_enabled() and student_hidden.requires_grad
    need_w = torch.is_grad_enabled() and student_weight.requires_grad
    cdt = torch.promote_types(student_hidden.dtype, torch.float32)
    rows = (labels != IGNORE_INDEX).nonzero().squeeze(-1)
    if obj.needs_teacher and not live and len(teacher_topk) != rows.numel():
        raise ValueError(f"the cached teacher has {len(teacher_topk)} rows for {rows.numel()} counted tokens")
    grad_h = torch.zeros_like(hs_all) if need_h else None
    # the lm-head gradient sums over every chunk: accumulate in fp32 (a bf16 sum of many chunks
    # loses the small contributions), cast once at the end
    grad_w = torch.zeros(W_s.shape, dtype=torch.promote_types(W_s.dtype, torch.float32),
                         device=W_s.device) if need_w else None
    total = torch.zeros((), dtype=cdt, device=hs_all.device)
    # Every key from the start: a rank without counted tokens must join the same reduction.
    names = [t.name for t in obj.terms] + (["ce"] if obj.ce_weight else [])
    names += ["misfeedback", "classmate_kl"] if classmate_hidden is not None else []
    if metrics_k and obj.needs_teacher:
        k = min(metrics_k, W_s.shape[0])
        names += [f"overlap@{k}", f"consistency@{k}", "top1_agreement", "tokens"]
    sums: dict[str, Tensor] = {name: torch.zeros((), dtype=torch.float64, device=hs_all.device) for name in names}

    for start in range(0, rows.numel(), chunk_size):
        idx = rows[start:start + chunk_size]
        h, lab = hs_all.index_select(0, idx).detach(), labels.index_select(0, idx)
        a = None
        if obj.needs_teacher and not live:
            a = teacher_topk[start:start + chunk_size]
        elif obj.needs_teacher:
            with torch.no_grad():
                a = softcap((ht_all.index_select(0, idx) @ W_t.T).to(cdt), teacher_softcap)
        c = None
        if classmate_hidden is not None:
            with torch.no_grad():
                c = softcap((hc_all.index_select(0, idx) @ W_c.T).to(cdt), classmate_softcap)
        with torch.enable_grad():
            x = (h @ W_s.detach().T).to(cdt).requires_grad_(need_h or need_w)
            z = softcap(x, student_softcap)
            per = obj.token_losses(z, a, lab, c, misfeedback_weight, kappa)
            chunk_sum = per["loss"].sum()
            gx = torch.autograd.grad(chunk_sum, x)[0].to(W_s.dtype) if (need_h or need_w) else None
        total += chunk_sum.detach()
        for name, v in per.items():
            if name != "loss":
                sums[name] += v.sum()
        if metrics_k and a is not None:
            for name, v in metrics.alignment_sums(z, a, k=metrics_k).items():
                sums[name] += v
        if need_h:
            grad_h.index_copy_(0, idx, gx @ W_s.detach())
        if need_w:
            grad_w.addmm_(gx.T.to(grad_w.dtype), h.to(grad_w.dtype))
        del x, z, a, c, per, gx

    grad_w_full = grad_w
    if need_w and (grad_w.dtype != student_weight.dtype or grad_w.shape != student_weight.shape):
        grad_w_full = torch.zeros_like(student_weight)      # rows past vocab_size get no gradient
        grad_w_full[: W_s.shape[0]] = grad_w
        del grad_w
    local = _WithGrads.apply(student_hidden.reshape(-1, H), student_weight, total,
                             grad_h if need_h else torch.empty(0), grad_w_full if need_w else torch.empty(0))
    count = torch.tensor(rows.numel(), device=total.device)
    loss = global_mean(local, count, group, grads_averaged)
    return loss, _stats(sums, total, count, obj, group)


def _stats(sums: dict, total: Tensor, count: Tensor, obj, group) -> dict:
    """Per-term means over the counted tokens of the whole group, for logging."""
    sums = {k: v for k, v in sums.items() if k != "tokens"}   # alignment rows == counted rows
    reduced = all_reduce_dict({**sums, "loss": total, "__count": count}, group)
    n = float(reduced.pop("__count"))
    stats = {k: float(v) / max(n, 1.0) for k, v in reduced.items()}
    stats.update(obj.extras, tokens=int(n))
    return stats
