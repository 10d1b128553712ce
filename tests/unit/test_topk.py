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
    """What a cache row holds: top-k ids and logits at the cache's temperature, log Z of all."""
    vals, ids = (a / temperature).topk(k, dim=-1)
    return ids, vals, torch.logsumexp(a / temperature, dim=-1)


@pytest.mark.parametrize("name", losses.DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_k_equal_vocab_is_the_full_divergence(name, temperature):
    z, a = _logits(0)
    ids, vals, log_z = _cache(a, V, temperature)
    fn = losses.get(name)
    cached = fn(topk.student_log_probs(z, ids, temperature), topk.teacher_log_probs(vals, log_z), 1.0)
    full = fn(z, a, temperature)
    torch.testing.assert_close(cached, full, rtol=1e-9, atol=1e-10)
    g_cached, = torch.autograd.grad(cached.sum(), z)
    g_full, = torch.autograd.grad(full.sum(), z)
    torch.testing.assert_close(g_cached, g_full, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("k", [1, 5, 20])
def test_forward_kl_on_k_plus_one_categories(k):
    """KL(p || q) over K and the tail, written out with probabilities, as methods.md defines it."""
    z, a = _logits(1)
    ids, vals, log_z = _cache(a, k)
    p, q = a.softmax(-1), z.softmax(-1)
    p_k, q_k = p.gather(-1, ids), q.gather(-1, ids)
    p_tail, q_tail = 1 - p_k.sum(-1), 1 - q_k.sum(-1)
    expected = (p_k * (p_k / q_k).log()).sum(-1) + p_tail * (p_tail / q_tail).log()
    got = losses.forward_kl(topk.student_log_probs(z, ids), topk.teacher_log_probs(vals, log_z))
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    g_got, = torch.autograd.grad(got.sum(), z)
    g_exp, = torch.autograd.grad(expected.sum(), z)
    torch.testing.assert_close(g_got, g_exp, rtol=1e-7, atol=1e-10)


def test_error_shrinks_as_k_grows():
    z, a = _logits(2)
    full = losses.forward_kl(z, a).detach()
    errors = []
    for k in (2, 8, 32, V):
        ids, vals, log_z = _cache(a, k)
        cached = losses.forward_kl(topk.student_log_probs(z, ids), topk.teacher_log_probs(vals, log_z)).detach()
        errors.append((cached - full).abs().mean().item())
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-10 < errors[0]


def test_empty_tail_stays_finite_in_low_precision():
    """A teacher whose top-k holds all its mass (the tail underflows) gives finite losses and grads."""
    z, _ = _logits(3)
    a = torch.full((N, V), -80.0, dtype=torch.float64)
    a[:, :4] = 20.0
    ids, vals, log_z = _cache(a, 4)
    zb = z.detach().to(torch.bfloat16).requires_grad_()
    for name in losses.DIVERGENCES:
        v = losses.get(name)(topk.student_log_probs(zb, ids), topk.teacher_log_probs(vals.bfloat16(), log_z.bfloat16()))
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
