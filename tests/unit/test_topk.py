"""kd.topk: the cached teacher's top-k + tail rule against the full computation (k = V), against the
k + 1 category formula written out (k < V), in its gradients, and GRKD's group from the cache."""
import pytest
import torch

from kd import losses, topk

N, V = 12, 50


def _logits(seed: int, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(N, V, generator=g, dtype=torch.float64) * scale).requires_grad_()
    a = torch.randn(N, V, generator=g, dtype=torch.float64) * scale
    return z, a


def _cache(a: torch.Tensor, k: int, temperature: float = 1.0):
    """What a cache row holds: top-k ids, their logits less the row's top one, and the log of the
    mass outside the top-k at the cache's temperature (written out here with a mask)."""
    a = a - a.max(-1, keepdim=True).values
    vals, ids = a.topk(k, dim=-1)
    outside = torch.ones_like(a, dtype=torch.bool).scatter(-1, ids, False)
    return ids, vals, torch.logsumexp((a / temperature).masked_fill(~outside, float("-inf")), dim=-1)


@pytest.mark.parametrize("name", losses.DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_k_equal_vocab_is_the_full_divergence(name, temperature):
    z, a = _logits(0)
    ids, vals, log_tail = _cache(a, V, temperature)
    fn = losses.get(name)
    cached = fn(topk.student_log_probs(z, ids, temperature), topk.teacher_log_probs(vals, log_tail, temperature), 1.0)
    full = fn(z, a, temperature)
    torch.testing.assert_close(cached, full, rtol=1e-9, atol=1e-10)
    g_cached, = torch.autograd.grad(cached.sum(), z)
    g_full, = torch.autograd.grad(full.sum(), z)
    torch.testing.assert_close(g_cached, g_full, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("k", [1, 5, 20])
def test_forward_kl_on_k_plus_one_categories(k):
    """KL(p || q) over K and the tail, written out with probabilities, as methods.md defines it."""
    z, a = _logits(1)
    ids, vals, log_tail = _cache(a, k)
    p, q = a.softmax(-1), z.softmax(-1)
    p_k, q_k = p.gather(-1, ids), q.gather(-1, ids)
    p_tail, q_tail = 1 - p_k.sum(-1), 1 - q_k.sum(-1)
    expected = (p_k * (p_k / q_k).log()).sum(-1) + p_tail * (p_tail / q_tail).log()
    got = losses.forward_kl(topk.student_log_probs(z, ids), topk.teacher_log_probs(vals, log_tail))
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    g_got, = torch.autograd.grad(got.sum(), z)
    g_exp, = torch.autograd.grad(expected.sum(), z)
    torch.testing.assert_close(g_got, g_exp, rtol=1e-7, atol=1e-10)


def test_error_shrinks_as_k_grows():
    z, a = _logits(2)
    full = losses.forward_kl(z, a).detach()
    errors = []
    for k in (2, 8, 32, V):
        ids, vals, log_tail = _cache(a, k)
        cached = losses.forward_kl(topk.student_log_probs(z, ids), topk.teacher_log_probs(vals, log_tail)).detach()
        errors.append((cached - full).abs().mean().item())
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-10 < errors[0]


def test_empty_tail_stays_finite_in_low_precision():
    """A teacher whose top-k holds all its mass (the tail underflows) gives finite losses and grads."""
    z, _ = _logits(3)
    a = torch.full((N, V), -80.0, dtype=torch.float64)
    a[:, :4] = 20.0
    ids, vals, log_tail = _cache(a, 4)
    zb = z.detach().to(torch.bfloat16).requires_grad_()
    for name in losses.DIVERGENCES:
        v = losses.get(name)(topk.student_log_probs(zb, ids), topk.teacher_log_probs(vals.bfloat16(), log_tail))
        g, = torch.autograd.grad(v.sum(), zb)
        assert torch.isfinite(v).all() and torch.isfinite(g).all(), name


@pytest.mark.parametrize("pair_weight", ["uniform", "prob_gap"])
@pytest.mark.parametrize("k,cached_k", [(8, 8), (8, 20), (3, V)])
def test_group_relative_from_the_cache_is_exact(pair_weight, k, cached_k):
    z, a = _logits(4)
    ids, vals, _ = _cache(a, cached_k)
    topk.check_group(cached_k, k)
    z_k, a_k = topk.group_inputs(z, ids, vals)
    cached = losses.group_relative(z_k, a_k, 1.0, k=k, pair_weight=pair_weight)
    full = losses.group_relative(z, a, 1.0, k=k, pair_weight=pair_weight)
    torch.testing.assert_close(cached, full, rtol=1e-9, atol=1e-12)
    g_cached, = torch.autograd.grad(cached.sum(), z)
    g_full, = torch.autograd.grad(full.sum(), z)
    torch.testing.assert_close(g_cached, g_full, rtol=1e-8, atol=1e-12)


def test_group_the_cache_cannot_give():
    with pytest.raises(ValueError, match=r"k=16 is more than the cache's k=8"):
        topk.check_group(8, 16)
    with pytest.raises(ValueError, match=r"k_student=4 .* no teacher logits"):
        topk.check_group(64, 8, k_student=4)


@pytest.mark.parametrize("name", losses.DIVERGENCES)
def test_k_equal_vocab_in_fp32_has_no_noise_tail(name):
    """At k = V both tails are empty by construction, not by a rounding 1 - sum p: fp32 rows give the
    full divergence to fp32 precision (a noise tail of 1e-7 against an empty one would cost ~1e-3)."""
    z, a = (x.float() for x in _logits(5))
    z = z.detach().requires_grad_()
    ids, vals, tail = _cache(a, V, 2.0)
    assert torch.isinf(tail).all()
    fn = losses.get(name)
    cached = fn(topk.student_log_probs(z, ids, 2.0), topk.teacher_log_probs(vals, tail, 2.0), 1.0)
    torch.testing.assert_close(cached, fn(z, a, 2.0), rtol=2e-5, atol=2e-6)


def test_stored_tail_beats_one_minus_the_sum_in_half_precision():
    """fp16 top-k logits with the fp32 tail: the teacher's tail probability keeps its relative accuracy
    even when it is far below fp16's resolution of sum p_K."""
    g = torch.Generator().manual_seed(6)
    a = torch.randn(N, V, generator=g, dtype=torch.float64) * 8
    ids, vals, tail = _cache(a, 20)
    got = topk.teacher_log_probs(vals.half(), tail.float())[:, -1].double()
    exact = tail - torch.logsumexp(a - a.max(-1, keepdim=True).values, -1)
    torch.testing.assert_close(got, exact, rtol=0, atol=2e-3)
    assert (exact < -12).any()          # tails below fp16's 2^-11 relative step of sum p_K are covered


def _objective(method, **kw):
    from kd.objective import build_objective
    return build_objective(method, 0.0, **kw)


def test_objective_checks_name_what_the_cache_lacks():
    topk.check_objective(_objective("grkd", k=16), 16, 1.0, metrics_k=5)
    topk.check_objective(_objective("jsd", temperature=2.0), 4, 2.0)
    cases = [(_objective("forward_kl", temperature=2.0), 16, 1.0, None, r"loss.temperature=2 .*temperature 1"),
             (_objective("forward_kl", standardize=True), 16, 1.0, None, r"standardize=true"),
             (_objective("rlkd"), 16, 1.0, None, r"'rank' term ranks the union .* outside the cached ids"),
             (_objective("grkd", k=32), 16, 1.0, None, r"k=32 is more than the cache's k=16"),
             (_objective("forward_kl"), 4, 1.0, 5, r"loss.metrics_k=5 is more than the cache's k=4")]
    for obj, k, t, mk, msg in cases:
        with pytest.raises(ValueError, match=msg):
            topk.check_objective(obj, k, t, mk)


@pytest.mark.parametrize("method,params", [("grkd", {"k": 8, "pair_weight": "prob_gap"}), ("forward_kl", {}),
                                           ("skew_reverse_kl", {"alpha": 0.2})])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_fused_head_from_a_full_cache_equals_the_live_teacher(method, params, temperature):
    """kd.fused_distill_loss with teacher_topk (k = V) against the same head on teacher hidden states:
    loss, every logged term and both gradients."""
    from kd import fused_distill_loss
    from kd.head import softcap
    g = torch.Generator().manual_seed(7)
    n, h, v = 40, 16, 30
    hs = torch.randn(n, h, generator=g, dtype=torch.float64).requires_grad_()
    ws = torch.randn(v, h, generator=g, dtype=torch.float64).requires_grad_()
    ht, wt = torch.randn(n, h, generator=g, dtype=torch.float64), torch.randn(v, h, generator=g, dtype=torch.float64)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::3] = -100
    common = dict(method=method, chunk_size=7, temperature=temperature, progress=0.8, metrics_k=5, ce_weight=0.3,
                  **params)
    live, s_live = fused_distill_loss(hs, ws, ht, wt, labels, teacher_softcap=5.0, **common)
    a = softcap(ht @ wt.T, 5.0)[labels != -100]
    ids, vals, tail = _cache(a, v, temperature)
    rows = topk.TopK(ids, vals, tail, temperature)
    cached, s_cached = fused_distill_loss(hs, ws, None, None, labels, teacher_topk=rows, **common)
    torch.testing.assert_close(cached, live, rtol=1e-10, atol=0)
    assert s_cached.keys() == s_live.keys()
    for key in s_live:
        assert s_cached[key] == pytest.approx(s_live[key], rel=1e-9, abs=1e-12), key
    for x, y in zip(torch.autograd.grad(cached, [hs, ws]), torch.autograd.grad(live, [hs, ws])):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="cached teacher has 3 rows for"):
        fused_distill_loss(hs, ws, None, None, labels, teacher_topk=rows[:3], **common)
