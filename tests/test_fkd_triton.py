"""FKD-specific cases of the Triton backend (fastkd.triton.fkd), on the harness: mixed dtypes, the
teacher slots of an ensemble, partial teacher gradients, the backward op's convention, zero rows,
Inf, the atomic (non-deterministic) reduction, the public entry points, op-level bad input and the
block configuration. The generic cases (value/gradients on odd shapes, opcheck, compile,
determinism, strided inputs) are in test_ops.py.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set by
conftest.py) whatever the host has, with 16-row x 32-column blocks; with TRITON_INTERPRET=0 on a
CUDA machine (``make test-gpu``) the same tests run compiled on the GPU, plus the ``gpu`` ones.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from harness import (  # noqa: E402
    F16,
    F32,
    F64,
    INTERPRET,
    OPS,
    TOL,
    TRITON_DEVICE,
    Case,
    Result,
    assert_close,
    assert_matches,
    needs_triton,
    needs_triton_gpu,
    oracle,
    run,
)

import fastkd  # noqa: E402
from fastkd.registry import resolve_backend  # noqa: E402
from fastkd.triton import fkd as tfkd  # noqa: E402

ops = torch.ops.fastkd_triton
pytestmark = needs_triton
FKD = OPS["fkd"]
GRAD_OUT = 0.5


def _inputs(batch, widths, dtype=F32, teacher_grad=True, **options):
    case = Case("fkd", "triton", dtype, batch, tuple(widths), "tiled", teacher_grad)
    inputs = FKD.inputs(case)
    inputs.options |= options
    return inputs


def _op_run(inputs, grad_out=GRAD_OUT):
    """Loss and gradients through the forward op's registered autograd."""
    s, *ts = leaves = inputs.leaves()
    o = inputs.options
    loss = ops.fkd_forward(s, ts, o["kd_weight"], o["fr_weight"])
    wanted = [x for x in leaves if x.requires_grad]
    if wanted:
        loss.backward(torch.tensor(grad_out, dtype=loss.dtype, device=loss.device))
    return Result(loss.detach(), [x.grad for x in leaves])


def test_float16_student_and_teacher_with_a_float32_teacher():
    # Products of fp16 numbers are exact in the fp32 accumulator, so the loss keeps fp32
    # accuracy; the fp16 gradients take the fp16 tolerance, the fp32 teacher's gradient (fp32
    # dots, but the student's fp16 rounding in its kernel) 1e-4.
    inputs = _inputs(17, (40, 33, 7), F16, kd_weight=1.0, fr_weight=0.5)
    inputs.tensors[2] = inputs.tensors[2].float()
    got, want = _op_run(inputs), oracle(FKD, inputs, GRAD_OUT)
    _, terms = FKD.terms(inputs.to64(), GRAD_OUT, F16)
    assert got.loss.dtype == F32
    assert_close(got.loss, want.loss, F32, TOL[F32].value, what="loss")
    assert [g.dtype for g in got.grads] == [F16, F16, F32]
    for i, tol in enumerate((TOL[F16].grad, TOL[F16].grad, 1e-4)):
        assert_close(got.grads[i], want.grads[i], F16, tol, terms[i], f"grad[{i}]")


@pytest.mark.parametrize("max_slots", [8, 2], ids=["own-slots", "shared-slot"])
def test_ensemble_with_teacher_gradients(monkeypatch, max_slots):
    # max_slots=2 puts two of the three teachers into the concatenated slot (and the teacher
    # being differentiated into a slot of its own).
    monkeypatch.setattr(tfkd, "MAX_TEACHER_SLOTS", max_slots)
    inputs = _inputs(17, (9, 7, 40, 3), kd_weight=0.8, fr_weight=0.1)
    assert_matches(FKD, _op_run(inputs), oracle(FKD, inputs, GRAD_OUT), inputs, GRAD_OUT)


def test_only_some_teachers_require_grad():
    inputs = _inputs(5, (6, 4, 3), fr_weight=0.0)
    inputs.requires_grad = [False, False, True]  # not even the student
    got = _op_run(inputs)
    assert got.grads[:2] == [None, None]
    assert_matches(FKD, got, oracle(FKD, inputs, GRAD_OUT), inputs, GRAD_OUT)


def test_backward_op_convention():
    s, *ts = _inputs(6, (5, 3, 4)).tensors
    grad = torch.tensor(2.0, device=TRITON_DEVICE)
    gs, gt = ops.fkd_backward(grad, s, ts, 1.0, 0.5, False)
    assert gt == [] and gs.shape == s.shape
    gs2, gt2 = ops.fkd_backward(grad, s, ts, 1.0, 0.5, True)
    assert torch.equal(gs, gs2)
    assert [g.shape for g in gt2] == [t.shape for t in ts]


def test_zero_rows():
    # normalize() maps a zero row to zeros (rho_ii = 0) and its gradient is g / eps (~1e12 g).
    inputs = _inputs(18, (7, 5), fr_weight=0.0)
    inputs.tensors[0][[0, 17]] = 0.0
    inputs.tensors[1][3] = 0.0
    zero = (inputs.tensors[0] == 0).all(1)
    want = oracle(FKD, inputs, GRAD_OUT)
    assert_matches(FKD, _op_run(inputs), want, inputs, GRAD_OUT, rows=zero)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's, in the interpreter
def test_infinite_features_give_nan_like_the_reference():
    s, t = _inputs(17, (5, 3)).tensors
    s[4, 1] = float("inf")
    assert torch.isnan(fastkd.reference.fkd_loss(s, t, 1.0, 0.1))
    assert torch.isnan(ops.fkd_forward(s, [t], 1.0, 0.1))


