"""distill_loss: masking, T^2, method mixing, schedules, vocab alignment and config errors."""
import math

import pytest
import torch
import torch.nn.functional as F

import kd
from kd import losses, metrics, schedule


def batch(N=10, V=13, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, V, generator=g, dtype=dtype, requires_grad=True)
    a = torch.randn(N, V, generator=g, dtype=dtype) * 2
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[1, 4, 5]] = -100
    return z, a, labels


def masked_mean(v, labels):
    m = labels != -100
    return v[m].mean()


@pytest.mark.parametrize("name", losses.DIVERGENCES)
def test_divergence_method_is_T2_scaled_masked_mean(name):
    z, a, labels = batch()
    T = 2.0
    loss, stats = kd.distill_loss(z, a, labels, method=name, temperature=T)
    want = T * T * masked_mean(losses.get(name)(z, a, T), labels)
    assert loss.item() == pytest.approx(want.item())
    assert stats["tokens"] == 7
    assert stats["loss"] == pytest.approx(loss.item())


def test_masked_rows_do_not_matter_even_if_nan():
    z, a, labels = batch()
    z2 = z.detach().clone()
    z2[1] = float("nan")
    l1, _ = kd.distill_loss(z, a, labels, method="forward_kl")
    l2, _ = kd.distill_loss(z2, a, labels, method="forward_kl")
    assert l2.item() == pytest.approx(l1.item())


@pytest.mark.parametrize("progress", [0.0, 0.2, 0.5, 0.9])
def test_grkd_combines_terms_with_transition(progress):
    z, a, labels = batch()
    T = 1.5
    loss, stats = kd.distill_loss(z, a, labels, method="grkd", progress=progress, temperature=T,
                                  k=5, ce_weight=0.3)
    lam = min(progress / 0.5, 1.0) * 0.5
    st = masked_mean(losses.forward_kl(z, a, T), labels)
    gr = masked_mean(losses.group_relative(z, a, T, k=5), labels)
    ce = F.cross_entropy(z[labels != -100], labels[labels != -100])
    want = (1 - lam) * T * T * st + lam * gr + 0.3 * ce
    assert loss.item() == pytest.approx(want.item())
    assert stats["lambda"] == pytest.approx(lam)
    assert stats["soft_target"] == pytest.approx(st.item())
    assert stats["group_relative"] == pytest.approx(gr.item())
    assert stats["ce"] == pytest.approx(ce.item())


def test_rlkd_is_rank_plus_half_divergence():
    z, a, labels = batch()
    loss, stats = kd.distill_loss(z, a, labels, method="rlkd", k=4, divergence="jsd", beta=0.3)
    rank = masked_mean(losses.rank_correlation(z, a, k=4), labels)
    div = masked_mean(losses.jsd(z, a, beta=0.3), labels)
    assert loss.item() == pytest.approx((rank + div / 2).item())
    assert set(stats) >= {"rank", "jsd"}


def test_sft_needs_no_teacher_and_is_cross_entropy():
    z, _, labels = batch()
    loss, stats = kd.distill_loss(z, None, labels, method="sft")
    m = labels != -100
    assert loss.item() == pytest.approx(F.cross_entropy(z[m], labels[m]).item())
    with pytest.raises(ValueError, match="needs teacher"):
        kd.distill_loss(z, None, labels, method="grkd")


def test_standardize_applies_to_both_logits():
    z, a, labels = batch()
    loss, _ = kd.distill_loss(z, a, labels, method="forward_kl", standardize=True)
    want = masked_mean(losses.forward_kl(losses.standardize(z), losses.standardize(a)), labels)
    assert loss.item() == pytest.approx(want.item())
    # standardization removes per-row shift and scale of the teacher
    l2, _ = kd.distill_loss(z, a * 3 + 7, labels, method="forward_kl", standardize=True)
    assert l2.item() == pytest.approx(loss.item(), rel=1e-6)


