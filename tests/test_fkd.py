"""FKD-specific cases on the CPU backend (tiled kernel and dual algorithm), on the harness: teacher
ensembles of different widths, symmetric teacher gradients, zero rows, only some teachers
requiring grad, the dual's float64 accuracy and its cancellation, the cost model. The generic
value/gradient/opcheck/compile/... cases of every backend are in test_ops.py."""

import pytest
import torch
from harness import (
    F32,
    F64,
    OPS,
    Case,
    Result,
    Tol,
    assert_matches,
    needs_cpu_kernels,
    oracle,
    run,
)

pytestmark = needs_cpu_kernels
ALGORITHMS = ["tiled", "dual"]
FKD = OPS["fkd"]
GRAD_OUT = 0.6


def _check(case: Case, inputs=None, tol=None, rows=None):
    inputs = inputs or FKD.inputs(case)
    got = run(FKD, inputs, case.backend, case.algorithm, GRAD_OUT)
    want = oracle(FKD, inputs, GRAD_OUT)
    assert_matches(FKD, got, want, inputs, GRAD_OUT, tol, case.id, rows)
    return got


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("widths", [[5], [3, 17], [1, 64, 9], [8, 8, 30, 2]])
def test_ensemble_of_teachers_with_different_widths(widths, algorithm):
    opts = (("fr_weight", 0.0), ("kd_weight", 1.3))
    _check(Case("fkd", "cpu", F64, 41, (12, *widths), algorithm, False, opts))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_teachers_requiring_grad_get_the_symmetric_gradient(algorithm):
    # 300 rows: more than one 256-row tile
    opts = (("fr_weight", 0.1), ("kd_weight", 0.9))
    got = _check(Case("fkd", "cpu", F64, 300, (10, 6, 19), algorithm, True, opts))
    assert all(g is not None for g in got.grads)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_zero_rows_are_finite_and_match_reference(algorithm):
    # normalize() maps a zero row to zeros (rho_ii = 0); its gradient is G_i / eps (~1e12 G_i)
    case = Case("fkd", "cpu", F64, 19, (8, 5), algorithm, True, (("fr_weight", 0.5),))
    inputs = FKD.inputs(case)
    inputs.tensors[0][[0, 7]] = 0.0
    inputs.tensors[1][[7, 11]] = 0.0
    got = _check(case, inputs, rows=(inputs.tensors[0] == 0).all(1))
    assert torch.isfinite(got.loss) and all(torch.isfinite(g).all() for g in got.grads)


def test_op_autograd_with_only_some_teachers_requiring_grad():
    case = Case("fkd", "cpu", F64, 21, (3, 5, 2), "tiled", True)
    inputs = FKD.inputs(case)
    inputs.requires_grad = [True, True, False]
    s, t1, t2 = inputs.leaves()
    loss = torch.ops.fastkd.fkd_forward(s, [t1, t2], 0.8, 0.05)
    loss.backward(torch.tensor(GRAD_OUT, dtype=F64))
    want = oracle(FKD, inputs, GRAD_OUT)
    assert t2.grad is None
    got = Result(loss.detach(), [s.grad, t1.grad, None])
    assert_matches(FKD, got, want, inputs, GRAD_OUT)


@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
@pytest.mark.parametrize("b,widths", [(513, (7, 64)), (1000, (16, 5, 40)), (4000, (3, 2))])
def test_dual_matches_reference_to_1e6(b, widths, dtype):
    # The dual algorithm works in float64 whatever the input, so even float32 inputs land within
    # 1e-6 of the float64 reference (value and gradients), teachers requiring grad included.
    case = Case("fkd", "cpu", dtype, b, widths, "dual", True)
    _check(case, tol=Tol(1e-6, 1e-6) if dtype == F32 else None)


def test_dual_survives_cancellation_when_student_equals_teacher():
    gen = torch.Generator().manual_seed(12)
    t = torch.randn(2000, 16, generator=gen)
    s = t + 1e-4 * torch.randn(2000, 16, generator=gen)
    case = Case("fkd", "cpu", F32, 2000, (16, 16), "dual", False, (("fr_weight", 0.0),))
    inputs = FKD.inputs(case)
    inputs.tensors = [s, t]
    _check(case, inputs)


def test_auto_algorithm_cost_model():
    from fastkd.losses.fkd import choose_algorithm

    assert choose_algorithm("auto", 16384, 128, 128) == "dual"
    assert choose_algorithm("auto", 256, 2048, 2048) == "tiled"
    assert choose_algorithm("tiled", 16384, 1, 1) == "tiled"
    with pytest.raises(ValueError, match="algorithm"):
        choose_algorithm("fast", 4, 4, 4)
