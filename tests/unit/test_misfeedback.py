"""Class KD's misfeedback term: formula, autograd, distill_loss wiring and the fused head."""
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import kd
from kd import losses, softcap


def explicit(z, c, T, kappa):
    """-min(sum q (log q - log c), kappa), written out independently of kd.losses."""
    q, log_q, log_c = F.softmax(z / T, -1), F.log_softmax(z / T, -1), F.log_softmax(c / T, -1)
    kl = (q * (log_q - log_c)).sum(-1)
    return -torch.minimum(kl, torch.full_like(kl, kappa)), kl


def median_kappa(z, c, T):
    """A kappa with some tokens capped and some not; asserts that both cases occur."""
    kl = explicit(z.detach(), c.detach(), T, 1.0)[1]
    s = kl.sort().values
    kappa = (s[len(s) // 2 - 1] + s[len(s) // 2]).item() / 2   # between two tokens: no tie at the cap
    assert (kl > kappa).any() and (kl < kappa).any()
    return kappa


def pair(N=12, V=19, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(N, V, generator=g, dtype=dtype) * 2).requires_grad_()
    c = (torch.randn(N, V, generator=g, dtype=dtype) * 2).requires_grad_()
    return z, c


# --- the per-token function -------------------------------------------------------------------


def test_formula_and_autograd():
    z, c = pair()
    T = 1.7
    kappa = median_kappa(z, c, T)
    got = losses.misfeedback(z, c, T, kappa)
    want, kl = explicit(z, c, T, kappa)
    assert got.shape == (12,)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    gz, gc = torch.autograd.grad(got.sum(), (z, c), allow_unused=True)
    assert gc is None                                   # the classmate is a fixed target
    capped = kl > kappa
    assert torch.equal(gz[capped], torch.zeros_like(gz[capped]))
    assert (gz[~capped].abs().sum(-1) > 0).all()
    # below the cap the gradient is that of -KL(q || c)
    ref = torch.autograd.grad(-kl[~capped].sum(), z)[0]
    torch.testing.assert_close(gz[~capped], ref[~capped], rtol=1e-10, atol=1e-12)


def test_gradcheck_below_the_cap():
    z, c = pair(N=3, V=7)
    assert torch.autograd.gradcheck(lambda x: losses.misfeedback(x, c.detach(), 1.3, kappa=1e6), (z,))


def test_float32_for_low_precision_and_finite_at_extremes():
    z, c = pair(N=4, V=11, dtype=torch.float32)
    out = losses.misfeedback(z.bfloat16(), c.bfloat16())
    assert out.shape == (4,) and out.dtype == torch.float32
    z = ((torch.rand(2, 4096) * 2 - 1) * 1e4).requires_grad_()
    out = losses.misfeedback(z, -z.detach(), kappa=1e9)   # huge but finite KL, uncapped
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(z.grad).all()


def test_kappa_must_be_positive_and_term_is_not_a_method():
    z, c = pair()
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="kappa"):
            losses.misfeedback(z, c, kappa=bad)
    assert "misfeedback" not in losses.REGISTRY and "misfeedback" not in kd.METHODS
    assert kd.misfeedback is losses.misfeedback


# --- distill_loss -----------------------------------------------------------------------------


def batch(N=14, V=19, seed=0):
    z, c = pair(N, V, seed)
    g = torch.Generator().manual_seed(seed + 1)
    a = torch.randn(N, V, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[1, 4, 5, 9]] = -100
    return z, a, c, labels


@pytest.mark.parametrize("method, cfg", [("sft", {}), ("grkd", {"k": 5, "progress": 0.4}),
                                         ("forward_kl", {"standardize": True})])
def test_distill_loss_adds_the_weighted_term(method, cfg):
    z, a, c, labels = batch()
    T, w = 1.4, 0.3
    kappa = median_kappa(z, c, T)
    base, st0 = kd.distill_loss(z, a, labels, method=method, temperature=T, **cfg)
    loss, st = kd.distill_loss(z, a, labels, method=method, temperature=T, classmate_logits=c,
                               misfeedback_weight=w, kappa=kappa, **cfg)
    m = labels != -100
    mis, kl = explicit(z, c, T, kappa)
    # raw logits even under standardize: the term is not part of the teacher terms
    assert loss.item() == pytest.approx(base.item() + w * mis[m].mean().item())
    assert st["misfeedback"] == pytest.approx(mis[m].mean().item())
    assert st["classmate_kl"] == pytest.approx(kl[m].mean().item())
    assert st["tokens"] == st0["tokens"] == int(m.sum())
    assert {k: v for k, v in st.items() if k not in ("misfeedback", "classmate_kl", "loss")} == \
        {k: v for k, v in st0.items() if k != "loss"}
    loss.backward()
    assert c.grad is None


def test_distill_loss_defaults_and_masked_rows():
    z, a, c, labels = batch()
    loss, _ = kd.distill_loss(z, a, labels, method="sft", classmate_logits=c)
    ref, _ = kd.distill_loss(z, a, labels, method="sft", classmate_logits=c, misfeedback_weight=0.1, kappa=1.0)
    assert loss.item() == ref.item()
    other, _ = kd.distill_loss(z, a, labels, method="sft", classmate_logits=c, misfeedback_weight=0.2)
    assert other.item() != loss.item()
    # masked rows get no gradient, and their values neither count nor leak, even as NaN
    m = labels == -100
    gz = torch.autograd.grad(loss, z)[0]
    assert torch.equal(gz[m], torch.zeros_like(gz[m])) and (gz[~m].abs().sum(-1) > 0).all()
    c2 = c.detach().clone()
    c2[m] = float("nan")
    l2, st2 = kd.distill_loss(z, a, labels, method="sft", classmate_logits=c2)
    assert l2.item() == pytest.approx(loss.item()) and st2["tokens"] == 10


def test_distill_loss_classmate_shape_and_vocab_cut():
    z, a, c, labels = batch()
    pad = lambda x: torch.cat([x, torch.randn(x.shape[0], 3, dtype=x.dtype) * 50], -1)
    l1, st1 = kd.distill_loss(z, a, labels, method="grkd", k=4, classmate_logits=c)
    l2, st2 = kd.distill_loss(pad(z), a, labels, method="grkd", k=4, classmate_logits=pad(c), vocab_size=19)
    assert l2.item() == pytest.approx(l1.item()) and st2 == pytest.approx(st1)
    with pytest.raises(ValueError, match="classmate logits"):
        kd.distill_loss(z, a, labels, method="grkd", classmate_logits=pad(c))
    with pytest.raises(ValueError, match="classmate logits"):
        kd.distill_loss(z, a, labels, method="grkd", classmate_logits=c[:-1])
    with pytest.raises(ValueError, match="kappa"):
        kd.distill_loss(z, a, labels, method="grkd", classmate_logits=c, kappa=0.0)


# --- the fused head against the materialised logits --------------------------------------------


def setup(N=29, Hs=12, Ht=16, Hc=10, V=37, pad=3, seed=0):
    """Student and classmate lm-heads carry ``pad`` padding rows past the real vocabulary V."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    t = dict(hs=r(N, Hs), ws=r(V + pad, Hs) / 2, ht=r(N, Ht), wt=r(V, Ht) / 2, hc=r(N, Hc), wc=r(V + pad, Hc) / 2)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < 0.3] = -100
    return t, labels


def leaves(t):
    return {k: v.clone().requires_grad_() for k, v in t.items()}


CAPS = dict(s_cap=3.0, t_cap=5.0, c_cap=2.5)   # small: they really bend the logits


def materialised(t, labels, method, V, **cfg):
    z = softcap(t["hs"] @ t["ws"].T, CAPS["s_cap"])
    a = softcap(t["ht"] @ t["wt"].T, CAPS["t_cap"])
    c = softcap(t["hc"] @ t["wc"].T, CAPS["c_cap"])
    return kd.distill_loss(z, a if method != "sft" else None, labels, method=method, vocab_size=V,
                           classmate_logits=c, **cfg)


def fused(t, labels, method, V, chunk, **cfg):
    return kd.fused_distill_loss(t["hs"], t["ws"], t["ht"] if method != "sft" else None,
                                 t["wt"] if method != "sft" else None, labels, method=method,
                                 chunk_size=chunk, vocab_size=V, student_softcap=CAPS["s_cap"],
                                 teacher_softcap=CAPS["t_cap"], classmate_hidden=t["hc"],
                                 classmate_weight=t["wc"], classmate_softcap=CAPS["c_cap"], **cfg)


@pytest.mark.parametrize("method, params", [("grkd", {"k": 6, "k_student": 2, "progress": 0.4}),
                                            ("sft", {}), ("reverse_kl", {})])
@pytest.mark.parametrize("chunk", [1, 4, 7, 1024])
def test_fused_matches_materialised(method, params, chunk):
    V, T = 37, 1.3
    t, labels = setup(V=V)
    m = labels != -100
    z = softcap(t["hs"] @ t["ws"][:V].T, CAPS["s_cap"])[m]
    c = softcap(t["hc"] @ t["wc"][:V].T, CAPS["c_cap"])[m]
    kappa = median_kappa(z, c, T)                 # some counted tokens capped, some not
    cfg = dict(params, temperature=T, ce_weight=0.2, misfeedback_weight=0.3, kappa=kappa)

    t1 = leaves(t)
    l1, st1 = materialised(t1, labels, method, V, **cfg)
    l1.backward()
    t2 = leaves(t)
    l2, st2 = fused(t2, labels, method, V, chunk, **cfg)
    l2.backward()

    torch.testing.assert_close(l2, l1, rtol=1e-10, atol=1e-12)
    for k in ("hs", "ws"):
        torch.testing.assert_close(t2[k].grad, t1[k].grad, rtol=1e-9, atol=1e-12)
    assert torch.equal(t2["ws"].grad[V:], torch.zeros_like(t2["ws"].grad[V:]))   # padding rows
    assert set(st2) == set(st1) and {"misfeedback", "classmate_kl"} <= set(st2)
    for key, v in st1.items():
        assert st2[key] == pytest.approx(v), key
    assert -kappa <= st2["misfeedback"] < 0
    for tt in (t1, t2):                            # the classmate is never trained by this loss
        assert tt["hc"].grad is None and tt["wc"].grad is None


def test_fused_term_changes_the_gradient():
    """Guards the test above against a term that silently drops out of both paths."""
    t, labels = setup()
    t1, t2 = leaves(t), leaves(t)
    fused(t1, labels, "sft", 37, 8)[0].backward()
    cfg = dict(chunk_size=8, vocab_size=37, student_softcap=CAPS["s_cap"])
    kd.fused_distill_loss(t2["hs"], t2["ws"], None, None, labels, method="sft", **cfg)[0].backward()
    assert (t1["hs"].grad - t2["hs"].grad).abs().max() > 1e-3


def test_fused_masked_rows_and_empty_batch():
    t, labels = setup()
    t["hc"][labels == -100] = float("nan")        # masked rows are never read
    t1 = leaves(t)
    loss, st = fused(t1, labels, "sft", 37, 5)
    loss.backward()
    assert torch.isfinite(loss) and st["tokens"] == int((labels != -100).sum())
    assert torch.equal(t1["hs"].grad[labels == -100], torch.zeros_like(t1["hs"].grad[labels == -100]))
    loss, st = fused(leaves(t), torch.full_like(labels, -100), "sft", 37, 5)
    assert loss.item() == 0.0 and st["misfeedback"] == 0.0 and st["classmate_kl"] == 0.0


def test_fused_errors_are_clear():
    t, labels = setup()
    with pytest.raises(ValueError, match="classmate hidden states have 28"):
        fused(dict(t, hc=t["hc"][:-1]), labels, "sft", 37, 4)
    with pytest.raises(ValueError, match="classmate lm-head weight"):
        fused(dict(t, wc=t["wc"][:, :-1]), labels, "sft", 37, 4)
    with pytest.raises(ValueError, match="classmate lm-head weight"):
        fused(dict(t, wc=t["wc"][:30]), labels, "sft", 37, 4)
    with pytest.raises(ValueError, match="both classmate_hidden and classmate_weight"):
        kd.fused_distill_loss(t["hs"], t["ws"], None, None, labels, method="sft", vocab_size=37,
                              classmate_hidden=t["hc"])
    with pytest.raises(ValueError, match="kappa"):   # even when no token is counted
        fused(t, torch.full_like(labels, -100), "sft", 37, 4, kappa=0.0)


def test_fused_makes_no_tokens_by_vocab_tensor():
    from .test_head import LargestTensor
    N, H, V, chunk = 256, 8, 512, 16
    g = torch.Generator().manual_seed(0)
    hs, ws = torch.randn(N, H, generator=g, requires_grad=True), torch.randn(V, H, generator=g).requires_grad_()
    hc, wc = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g)
    labels = torch.randint(0, V, (N,), generator=g)
    with LargestTensor() as probe:
        loss, _ = kd.fused_distill_loss(hs, ws, None, None, labels, method="sft", chunk_size=chunk,
                                        classmate_hidden=hc, classmate_weight=wc)
        loss.backward()
    assert probe.largest <= chunk * V, (probe.largest, chunk * V)


# --- two gloo ranks: the new stats reduce like the others, also from a rank without tokens -------


def _rank(rank, world, port, t, labels, q):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        keep = torch.arange(labels.shape[0]) % world == rank
        lab = labels[keep] if rank == 0 else torch.full_like(labels[keep], -100)   # rank 1 counts nothing
        sub = {k: (v[keep] if k in ("hs", "ht", "hc") else v) for k, v in t.items()}
        loss, st = fused(leaves(sub), lab, "grkd", 37, 4, k=5, group=dist.group.WORLD)
        q.put((rank, loss.item(), st))
    finally:
        dist.destroy_process_group()


def test_two_ranks_reduce_the_stats():
    t, labels = setup()
    keep0 = torch.arange(labels.shape[0]) % 2 == 0
    ref_labels = labels.clone()
    ref_labels[~keep0] = -100                      # one process, only rank 0's counted tokens
    ref, ref_st = fused(leaves(t), ref_labels, "grkd", 37, 4, k=5)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, t, labels, q)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r, (loss, st)) for r, loss, st in (q.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for loss, st in results.values():
        assert loss == pytest.approx(ref.item(), rel=1e-12)
        for key in ("misfeedback", "classmate_kl", "loss", "tokens"):
            assert st[key] == pytest.approx(ref_st[key], rel=1e-12), key