def test_accepts_batch_and_time_dimensions():
    z, a, labels = batch(N=12)
    l1, _ = kd.distill_loss(z, a, labels, method="tvd")
    l2, _ = kd.distill_loss(z.reshape(3, 4, -1), a.reshape(3, 4, -1), labels.reshape(3, 4), method="tvd")
    assert l2.item() == pytest.approx(l1.item())


def test_vocab_mismatch_is_explained_and_vocab_size_cuts():
    z, a, labels = batch(V=13)
    a_pad = torch.cat([a, torch.full((a.shape[0], 3), -50.0, dtype=a.dtype)], -1)
    with pytest.raises(ValueError, match=r"teacher is larger.*vocab_size=13"):
        kd.distill_loss(z, a_pad, labels, method="forward_kl")
    l1, _ = kd.distill_loss(z, a, labels, method="forward_kl")
    l2, _ = kd.distill_loss(z, a_pad, labels, method="forward_kl", vocab_size=13)
    assert l2.item() == pytest.approx(l1.item())
    with pytest.raises(ValueError, match="vocab_size=20"):
        kd.distill_loss(z, a_pad, labels, method="forward_kl", vocab_size=20)


def test_config_errors_name_the_key():
    z, a, labels = batch()
    with pytest.raises(ValueError, match=r"'lamda_end'.*Did you mean 'lambda_end'"):
        kd.distill_loss(z, a, labels, method="grkd", lamda_end=0.3)
    with pytest.raises(ValueError, match="beta"):
        kd.distill_loss(z, a, labels, method="forward_kl", beta=0.3)
    with pytest.raises(ValueError, match="known methods.*grkd"):
        kd.distill_loss(z, a, labels, method="grdk")
    with pytest.raises(ValueError, match="temperature"):
        kd.distill_loss(z, a, labels, method="grkd", temperature=0)


def test_no_counted_tokens_gives_zero_with_graph():
    z, a, labels = batch()
    loss, stats = kd.distill_loss(z, a, torch.full_like(labels, -100), method="grkd")
    assert loss.item() == 0.0 and stats["tokens"] == 0
    loss.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


def test_transition_shapes():
    assert schedule.transition(0.0) == 0.0
    assert schedule.transition(0.25) == pytest.approx(0.25)
    assert schedule.transition(0.5) == pytest.approx(0.5)
    assert schedule.transition(0.9) == pytest.approx(0.5)
    assert schedule.transition(0.25, shape="cosine") == pytest.approx(0.25 * (1 - math.cos(math.pi / 2)))
    assert schedule.transition(0.49, shape="step") == 0.0
    assert schedule.transition(0.5, shape="step") == 0.5
    assert schedule.transition(0.3, start=0.2, end=1.0, point=0.75) == pytest.approx(0.2 + 0.8 * 0.4)
    assert schedule.transition(1.7) == schedule.transition(1.0)
    with pytest.raises(ValueError, match="linear"):
        schedule.transition(0.1, shape="exp")
    with pytest.raises(ValueError, match=r"lambda_end=1.5 must lie in \[0, 1\]"):
        schedule.transition(0.1, end=1.5)


def test_alignment_metrics_hand_case():
    a = torch.tensor([[5.0, 4.0, 3.0, 0.0], [5.0, 4.0, 3.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    z = torch.tensor([[5.0, 4.0, 3.0, 0.0], [4.0, 5.0, 0.0, 3.0], [9.0, 1.0, 2.0, 3.0]])
    labels = torch.tensor([1, 1, -100])
    m = metrics.alignment(z, a, labels, k=2)
    # row 0: same top-2 in order; row 1: same set {0,1}, swapped order
    assert m == {"overlap@2": 1.0, "consistency@2": 0.5, "top1_agreement": 0.5}
    m_all = metrics.alignment(z, a, None, k=2)
    assert m_all["overlap@2"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert m_all["top1_agreement"] == pytest.approx(1 / 3)
