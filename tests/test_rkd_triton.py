"""Triton RKD-distance backend (fastkd.triton.rkd) against the float64 reference of SPEC §2.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set
by conftest.py), with 16-row tiles, 32-row column blocks, 32-wide feature chunks and 32-wide
output chunks: the shapes below cover several blocks of each, partial ones included. With
TRITON_INTERPRET=0 on a CUDA machine the same tests run on the GPU, plus the ``gpu`` ones.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from triton_helpers import DEVICE, INTERPRET, features, needs_gpu, runs_here  # noqa: E402

import fastkd  # noqa: E402
from fastkd import reference  # noqa: E402
from fastkd.triton import rkd as _registers_the_ops  # noqa: E402, F401

ops = torch.ops.fastkd_triton
pytestmark = runs_here


def reference_rkd(student, teacher, grad=1.0):
    """Loss and gradients (times ``grad``) of the float64 reference on upcast inputs."""
    s = student.detach().double().requires_grad_()
    t = teacher.detach().double().requires_grad_()
    loss = reference.rkd_distance_loss(s, t)
    loss.backward(torch.tensor(grad, dtype=torch.float64, device=loss.device))
    return loss.detach(), s.grad, t.grad


def assert_close(actual, expected, rtol, atol_rel=None):
    """Elementwise |a - e| <= rtol |e| + atol_rel max|e| (atol_rel defaults to rtol), and at
    least 1e-20 absolute: with B = 2 both normalised distances are 1, the loss and gradients
    exactly 0, and the kernels' rounding leaves ~1e-33."""
    expected = expected.double()
    atol = max((rtol if atol_rel is None else atol_rel) * expected.abs().max().item(), 1e-20)
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize(
    "batch, ds, dt, dtype, rtol",
    [
        (2, 1, 7, torch.float64, 1e-12),
        (3, 7, 1, torch.float64, 1e-12),
        (45, 40, 33, torch.float64, 1e-12),
        (17, 65, 3, torch.float32, 1e-5),
        (45, 33, 40, torch.float32, 1e-5),
    ],
    ids=str,
)
def test_matches_reference_with_both_gradients(batch, ds, dt, dtype, rtol):
    torch.manual_seed(batch + ds)
    student, teacher = features(batch, ds, dtype), features(batch, dt, dtype)
    loss, gs, gt = ops.rkd_forward_backward(student, teacher, True)
    ref_loss, ref_gs, ref_gt = reference_rkd(student, teacher)
    assert loss.dtype == dtype and gs.dtype == gt.dtype == dtype
    assert_close(loss, ref_loss, rtol)
    assert_close(gs, ref_gs, rtol)
    assert_close(gt, ref_gt, rtol)


def test_float16_inputs_accumulate_in_float32():
    torch.manual_seed(1)
    student, teacher = features(40, 20, torch.float16), features(40, 9, torch.float16)
    loss, gs, _ = ops.rkd_forward_backward(student, teacher, False)
    ref_loss, ref_gs, _ = reference_rkd(student, teacher)
    assert loss.dtype == torch.float32 and gs.dtype == torch.float16
    assert_close(loss, ref_loss, 1e-5)
    # W rounded to fp16 for the tensor cores, then the gradient itself: ~2 fp16 roundings
    assert_close(gs, ref_gs, 4e-3)


def test_public_api_autograd_and_upstream_gradient():
    torch.manual_seed(2)
    student = features(33, 10, requires_grad=True)
    teacher = features(33, 6, requires_grad=True)
    loss = fastkd.rkd_distance_loss(student, teacher, backend="triton")
    gs, gt = torch.autograd.grad(-3.0 * loss, (student, teacher))
    ref_loss, ref_gs, ref_gt = reference_rkd(student, teacher, grad=-3.0)
    assert_close(loss.detach(), ref_loss, 1e-5)
    assert_close(gs, ref_gs, 1e-5)
    assert_close(gt, ref_gt, 1e-5)
    # the forward op's own autograd and the backward op agree with it
    loss2 = ops.rkd_forward(student, teacher)
    (gs2,) = torch.autograd.grad(loss2, student)
    assert_close(gs2, ref_gs / -3.0, 1e-5)
    grad = torch.tensor(-3.0, device=DEVICE)
    bs, bt = ops.rkd_backward(grad, student.detach(), teacher.detach(), False)
    assert_close(bs, ref_gs, 1e-5)
    assert bt.numel() == 0


