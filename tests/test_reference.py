"""The reference against SPEC.md written out independently (tests/spec_formulas.py), and its
autograd gradients against the SPEC gradient formulas."""

import pytest
import spec_formulas as spec
import torch
from harness import F64, OPS, TOL, Inputs, assert_close

from fastkd import reference


def _rand(*shape):
    return torch.randn(*shape, dtype=torch.float64)


@pytest.mark.parametrize("b,ds,dts", [(2, 1, [3]), (3, 4, [2]), (5, 3, [4, 1, 6])])
def test_fkd_value_and_grad_match_spec(b, ds, dts):
    s = _rand(b, ds).requires_grad_()
    ts = [_rand(b, d) for d in dts]
    s.data[0] = 0.0  # a zero row: normalises to zeros, never NaN
    loss = reference.fkd_loss(s, ts, kd_weight=0.7, fr_weight=0.3)
    expected = spec.fkd(s.tolist(), [t.tolist() for t in ts], 0.7, 0.3)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    (grad,) = torch.autograd.grad(loss, s)
    want = torch.tensor(
        spec.fkd_student_grad(s.tolist(), [t.tolist() for t in ts], 0.7, 0.3), dtype=torch.float64
    )
    x = Inputs([s.detach(), *ts], [True] * (1 + len(ts)), {"kd_weight": 0.7, "fr_weight": 0.3})
    _, terms = OPS["fkd"].terms(x, 1.0, F64)
    assert_close(grad, want, F64, TOL[F64].grad, terms[0])


def test_fkd_half_inputs_accumulate_in_float32():
    s, t = torch.randn(9, 5).half(), torch.randn(9, 3).bfloat16()
    loss = reference.fkd_loss(s, t)
    assert loss.dtype == torch.float32
    want = spec.fkd(s.double().tolist(), [t.double().tolist()], 1.0, 0.0)
    assert loss.item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("b,d", [(2, 3), (5, 4), (7, 1)])
def test_sp_matches_spec(b, d):
    s, t = _rand(b, d), _rand(b, d + 2)
    assert reference.sp_loss(s, t).item() == pytest.approx(spec.sp(s.tolist(), t.tolist()))


def test_sp_flattens_feature_maps():
    s, t = _rand(4, 2, 3, 3), _rand(4, 5, 2, 2)
    want = spec.sp(s.flatten(1).tolist(), t.flatten(1).tolist())
    assert reference.sp_loss(s, t).item() == pytest.approx(want)


@pytest.mark.parametrize("b,d", [(2, 3), (5, 4), (6, 2)])
def test_rkd_distance_matches_spec(b, d):
    s, t = _rand(b, d), 3.0 * _rand(b, d + 1)
    got = reference.rkd_distance_loss(s, t).item()
    assert got == pytest.approx(spec.rkd_distance(s.tolist(), t.tolist()), rel=1e-12)


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, 4.0, 4.5])
@pytest.mark.parametrize("b,d", [(2, 3), (5, 4), (7, 1)])
def test_srd_value_and_grad_match_spec(b, d, p):
    zs, zt = _rand(b, d).requires_grad_(), _rand(b, d)
    loss = reference.srd_loss(zs, zt, p=p)
    assert loss.item() == pytest.approx(spec.srd(zs.tolist(), zt.tolist(), p, 1e-4), rel=1e-12)
    (grad,) = torch.autograd.grad(loss, zs)
    want = torch.tensor(
        spec.srd_student_grad(zs.tolist(), zt.tolist(), p, 1e-4), dtype=torch.float64
    )
    # B = 2 normalises every column to +-1: the gradient cancels far below its terms
    x = Inputs([zs.detach(), zt], [True, False], {"p": p, "training": True})
    _, terms = OPS["srd"].terms(x, 1.0, F64)
    assert_close(grad, want, F64, TOL[F64].grad, terms[0])


def test_srd_running_stats_follow_batchnorm1d():
    b, d = 6, 5
    bn_s = torch.nn.BatchNorm1d(d, eps=1e-4, affine=False, dtype=torch.float64)
    bn_t = torch.nn.BatchNorm1d(d, eps=1e-4, affine=False, dtype=torch.float64)
    rm_s, rv_s = torch.zeros(d, dtype=torch.float64), torch.ones(d, dtype=torch.float64)
    rm_t, rv_t = rm_s.clone(), rv_s.clone()
    for _ in range(3):
        zs, zt = _rand(b, d) * 2 + 1, _rand(b, d) - 3
        loss = reference.srd_loss(zs, zt, 4.0, 1e-4, True, rm_s, rv_s, rm_t, rv_t, 0.1)
        want = (bn_s(zs) - bn_t(zt)).abs().pow(4).sum().log()
        assert loss.item() == pytest.approx(want.item(), rel=1e-12)
    torch.testing.assert_close(rm_s, bn_s.running_mean)
    torch.testing.assert_close(rv_s, bn_s.running_var)
    torch.testing.assert_close(rm_t, bn_t.running_mean)
    torch.testing.assert_close(rv_t, bn_t.running_var)
    bn_s.eval(), bn_t.eval()
    zs, zt = _rand(3, d), _rand(3, d)
    loss = reference.srd_loss(zs, zt, 4.0, 1e-4, False, rm_s, rv_s, rm_t, rv_t)
    want = (bn_s(zs) - bn_t(zt)).abs().pow(4).sum().log()
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)


def test_srd_nonfinite_batch_leaves_running_stats():
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    zs = _rand(4, 3)
    zs[1, 2] = float("nan")
    loss = reference.srd_loss(zs, _rand(4, 3), 4.0, 1e-4, True, rm, rv, rm.clone(), rv.clone())
    assert torch.isnan(loss)
    assert torch.equal(rm, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(rv, torch.ones(3, dtype=torch.float64))


def test_srd_identical_inputs_finite_with_zero_grad():
    z = _rand(5, 4).requires_grad_()
    loss = reference.srd_loss(z, z.detach().clone())
    assert torch.isfinite(loss)
    (grad,) = torch.autograd.grad(loss, z)
    assert torch.equal(grad, torch.zeros_like(grad))
