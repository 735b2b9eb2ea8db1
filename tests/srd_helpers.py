"""What the SRD test modules (CPU, CUDA, Triton) share, on top of tests/harness.py: SRD cases,
the identical-inputs and non-finite-batch checks, and the large-offset inputs with their shifted
float64 oracle."""

from __future__ import annotations

import math

import torch
from harness import F32, F64, OPS, Case, Inputs, assert_close, assert_matches, oracle, run

SRD = OPS["srd"]
GRAD_OUT = 1.3


def srd_case(batch, width, dtype=F32, p=4.0, training=True, backend="cpu", **opts):
    """An SRD case (opts: ``offset`` of the student, ``teacher_grad``)."""
    tg = opts.pop("teacher_grad", True)
    options = tuple(sorted({"p": p, "training": training, **opts}.items()))
    return Case("srd", backend, dtype, batch, (width,), "auto", tg, options)


def check_identical_inputs(inputs: Inputs, backend: str) -> None:
    """Identical inputs (and running statistics): loss log(float32's tiny) exactly, finite, and
    gradients exactly zero (the terms are zero: harness.srd_terms)."""
    s = inputs.tensors[0]
    inputs.tensors = [s, s.clone()]
    if inputs.buffers is not None:
        inputs.buffers[2:] = [b.clone() for b in inputs.buffers[:2]]
    got = run(SRD, inputs, backend, "auto", GRAD_OUT)
    tiny = torch.tensor(torch.finfo(F32).tiny, dtype=got.loss.dtype)
    assert got.loss.item() == torch.log(tiny).item()
    assert all(torch.all(g == 0) for g in got.grads)
    assert_matches(SRD, got, oracle(SRD, inputs, GRAD_OUT), inputs, GRAD_OUT)


def check_nan_keeps_student_stats(inputs: Inputs, backend: str) -> None:
    """A train-mode call with a NaN student feature: NaN loss, the student's running statistics
    as they were, the (finite) teacher side's updated like the reference's."""
    inputs.tensors[0][inputs.tensors[0].shape[0] // 2, 0] = float("nan")
    got = run(SRD, inputs, backend, "auto", GRAD_OUT)
    want = oracle(SRD, inputs, GRAD_OUT)
    assert math.isnan(got.loss.item()) and math.isnan(want.loss.item())
    assert torch.equal(got.buffers[0], inputs.buffers[0])
    assert torch.equal(got.buffers[1], inputs.buffers[1])
    assert not torch.equal(got.buffers[2], inputs.buffers[2])
    for b, w in zip(got.buffers[2:], want.buffers[2:], strict=True):
        assert_close(b, w, F32, 1e-6)


def large_offset_inputs(dtype):
    """Features around 1e4 and -3e4, some columns spread over a few ulps only."""
    inputs = SRD.inputs(srd_case(130, 64, F64))
    student, teacher = inputs.tensors
    student = student + 1e4
    student[:, :8] = 1e4 + 1e-3 * student[:, :8]
    teacher[:, 8:16] = -3e4 + 0.01 * teacher[:, 8:16]
    inputs.buffers[0] += 1e4
    inputs.tensors = [student.to(dtype), teacher.to(dtype)]
    return inputs


def shifted_oracle(inputs: Inputs):
    """The float64 reference on inputs shifted by their first row: the shift is exact (nearby
    values) and leaves loss and gradients unchanged, while the plain float64 reference loses
    digits to the offset (1e4 / std 2e-3 times float64's eps)."""
    s, t = (x.double() for x in inputs.tensors)
    x0, t0 = s[0].clone(), t[0].clone()
    rm_s, rv_s, rm_t, rv_t = (b.double() for b in inputs.buffers)
    shifted = Inputs([s - x0, t - t0], inputs.requires_grad, inputs.options)
    shifted.buffers = [rm_s - x0, rv_s, rm_t - t0, rv_t]
    return shifted, oracle(SRD, shifted, GRAD_OUT)
