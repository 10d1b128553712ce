"""Per-token losses against their formulas (methods.md), autograd, properties and extremes."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from kd import losses

DIVS = losses.DIVERGENCES


def two_class():
    # p = [0.75, 0.25] (teacher), q = [0.5, 0.5] (student)
    z = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    a = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    return z, a


def test_forward_reverse_kl_tvd_hand_values():
    z, a = two_class()
    assert losses.forward_kl(z, a).item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    assert losses.reverse_kl(z, a).item() == pytest.approx(0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(2.0))
    assert losses.tvd(z, a).item() == pytest.approx(0.25)


def _kl(x, y):
    return sum(xi * math.log(xi / yi) for xi, yi in zip(x, y))


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_hand_value(beta):
    z, a = two_class()
    p, q = [0.75, 0.25], [0.5, 0.5]
    m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q)]
    want = beta * _kl(p, m) + (1 - beta) * _kl(q, m)
    assert losses.jsd(z, a, beta=beta).item() == pytest.approx(want)


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5])
def test_skew_kls_hand_values(alpha):
    z, a = two_class()
    p, q = [0.75, 0.25], [0.5, 0.5]
    mix_f = [alpha * pi + (1 - alpha) * qi for pi, qi in zip(p, q)]
    mix_r = [(1 - alpha) * pi + alpha * qi for pi, qi in zip(p, q)]
    assert losses.skew_forward_kl(z, a, alpha=alpha).item() == pytest.approx(_kl(p, mix_f))
    assert losses.skew_reverse_kl(z, a, alpha=alpha).item() == pytest.approx(_kl(q, mix_r))


def test_temperature_softens_both_distributions():
    z = torch.tensor([[1.0, 0.0, -1.0]], dtype=torch.float64)
    a = torch.tensor([[2.0, 0.5, -3.0]], dtype=torch.float64)
    T = 2.5
    p, q = F.softmax(a / T, -1)[0].tolist(), F.softmax(z / T, -1)[0].tolist()
    assert losses.forward_kl(z, a, T).item() == pytest.approx(_kl(p, q))
    assert losses.reverse_kl(z, a, T).item() == pytest.approx(_kl(q, p))


def test_bad_mixture_params_name_the_fix():
    z, a = two_class()
    with pytest.raises(ValueError, match="forward_kl.*reverse_kl"):
        losses.jsd(z, a, beta=1.0)
    with pytest.raises(ValueError, match="alpha"):
        losses.skew_forward_kl(z, a, alpha=1.0)


def softplus(x):
    return math.log1p(math.exp(x))


def test_group_relative_hand_values():
    a = torch.tensor([[3.0, 2.0, 1.0]], dtype=torch.float64)
    z = torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64)
    # pairs (0,1), (0,2), (1,2): softplus(-(z_i - z_j))
    want = (softplus(1.0) + softplus(0.0) + softplus(-1.0)) / 3
    assert losses.group_relative(z, a, k=3).item() == pytest.approx(want)
    assert losses.group_relative(z, a, k=2).item() == pytest.approx(softplus(1.0))
    assert losses.group_relative(z, a, k=3, tau=2.0).item() == pytest.approx(
        (softplus(0.5) + softplus(0.0) + softplus(-0.5)) / 3)


def test_group_relative_student_group_and_prob_gap():
    a = torch.tensor([[3.0, 2.0, 1.0, 0.0]], dtype=torch.float64)
    z = torch.tensor([[0.0, 0.0, 0.0, 5.0]], dtype=torch.float64)
    # teacher top-2 {0, 1} united with the student's favourite {3}: pairs (0,1), (0,3), (1,3)
    want = (softplus(0.0) + 2 * softplus(5.0)) / 3
    assert losses.group_relative(z, a, k=2, k_student=1).item() == pytest.approx(want)
    # a student favourite already in the teacher group adds nothing
    z2 = torch.tensor([[9.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    assert losses.group_relative(z2, a, k=2, k_student=1).item() == pytest.approx(softplus(-9.0))
    p = F.softmax(a, -1)[0].tolist()
    w = {(0, 1): p[0] - p[1], (0, 2): p[0] - p[2], (1, 2): p[1] - p[2]}
    zz = torch.tensor([[0.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    terms = {(0, 1): softplus(1.0), (0, 2): softplus(0.0), (1, 2): softplus(-1.0)}
    want = sum(w[k] * terms[k] for k in w) / sum(w.values())
    assert losses.group_relative(zz, a, k=3, pair_weight="prob_gap").item() == pytest.approx(want)


def test_group_relative_ties_give_no_pairs():
    a = torch.ones(2, 6)
    z = torch.randn(2, 6)
    assert torch.equal(losses.group_relative(z, a, k=4), torch.zeros(2))


def reference_rank_correlation(z, a, k, t):
    """A loop-by-loop Spearman on soft ranks, written independently of the vectorised one."""
    out = []
    for zr, ar in zip(z.tolist(), a.tolist()):
        top = lambda xs: sorted(range(len(xs)), key=lambda i: -xs[i])[:k]
        U = sorted(set(top(ar)) | set(top(zr)))

        def ranks(xs):
            return [1 + sum(1 / (1 + math.exp(-(xs[j] - xs[i]) / t)) for j in U if j != i) for i in U]

        rt, rs = ranks(ar), ranks(zr)
        mt, ms = sum(rt) / len(rt), sum(rs) / len(rs)
        cov = sum((x - mt) * (y - ms) for x, y in zip(rt, rs))
        var = math.sqrt(sum((x - mt) ** 2 for x in rt) * sum((y - ms) ** 2 for y in rs))
        out.append(1 - cov / var)
    return out


def test_rank_correlation_matches_loop_reference():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 40, generator=g, dtype=torch.float64)
    a = torch.randn(5, 40, generator=g, dtype=torch.float64)
    got = losses.rank_correlation(z, a, k=5, rank_temperature=0.5)
    assert got.tolist() == pytest.approx(reference_rank_correlation(z, a, 5, 0.5))


def test_rank_correlation_extremes():
    a = torch.arange(20, dtype=torch.float64).unsqueeze(0) * 3
    assert losses.rank_correlation(a.clone(), a, k=5).item() == pytest.approx(0.0, abs=1e-9)
    # student's top-5 is the teacher's bottom-5 in reverse: the union is anti-ordered -> rho ~ -1
    got = losses.rank_correlation(-a, a, k=5, rank_temperature=0.01).item()
    assert got == pytest.approx(2.0, abs=1e-3)


@pytest.mark.parametrize("name", sorted(losses.REGISTRY))
def test_gradcheck_float64(name):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    a = torch.randn(3, 7, generator=g, dtype=torch.float64)
    params = {"k": 4} if name in ("group_relative", "rank_correlation") else {}
    fn = losses.get(name)
    assert torch.autograd.gradcheck(lambda x: fn(x, a, 1.7, **params), (z,))


@pytest.mark.parametrize("name", sorted(losses.REGISTRY))
def test_returns_float32_per_token_for_low_precision(name):
    z = torch.randn(4, 11).bfloat16()
    a = torch.randn(4, 11).bfloat16()
    params = {"k": 3} if name in ("group_relative", "rank_correlation") else {}
    out = losses.get(name)(z, a, **params)
    assert out.shape == (4,) and out.dtype == torch.float32


@pytest.mark.parametrize("name", sorted(losses.REGISTRY))
def test_finite_at_extreme_logits_and_large_vocab(name):
    V = 262144
    g = torch.Generator().manual_seed(2)
    z = ((torch.rand(2, V, generator=g) * 2 - 1) * 1e4).requires_grad_()
    a = (torch.rand(2, V, generator=g) * 2 - 1) * 1e4
    a[1, :7] = 1e4   # ties at the top
    out = losses.get(name)(z, a)
    assert torch.isfinite(out).all(), out
    out.sum().backward()
    assert torch.isfinite(z.grad).all()


def test_unknown_name_lists_known():
    with pytest.raises(ValueError, match="forward_kl.*group_relative|group_relative.*forward_kl"):
        losses.get("forwrd_kl")


logit_rows = st.lists(st.floats(-30, 30, allow_nan=False, width=32), min_size=3, max_size=12)


@settings(max_examples=60, deadline=None)
@given(zs=logit_rows, as_=logit_rows, T=st.floats(0.3, 4.0))
def test_divergences_nonnegative_and_zero_on_equal(zs, as_, T):
    n = min(len(zs), len(as_))
    z = torch.tensor([zs[:n]], dtype=torch.float64)
    a = torch.tensor([as_[:n]], dtype=torch.float64)
    for name in DIVS:
        fn = losses.get(name)
        assert fn(z, a, T).item() >= -1e-9, name
        assert fn(a.clone(), a, T).item() == pytest.approx(0.0, abs=1e-9), name


@settings(max_examples=40, deadline=None)
@given(vals=st.lists(st.integers(-1000, 1000), min_size=4, max_size=16, unique=True),
       k=st.integers(2, 8))
def test_group_relative_falls_as_student_agrees_with_teacher(vals, k):
    a = torch.tensor([vals], dtype=torch.float64) / 100
    scales = [0.0, 0.5, 1.0, 2.0, 4.0]
    gr = [losses.group_relative(s * a, a, k=k).item() for s in scales]
    assert all(x > y for x, y in zip(gr, gr[1:])), gr
    assert losses.group_relative(-a, a, k=k).item() > gr[2]
