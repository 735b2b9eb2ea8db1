"""SP and RKD distance against SPEC.md written out independently (tests/spec_formulas.py): the
value, and the gradients of student and teacher by central differences of those formulas, for
the explicit and dual SP algorithms and the fused RKD kernels. Plus the SP dual's own cases (a
zero row, float32 near cancellation). The generic cases are in test_ops.py."""

import pytest
import spec_formulas as spec
import torch
from harness import (
    F32,
    F64,
    OPS,
    TOL,
    Case,
    assert_close,
    assert_matches,
    needs_cpu_kernels,
    needs_triton,
    oracle,
    run,
)

import fastkd
from fastkd import reference

GRAD_OUT = -1.3
SPEC = {"sp": spec.sp, "rkd": spec.rkd_distance}
PATHS = [
    pytest.param("sp", "reference", "explicit", id="sp-explicit"),
    pytest.param("sp", "reference", "dual", id="sp-dual"),
    pytest.param("rkd", "reference", "auto", id="rkd-reference"),
    pytest.param("rkd", "cpu", "tiled", id="rkd-cpu", marks=needs_cpu_kernels),
    pytest.param("rkd", "triton", "tiled", id="rkd-triton", marks=needs_triton),
]


@pytest.mark.parametrize("op_name,backend,algorithm", PATHS)
def test_sp_and_rkd_match_spec_with_gradients(op_name, backend, algorithm):
    op = OPS[op_name]
    inputs = op.inputs(Case(op_name, backend, F64, 7, (6, 5), algorithm))
    s, t = inputs.tensors
    inputs.tensors = [s.reshape(7, 3, 2), t]  # a feature map: flattened to (B, D)
    got = run(op, inputs, backend, algorithm, GRAD_OUT)
    rows = [x.flatten(1).tolist() for x in inputs.tensors]
    assert got.loss.item() == pytest.approx(SPEC[op_name](*rows), rel=1e-12)
    for i, fd in enumerate(spec.numerical_gradient(SPEC[op_name], rows)):
        want = GRAD_OUT * torch.tensor(fd, dtype=F64).reshape(inputs.tensors[i].shape)
        assert_close(got.grads[i], want, F64, 1e-6, what=f"grad[{i}]")


@pytest.mark.parametrize("b,widths", [(2, (1, 3)), (17, (5, 8)), (130, (7, 3)), (300, (16, 40))])
def test_sp_dual_with_a_zero_teacher_row(b, widths):
    # a zero row: its normalised Gram row is zero on both paths
    op = OPS["sp"]
    inputs = op.inputs(Case("sp", "reference", F64, b, widths, "dual"))
    inputs.tensors[1][1] = 0.0
    got = run(op, inputs, "reference", "dual", GRAD_OUT)
    assert_matches(op, got, oracle(op, inputs, GRAD_OUT), inputs, GRAD_OUT)


def test_sp_dual_float32_near_cancellation():
    gen = torch.Generator().manual_seed(2)
    t = torch.randn(2000, 8, generator=gen)
    s = t + 1e-3 * torch.randn(2000, 8, generator=gen)
    got = fastkd.sp_loss(s, t, algorithm="dual")
    assert got.dtype == F32
    want = reference.sp_loss(s.double(), t.double())
    assert_close(got, want, F32, TOL[F32].value)
    assert fastkd.SPLoss(algorithm="dual")(s, t).item() == got.item()
    with pytest.raises(ValueError, match="algorithm"):
        fastkd.sp_loss(s, t, algorithm="tiled")
