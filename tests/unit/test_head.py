"""The fused chunked head against the materialised computation: values, gradients, memory shape."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kd
from kd import softcap

PARAMS = {"grkd": {"k": 6, "k_student": 2}, "rlkd": {"k": 3}, "group_relative": {"k": 5},
          "rank_correlation": {"k": 4}, "jsd": {"beta": 0.3}, "skew_forward_kl": {"alpha": 0.2}}


def setup(N=23, Hs=12, Ht=16, V=37, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(N, Hs, generator=g, dtype=dtype, requires_grad=True)
    ws = (torch.randn(V, Hs, generator=g, dtype=dtype) / 2).requires_grad_()
    ht = torch.randn(N, Ht, generator=g, dtype=dtype)
    wt = torch.randn(V, Ht, generator=g, dtype=dtype) / 2
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < 0.3] = -100
    return hs, ws, ht, wt, labels


def naive(hs, ws, ht, wt, labels, method, s_cap=None, t_cap=None, **cfg):
    return kd.distill_loss(softcap(hs @ ws.T, s_cap), softcap(ht @ wt.T, t_cap), labels,
                           method=method, **cfg)


@pytest.mark.parametrize("method", kd.METHODS)
@pytest.mark.parametrize("caps", [(None, None), (30.0, 50.0)])
@pytest.mark.parametrize("chunk", [4, 7, 1024])
def test_fused_matches_materialised(method, caps, chunk):
    hs, ws, ht, wt, labels = setup()
    cfg = dict(PARAMS.get(method, {}), progress=0.4, temperature=1.3, ce_weight=0.2)
    # small caps so the softcap really bends the logits
    s_cap, t_cap = (c / 10 if c else None for c in caps)
    l1, st1 = naive(hs, ws, ht, wt, labels, method, s_cap, t_cap, **cfg)
    g1 = torch.autograd.grad(l1, (hs, ws))
    l2, st2 = kd.fused_distill_loss(hs, ws, ht, wt, labels, method=method, chunk_size=chunk,
                                    student_softcap=s_cap, teacher_softcap=t_cap, **cfg)
    g2 = torch.autograd.grad(l2, (hs, ws))
    torch.testing.assert_close(l2, l1, rtol=1e-10, atol=1e-12)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    for key, v in st1.items():
        assert st2[key] == pytest.approx(v), key


def test_fused_float32_and_bfloat16_close_to_float64():
    hs, ws, ht, wt, labels = setup(N=64, V=301)
    ref, _ = naive(hs, ws, ht, wt, labels, "grkd", progress=0.6)
    g_ref = torch.autograd.grad(ref, (hs, ws))
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        h = hs.detach().to(dtype).requires_grad_()
        w = ws.detach().to(dtype).requires_grad_()
        loss, _ = kd.fused_distill_loss(h, w, ht.to(dtype), wt.to(dtype), labels, chunk_size=16, progress=0.6)
        assert loss.dtype == torch.float32
        gh, gw = torch.autograd.grad(loss, (h, w))
        assert gh.dtype == dtype and gw.dtype == dtype
        assert loss.item() == pytest.approx(ref.item(), rel=tol)
        torch.testing.assert_close(gh.double(), g_ref[0], rtol=tol * 10, atol=tol)
        torch.testing.assert_close(gw.double(), g_ref[1], rtol=tol * 10, atol=tol)


def test_backward_scales_with_upstream_gradient_and_accumulates():
    hs, ws, ht, wt, labels = setup()
    loss, _ = kd.fused_distill_loss(hs, ws, ht, wt, labels, method="forward_kl", chunk_size=5)
    (3.0 * loss).backward()
    g3 = ws.grad.clone()
    ws.grad = None
    ref, _ = naive(hs, ws, ht, wt, labels, "forward_kl")
    ref.backward()
    torch.testing.assert_close(g3, 3.0 * ws.grad)


def test_padded_vocab_rows_get_no_gradient():
    hs, ws, ht, wt, labels = setup(V=37)
    labels = labels.clamp_max(29)
    ws_pad = torch.cat([ws.detach(), torch.randn(3, ws.shape[1], dtype=ws.dtype)]).requires_grad_()
    with pytest.raises(ValueError, match="vocab_size=37"):
        kd.fused_distill_loss(hs, ws_pad, ht, wt, labels, method="forward_kl")
    l1, _ = kd.fused_distill_loss(hs, ws_pad, ht, wt, labels, method="forward_kl", vocab_size=37)
    l2, _ = naive(hs, ws, ht, wt, labels, "forward_kl")
    assert l1.item() == pytest.approx(l2.item())
    l1.backward()
    assert torch.equal(ws_pad.grad[37:], torch.zeros(3, ws.shape[1], dtype=ws.dtype))


def test_sft_without_teacher_and_all_masked_batch():
    hs, ws, _, _, labels = setup()
    l1, _ = kd.fused_distill_loss(hs, ws, None, None, labels, method="sft", chunk_size=4)
    l2, _ = kd.distill_loss(hs @ ws.T, None, labels, method="sft")
    assert l1.item() == pytest.approx(l2.item())
    loss, stats = kd.fused_distill_loss(hs, ws, None, None, torch.full_like(labels, -100), method="sft")
    loss.backward()
    assert loss.item() == 0.0 and stats["tokens"] == 0
    assert torch.equal(hs.grad, torch.zeros_like(hs))


def test_no_grad_mode_computes_value_only():
    hs, ws, ht, wt, labels = setup()
    with torch.no_grad():
        loss, _ = kd.fused_distill_loss(hs, ws, ht, wt, labels, method="grkd")
    assert not loss.requires_grad
    ref, _ = naive(hs, ws, ht, wt, labels, "grkd")
    assert loss.item() == pytest.approx(ref.item())


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op produces (values, grads and temporaries alike)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("method", ["grkd", "rlkd", "jsd"])
def test_no_tokens_by_vocab_tensor_is_ever_made(method):
    N, H, V, chunk = 256, 8, 512, 16
    hs, ws, ht, wt, labels = setup(N=N, Hs=H, Ht=H, V=V, dtype=torch.float32)
    with LargestTensor() as probe:
        loss, _ = kd.fused_distill_loss(hs, ws, ht, wt, labels, method=method, chunk_size=chunk,
                                        **PARAMS.get(method, {}))
        loss.backward()
    assert probe.largest <= chunk * V, (probe.largest, chunk * V)
    with LargestTensor() as probe:
        naive(hs, ws, ht, wt, labels, method, **PARAMS.get(method, {}))[0].backward()
    assert probe.largest >= N * V // 2   # the probe does see the materialised logits


def test_shape_errors_are_clear():
    hs, ws, ht, wt, labels = setup()
    with pytest.raises(ValueError, match="labels have 22 positions"):
        kd.fused_distill_loss(hs, ws, ht, wt, labels[:-1])
    with pytest.raises(ValueError, match="teacher hidden states have 22"):
        kd.fused_distill_loss(hs, ws, ht[:-1], wt, labels)
    with pytest.raises(ValueError, match="needs teacher"):
        kd.fused_distill_loss(hs, ws, None, None, labels, method="grkd")


def test_bfloat16_lm_head_gradient_is_summed_in_float32():
    """Over many chunks, the bf16 weight gradient is one rounding of the float32 sum (summing in
    bf16 chunk by chunk loses the small contributions and drifts further with every chunk)."""
    hs, ws, ht, wt, labels = setup(N=512, Hs=8, V=40, seed=3)
    labels[:] = labels.abs()                     # every row counted: 512 chunks of one token
    h = hs.detach().bfloat16().requires_grad_()
    w = ws.detach().bfloat16().requires_grad_()
    loss, _ = kd.fused_distill_loss(h, w, ht.bfloat16(), wt.bfloat16(), labels, method="forward_kl", chunk_size=1)
    gw = torch.autograd.grad(loss, w)[0]
    # reference: the same bf16 inputs, per-token logit gradients rounded to bf16 as in the head,
    # summed in float64
    with torch.enable_grad():
        x = (h.detach() @ w.detach().T).double().requires_grad_()
        ref_loss, _ = kd.distill_loss(x, (ht.bfloat16() @ wt.bfloat16().T).double(), labels, method="forward_kl")
        gx = torch.autograd.grad(ref_loss * labels.numel(), x)[0].bfloat16().double()
    ref = (gx.T @ h.detach().double()) / labels.numel()
    err = (gw.double() - ref).abs()
    ulp = ref.abs() * 2.0 ** -8 + 1e-6
    assert (err <= ulp).float().mean() > 0.99, float((err / ulp).max())