def test_atomic_reduction(monkeypatch):
    inputs = _inputs(33, (8, 12), fr_weight=0.3)
    monkeypatch.setattr(tfkd, "DETERMINISTIC", False)  # the module-level setting
    s, t = inputs.tensors
    loss = ops.fkd_forward(s, [t], inputs.options["kd_weight"], 0.3)
    assert_close(loss, oracle(FKD, inputs).loss, F32, TOL[F32].value)


def test_public_entry_points():
    inputs = _inputs(17, (12, 5, 9), teacher_grad=False, kd_weight=0.9, fr_weight=0.2)
    want = oracle(FKD, inputs, GRAD_OUT)
    assert_matches(FKD, run(FKD, inputs, "triton", "tiled", GRAD_OUT), want, inputs, GRAD_OUT)
    s, *ts = inputs.tensors
    with torch.no_grad():  # no input requires grad: the plain forward op, not the fused one
        loss = fastkd.fkd_loss(s, ts, 0.9, 0.2, backend="triton", algorithm="tiled")
    assert_close(loss, want.loss, F32, TOL[F32].value)
    module = fastkd.FKDLoss(0.9, 0.2, backend="triton", algorithm="tiled")
    assert_close(module(s, ts), want.loss, F32, TOL[F32].value)
    leaf = s.clone().requires_grad_()
    loss = fastkd.FKDFunction.apply("triton", "ieee", 0.9, 0.2, leaf, *ts)
    (gs,) = torch.autograd.grad(loss, leaf, torch.tensor(GRAD_OUT, device=loss.device))
    _, terms = FKD.terms(inputs.to64(), GRAD_OUT, F32)
    assert_close(gs, want.grads[0], F32, TOL[F32].grad, terms[0])
    assert resolve_backend("fkd", "triton", s.device) == "triton"
    assert "fkd" in fastkd.available_backends()["triton"]["ops"]


def test_forward_op_compiles_with_its_autograd():
    inputs = _inputs(5, (6, 3), teacher_grad=False, kd_weight=1.0, fr_weight=0.1)
    s, t = inputs.leaves()

    def loss_fn(s, t):
        return 2.0 * ops.fkd_forward(s, [t], 1.0, 0.1) + 1.0

    loss = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(s, t)
    (gs,) = torch.autograd.grad(loss, s)
    want = oracle(FKD, inputs, 2.0)
    _, terms = FKD.terms(inputs.to64(), 2.0, F32)
    assert_close(loss, 2.0 * want.loss + 1.0, F32, TOL[F32].value)
    assert_close(gs, want.grads[0], F32, TOL[F32].grad, terms[0])


def test_bad_input():
    s, t = _inputs(4, (3, 5)).tensors
    with pytest.raises(ValueError, match="student"):
        ops.fkd_forward(s[0], [t], 1.0, 0.0)
    with pytest.raises(TypeError, match="student"):
        ops.fkd_forward(s.to(torch.int32), [t], 1.0, 0.0)
    with pytest.raises(ValueError, match="teacher"):
        ops.fkd_forward(s, [_inputs(5, (5, 5)).tensors[0]], 1.0, 0.0)
    with pytest.raises(ValueError, match="teacher"):
        ops.fkd_forward(s, [], 1.0, 0.0)
    with pytest.raises(ValueError, match="teacher\\[1\\]"):
        ops.fkd_forward(s, [t, t[:, :0]], 1.0, 0.0)
    with pytest.raises(ValueError, match="kd_weight"):
        ops.fkd_forward(s, [t], float("nan"), 0.0)
    with pytest.raises(ValueError, match="grad"):
        ops.fkd_backward(torch.ones(2, device=TRITON_DEVICE), s, [t], 1.0, 0.0, False)
    if INTERPRET:
        with pytest.raises(TypeError, match="teacher\\[0\\].*bfloat16"):
            ops.fkd_forward(s, [t.bfloat16()], 1.0, 0.0)
    if INTERPRET and torch.cuda.is_available():
        with pytest.raises(ValueError, match="student"):
            ops.fkd_forward(s.cuda(), [t.cuda()], 1.0, 0.0)


def test_block_config():
    cfg = tfkd.block_config(4096, [2048, 512], F16, interpret=False)
    assert (cfg["BLOCK"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["BLOCK_DO"]) == (64, 32, 32, 128)
    small = tfkd.block_config(3, [1], F32, interpret=False)
    assert small["BLOCK"] == small["BLOCK_N"] == small["BLOCK_K"] == 16  # tl.dot needs >= 16
    assert tfkd.block_config(4096, [512], F64, interpret=False)["BLOCK_K"] == 16


# ---------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@needs_triton_gpu
def test_gpu_tf32_and_cuda_backend(monkeypatch):
    inputs = _inputs(1000, (512, 768), teacher_grad=False, kd_weight=1.0, fr_weight=0.0)
    want = oracle(FKD, inputs)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    got = _op_run(inputs, 1.0)
    # TF32 rounds the fp32 operands to 10 mantissa bits (2^-11 relative) in both products
    _, terms = FKD.terms(inputs.to64(), 1.0, F32)
    assert_close(got.loss, want.loss, F32, 1e-3)
    assert_close(got.grads[0], want.grads[0], F32, 1.4e-2, terms[0])
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    if fastkd.available_backends()["cuda"]["available"]:
        s, t = inputs.tensors
        cuda = fastkd.fkd_loss(s, t, backend="cuda", algorithm="tiled")
        triton_loss = fastkd.fkd_loss(s, t, backend="triton", algorithm="tiled")
        assert_close(triton_loss, cuda.double(), F32, TOL[F32].value)
