"""SP and RKD-distance through the public API (reference backend) and their bad-input errors.
The RKD CPU kernel has its own tests (test_rkd.py)."""

import functools

import pytest
import torch

import fastkd
from fastkd import reference


def test_sp_and_rkd_match_reference_with_gradients():
    torch.manual_seed(1)
    s = torch.randn(17, 3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(17, 7, dtype=torch.float64)
    rkd = functools.partial(fastkd.rkd_distance_loss, backend="reference")
    for fn, mod, ref in [
        (fastkd.sp_loss, fastkd.SPLoss(), reference.sp_loss),
        (rkd, fastkd.RKDDistanceLoss(backend="reference"), reference.rkd_distance_loss),
    ]:
        got = fn(s, t)
        want = ref(s, t)
        assert got.item() == want.item() == mod(s, t).item()
        (g,) = torch.autograd.grad(got, s)
        (w,) = torch.autograd.grad(want, s)
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    small = s[:5, 0].detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: fastkd.rkd_distance_loss(x, t[:5]), (small,))
    assert torch.autograd.gradcheck(lambda x: fastkd.sp_loss(x, t[:5]), (small,))


@pytest.mark.parametrize("fn", [fastkd.sp_loss, fastkd.rkd_distance_loss])
def test_relational_bad_input(fn):
    with pytest.raises(ValueError, match="at least 2"):
        fn(torch.randn(1, 3), torch.randn(1, 3))
    with pytest.raises(ValueError, match="batch size"):
        fn(torch.randn(3, 3), torch.randn(4, 3))
    with pytest.raises(ValueError, match="feature dimension"):
        fn(torch.randn(3), torch.randn(3))
    with pytest.raises(TypeError, match="teacher"):
        fn(torch.randn(3, 2), [1, 2, 3])
    with pytest.raises(TypeError, match="float"):
        fn(torch.randn(3, 2), torch.ones(3, 2, dtype=torch.int32))


@pytest.mark.parametrize("b,ds,dt", [(2, 1, 3), (17, 5, 8), (130, 7, 3), (300, 16, 40)])
def test_sp_dual_matches_reference(b, ds, dt):
    torch.manual_seed(b + ds)
    s = torch.randn(b, ds, dtype=torch.float64, requires_grad=True)
    t = torch.randn(b, dt, dtype=torch.float64)
    t[1] = 0.0  # a zero row: its normalised Gram row is zero on both paths
    got = fastkd.sp_loss(s, t, algorithm="dual")
    want = reference.sp_loss(s, t)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    (g,) = torch.autograd.grad(got, s)
    (w,) = torch.autograd.grad(want, s)
    torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12 * w.abs().max().item())


def test_sp_dual_float32_near_cancellation():
    torch.manual_seed(2)
    t = torch.randn(2000, 8)
    s = t + 1e-3 * torch.randn(2000, 8)
    got = fastkd.sp_loss(s, t, algorithm="dual")
    assert got.dtype == torch.float32
    want = reference.sp_loss(s.double(), t.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
    assert fastkd.SPLoss(algorithm="dual")(s, t).item() == got.item()
    with pytest.raises(ValueError, match="algorithm"):
        fastkd.sp_loss(s, t, algorithm="tiled")