def test_matches_cpu_kernel_and_strided_inputs():
    if not fastkd.available_backends()["cpu"]["available"] or DEVICE != "cpu":
        pytest.skip("compares with the CPU kernel on CPU tensors")
    torch.manual_seed(3)
    student = torch.randn(40, 2, 37, dtype=torch.float64)[:, 1]  # strided (40, 37)
    teacher = torch.randn(19, 40, dtype=torch.float64).T  # (40, 19), column-major
    got = ops.rkd_forward_backward(student, teacher, True)
    want = torch.ops.fastkd.rkd_forward_backward(student, teacher, True)
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, 1e-12)


def test_duplicate_rows_and_nan():
    torch.manual_seed(4)
    student = features(20, 5, torch.float64)
    student[7] = student[3]
    teacher = features(20, 4, torch.float64)
    loss, gs, gt = ops.rkd_forward_backward(student, teacher, True)
    ref_loss, ref_gs, ref_gt = reference_rkd(student, teacher)
    assert_close(loss, ref_loss, 1e-12)
    assert_close(gs, ref_gs, 1e-12)
    student[2, 1] = float("nan")
    assert torch.isnan(ops.rkd_forward(student, teacher))


def test_deterministic_runs_are_bit_identical():
    torch.manual_seed(5)
    student, teacher = features(50, 12), features(50, 8)
    a = ops.rkd_forward_backward(student, teacher, True)
    b = ops.rkd_forward_backward(student, teacher, True)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_opcheck():
    torch.manual_seed(6)
    student = features(5, 4, requires_grad=True)
    teacher = features(5, 3)
    torch.library.opcheck(ops.rkd_forward, (student, teacher))
    torch.library.opcheck(ops.rkd_forward, (student, teacher.clone().requires_grad_()))
    grad = torch.tensor(0.5, device=DEVICE)
    for teacher_grad in (False, True):
        torch.library.opcheck(ops.rkd_backward, (grad, student.detach(), teacher, teacher_grad))
        torch.library.opcheck(ops.rkd_forward_backward, (student.detach(), teacher, teacher_grad))


def test_torch_compile_fullgraph_training_step():
    torch.manual_seed(7)
    layer = torch.nn.Linear(4, 6).to(DEVICE)
    x, teacher = features(9, 4), features(9, 5)

    def step(x):
        return fastkd.rkd_distance_loss(layer(x), teacher, backend="triton")

    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
    (gw,) = torch.autograd.grad(loss, layer.weight)
    ref_loss, ref_gs, _ = reference_rkd(layer(x), teacher)
    assert_close(loss.detach(), ref_loss, 1e-5)
    assert_close(gw, ref_gs.float().T @ x, 1e-5)


def test_bad_input():
    s, t = features(4, 3), features(4, 5)
    with pytest.raises(ValueError, match="student"):
        ops.rkd_forward(s[0], t)
    with pytest.raises(TypeError, match="student"):
        ops.rkd_forward(s.to(torch.int32), t)
    with pytest.raises(ValueError, match="batch size"):
        ops.rkd_forward(s, features(5, 5))
    with pytest.raises(ValueError, match="at least 2"):
        ops.rkd_forward(s[:1], t[:1])
    with pytest.raises(ValueError, match="grad"):
        ops.rkd_backward(torch.ones(2, device=DEVICE), s, t, False)
    if INTERPRET:
        with pytest.raises(TypeError, match="teacher is bfloat16"):
            ops.rkd_forward(s, t.bfloat16())


# ---------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [130, 4096])
def test_gpu_against_reference(dtype, batch):
    torch.manual_seed(8)
    student, teacher = features(batch, 300, dtype), features(batch, 257, dtype)
    loss, gs, gt = ops.rkd_forward_backward(student, teacher, True)
    ref_loss, ref_gs, ref_gt = reference_rkd(student, teacher)
    grad_tol = {torch.bfloat16: 3e-2, torch.float16: 4e-3}.get(dtype, 1e-5)
    assert_close(loss, ref_loss, 1e-12 if dtype == torch.float64 else 1e-5)
    assert_close(gs, ref_gs, max(grad_tol, 1e-12), atol_rel=grad_tol)
    assert_close(gt, ref_gt, max(grad_tol, 1e-12), atol_rel=grad_tol)
