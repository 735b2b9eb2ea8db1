"""Shared helpers of the SRD tests: float64 reference runs, fused runs, relative errors."""

from __future__ import annotations

import math

import torch

import fastkd
from fastkd import reference

# Relative tolerance of the fused backends against the float64 reference, per input dtype.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def make_inputs(batch, width, dtype=torch.float32, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, width, generator=g, dtype=torch.float64) * 2.0 + offset
    teacher = torch.randn(batch, width, generator=g, dtype=torch.float64) * 0.5 - 1.0
    return student.to(dtype), teacher.to(dtype)


def make_buffers(width, seed=1):
    """Running (mean_s, var_s, mean_t, var_t) in float32, as nn.BatchNorm1d keeps them."""
    g = torch.Generator().manual_seed(seed)
    mean_s, mean_t = torch.randn(2, width, generator=g)
    var_s, var_t = torch.rand(2, width, generator=g) * 2.0 + 0.25
    return [mean_s, var_s, mean_t, var_t]


def run(backend, student, teacher, p, training, buffers=None, teacher_grad=True, eps=1e-4):
    """Loss, gradients and the (updated) buffer copies of one srd_loss call.

    backend "reference64" is the oracle: the reference on float64 copies of the inputs.
    """
    if backend == "reference64":
        student, teacher = student.double(), teacher.double()
    xs = student.detach().clone().requires_grad_(True)
    xt = teacher.detach().clone().requires_grad_(teacher_grad)
    bufs = [b.clone() for b in buffers] if buffers is not None else [None] * 4
    if backend == "reference64":
        loss = reference.srd_loss(xs, xt, p, eps, training, *bufs)
    else:
        loss = fastkd.srd_loss(xs, xt, p, eps, training, *bufs, backend=backend)
    loss.backward()
    return loss.detach(), xs.grad, xt.grad, bufs


def rel_err(actual, expected, scale=0.0) -> float:
    """max |actual - expected| / max(max |expected|, scale): a scale-aware relative error."""
    a, e = actual.detach().double(), expected.detach().double()
    scale = max(e.abs().max().item(), scale)
    return (a - e).abs().max().item() / (scale if scale > 0 else 1.0)


def train_grad_scales(student, teacher, p, eps=1e-4):
    """Size of the terms of the train-mode gradient, max |g| * max rstd per side (g = dL/ds).

    d zs = (g - mean_b g - s mean_b(g s)) rstd cancels down to O(eps / var) of its terms when
    B = 2 (every column normalises to +-1): a rounding error is small next to the terms, not
    next to the result, so the gradients are compared on this scale too.
    """
    zs, zt = student.double(), teacher.double()
    var_s, var_t = zs.var(0, unbiased=False), zt.var(0, unbiased=False)
    s = (zs - zs.mean(0)) / (var_s + eps).sqrt()
    t = (zt - zt.mean(0)) / (var_t + eps).sqrt()
    d = s - t
    g = p * d.abs().pow(p - 1) / d.abs().pow(p).sum()
    g_max = g.abs().max().item()
    return g_max * (var_s + eps).rsqrt().max().item(), g_max * (var_t + eps).rsqrt().max().item()


def assert_matches(fused, ref, tol, *, scales=(0.0, 0.0), buffers_tol=None, what=""):
    """Compare two ``run`` results: loss, both gradients (on ``scales`` at least), buffers."""
    loss, gs, gt, bufs = fused
    rloss, rgs, rgt, rbufs = ref
    assert rel_err(loss, rloss) <= tol, f"{what} loss {loss.item()} vs {rloss.item()}"
    err = rel_err(gs, rgs, scales[0])
    assert err <= tol, f"{what} student grad error {err:.3g}"
    if gt is not None:
        err = rel_err(gt, rgt, scales[1])
        assert err <= tol, f"{what} teacher grad error {err:.3g}"
    for b, rb in zip(bufs, rbufs, strict=True):
        if b is not None:
            assert rel_err(b, rb) <= (buffers_tol or max(tol, 1e-6)), f"{what} running stats"


def opcheck_srd_ops(forward_op, backward_op, student, teacher, buffers, grad=None):
    """torch.library.opcheck of an SRD forward op in training and eval mode (p = 4), and of
    its backward op on the forward's outputs with upstream ``grad`` unless backward_op is None."""
    for training in (True, False):
        args = (
            student.clone().requires_grad_(),
            teacher.clone().requires_grad_(),
            4.0,
            1e-4,
            training,
            *buffers,
        )
        torch.library.opcheck(forward_op, args)
        if backward_op is None:
            continue
        out = forward_op(*[a.detach() if torch.is_tensor(a) else a for a in args])
        bwd = (grad, student, teacher, 4.0, training, *out[1:], True)
        torch.library.opcheck(backward_op, bwd)


def assert_log_tiny_and_zero_grads(result):
    """A ``run`` on identical inputs: loss log(float32's tiny) (finite), zero gradients."""
    loss, gs, gt, _ = result
    tiny = torch.tensor(torch.finfo(torch.float32).tiny, dtype=loss.dtype)
    assert loss.item() == torch.log(tiny).item()
    assert torch.all(gs == 0) and torch.all(gt == 0)


def assert_nan_loss_keeps_student_stats(result, buffers):
    """A train-mode ``run`` with a non-finite student feature: NaN loss, and the student's
    running statistics left as they were."""
    loss, _, _, bufs = result
    assert math.isnan(loss.item())
    assert torch.equal(bufs[0], buffers[0]) and torch.equal(bufs[1], buffers[1])


def assert_same_runs(first, second):
    """Two ``run`` results are bitwise equal: loss and both gradients."""
    for a, b in zip(first[:3], second[:3], strict=True):
        assert torch.equal(a, b)
