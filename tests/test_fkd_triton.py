"""Triton FKD backend (fastkd.triton.fkd) against the float64 reference of SPEC §1.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set
by conftest.py), where the block sizes are 16 rows x 32 columns: the odd shapes below cover
several row blocks, partial blocks, feature-width chunks and output chunks. With
TRITON_INTERPRET=0 on a CUDA machine the same tests run on the GPU, plus the ``gpu`` ones.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from triton_helpers import DEVICE, INTERPRET, features, needs_gpu, runs_here  # noqa: E402

import fastkd  # noqa: E402
from fastkd import reference  # noqa: E402
from fastkd.registry import resolve_backend  # noqa: E402
from fastkd.triton import fkd as tfkd  # noqa: E402

ops = torch.ops.fastkd_triton
pytestmark = runs_here


def reference_fkd(student, teachers, kd_weight, fr_weight, grad=1.0):
    """Loss and gradients (times ``grad``) of the float64 reference on upcast inputs."""
    s = student.detach().double().requires_grad_()
    ts = [t.detach().double().requires_grad_() for t in teachers]
    loss = reference.fkd_loss(s, ts, kd_weight, fr_weight)
    loss.backward(torch.tensor(grad, dtype=torch.float64, device=loss.device))
    return loss.detach(), s.grad, [t.grad for t in ts]


def assert_close(actual, expected, rtol, atol_rel=None):
    """Elementwise |a - e| <= rtol |e| + atol_rel max|e| (atol_rel defaults to rtol)."""
    expected = expected.double()
    atol = (rtol if atol_rel is None else atol_rel) * expected.abs().max().item()
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol)


def run_op(student, teachers, kd_weight, fr_weight, grad=1.0, **kwargs):
    """Loss and gradients through the forward op's registered autograd."""
    loss = ops.fkd_forward(student, teachers, kd_weight, fr_weight, **kwargs)
    leaves = [x for x in (student, *teachers) if x.requires_grad]
    grads = torch.autograd.grad(loss, leaves, torch.tensor(grad, device=loss.device))
    return loss.detach(), dict(zip([id(x) for x in leaves], grads, strict=True))


@pytest.mark.parametrize("batch, ds, dt", [(2, 1, 7), (3, 7, 1), (17, 40, 7), (33, 7, 40)], ids=str)
def test_float32_matches_reference(batch, ds, dt):
    torch.manual_seed(batch * 100 + ds)
    student = features(batch, ds, requires_grad=True)
    teacher = features(batch, dt)
    loss, grads = run_op(student, [teacher], 0.7, 0.3, grad=1.3)
    ref_loss, ref_gs, _ = reference_fkd(student, [teacher], 0.7, 0.3, grad=1.3)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close(loss, ref_loss, 1e-5)
    assert grads[id(student)].dtype == torch.float32
    assert_close(grads[id(student)], ref_gs, 1e-5)


def test_float16_inputs():
    # Products of fp16 numbers are exact in the fp32 accumulator, so the loss keeps fp32
    # accuracy. The backward rounds the difference tile and the normalised rows to fp16 for the
    # tensor cores and the gradient is stored in fp16: three roundings of 2^-11 ~ 4.9e-4
    # relative; 4e-3 of the largest entry leaves ~3x margin over their sum.
    torch.manual_seed(1)
    student = features(17, 40, torch.float16, requires_grad=True)
    teachers = [features(17, 33, torch.float16, True), features(17, 7, torch.float32, True)]
    loss, grads = run_op(student, teachers, 1.0, 0.5)
    ref_loss, ref_gs, ref_gt = reference_fkd(student, teachers, 1.0, 0.5)
    assert loss.dtype == torch.float32
    assert_close(loss, ref_loss, 1e-5)
    assert grads[id(student)].dtype == torch.float16
    assert_close(grads[id(student)], ref_gs, 1e-2, atol_rel=4e-3)
    assert grads[id(teachers[0])].dtype == torch.float16
    assert_close(grads[id(teachers[0])], ref_gt[0], 1e-2, atol_rel=4e-3)
    assert grads[id(teachers[1])].dtype == torch.float32  # fp32 teacher, fp32 dots
    assert_close(grads[id(teachers[1])], ref_gt[1], 1e-4)


def test_float64_inputs():
    torch.manual_seed(2)
    student = features(17, 9, torch.float64, requires_grad=True)
    teacher = features(17, 40, torch.float32)  # upcast: one float64 input makes it all float64
    loss, grads = run_op(student, [teacher], 1.0, 0.25)
    ref_loss, ref_gs, _ = reference_fkd(student, [teacher], 1.0, 0.25)
    assert loss.dtype == torch.float64
    assert_close(loss, ref_loss, 1e-12)
    assert grads[id(student)].dtype == torch.float64
    assert_close(grads[id(student)], ref_gs, 1e-12)


@pytest.mark.parametrize("max_slots", [8, 2], ids=["own-slots", "shared-slot"])
def test_ensemble_with_teacher_gradients(monkeypatch, max_slots):
    # max_slots=2 puts two of the three teachers into the concatenated slot (and the teacher
    # being differentiated into a slot of its own).
    monkeypatch.setattr(tfkd, "MAX_TEACHER_SLOTS", max_slots)
    torch.manual_seed(3)
    student = features(17, 9, requires_grad=True)
    teachers = [features(17, w, requires_grad=True) for w in (7, 40, 3)]
    loss, grads = run_op(student, teachers, 0.8, 0.1, grad=0.5)
    ref_loss, ref_gs, ref_gt = reference_fkd(student, teachers, 0.8, 0.1, grad=0.5)
    assert_close(loss, ref_loss, 1e-5)
    assert_close(grads[id(student)], ref_gs, 1e-5)
    for teacher, ref in zip(teachers, ref_gt, strict=True):
        assert grads[id(teacher)].shape == teacher.shape
        assert_close(grads[id(teacher)], ref, 1e-5)


def test_only_some_teachers_require_grad():
    torch.manual_seed(4)
    student = features(5, 6)  # no gradient wanted for the student
    teachers = [features(5, 4), features(5, 3, requires_grad=True)]
    loss = ops.fkd_forward(student, teachers, 1.0, 0.0)
    loss.backward()
    _, _, ref_gt = reference_fkd(student, teachers, 1.0, 0.0)
    assert teachers[0].grad is None
    assert_close(teachers[1].grad, ref_gt[1], 1e-5)


def test_backward_op_convention():
    torch.manual_seed(5)
    student, teachers = features(6, 5), [features(6, 3), features(6, 4)]
    grad = torch.tensor(2.0, device=DEVICE)
    gs, gt = ops.fkd_backward(grad, student, teachers, 1.0, 0.5, False)
    assert gt == [] and gs.shape == student.shape
    gs2, gt2 = ops.fkd_backward(grad, student, teachers, 1.0, 0.5, True)
    _, ref_gs, ref_gt = reference_fkd(student, teachers, 1.0, 0.5, grad=2.0)
    assert_close(gs, ref_gs, 1e-5)
    assert torch.equal(gs, gs2)
    assert [g.shape for g in gt2] == [t.shape for t in teachers]
    for g, ref in zip(gt2, ref_gt, strict=True):
        assert_close(g, ref, 1e-5)


@pytest.mark.parametrize("teachers_grad", [False, True])
def test_forward_backward_op(teachers_grad):
    torch.manual_seed(15)
    student = features(33, 20)
    teachers = [features(33, 9), features(33, 40)]
    loss, gs, gt = ops.fkd_forward_backward(student, teachers, 0.6, 0.3, teachers_grad)
    ref_loss, ref_gs, ref_gt = reference_fkd(student, teachers, 0.6, 0.3)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close(loss, ref_loss, 1e-5)
    assert_close(gs, ref_gs, 1e-5)
    assert len(gt) == (2 if teachers_grad else 0)
    for g, ref in zip(gt, ref_gt[: len(gt)], strict=True):
        assert_close(g, ref, 1e-5)
    again = ops.fkd_forward_backward(student, teachers, 0.6, 0.3, teachers_grad)
    assert torch.equal(loss, again[0]) and torch.equal(gs, again[1])


def test_zero_rows():
    # normalize() maps a zero row to zeros (rho_ii = 0) and its gradient is g / eps (~1e12 g).
    torch.manual_seed(6)
    student = features(18, 7)
    teacher = features(18, 5)
    student[0] = 0.0
    student[17] = 0.0
    teacher[3] = 0.0
    student.requires_grad_()
    loss, grads = run_op(student, [teacher], 1.0, 0.0)
    ref_loss, ref_gs, _ = reference_fkd(student, [teacher], 1.0, 0.0)
    assert_close(loss, ref_loss, 1e-5)
    zero = torch.zeros(18, dtype=torch.bool)
    zero[[0, 17]] = True
    assert_close(grads[id(student)][zero], ref_gs[zero], 1e-5)
    assert_close(grads[id(student)][~zero], ref_gs[~zero], 1e-5)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's, in the interpreter
def test_non_finite_features_propagate():
    student, teacher = features(17, 5), features(17, 3)
    for bad in (float("nan"), float("inf")):
        student[4, 1] = bad
        assert torch.isnan(reference.fkd_loss(student, teacher, 1.0, 0.1))
        assert torch.isnan(ops.fkd_forward(student, [teacher], 1.0, 0.1))


def test_strided_inputs_without_copies():
    torch.manual_seed(7)
    student = torch.randn(9, 17, device=DEVICE).t().requires_grad_()  # column-major (17, 9)
    teacher = torch.randn(17, 40, device=DEVICE)[:, ::3]  # column stride 3
    assert not student.is_contiguous() and not teacher.is_contiguous()
    loss, grads = run_op(student, [teacher], 1.0, 0.2)
    ref_loss, ref_gs, _ = reference_fkd(student, [teacher], 1.0, 0.2)
    assert_close(loss, ref_loss, 1e-5)
    assert_close(grads[id(student)], ref_gs, 1e-5)


def test_deterministic_runs_are_bit_identical(monkeypatch):
    torch.manual_seed(8)
    student = features(33, 20, requires_grad=True)
    teachers = [features(33, 9), features(33, 35)]
    monkeypatch.setattr(tfkd, "DETERMINISTIC", True)  # the setting (the default)
    first = run_op(student, teachers, 1.0, 0.1)
    second = run_op(student, teachers, 1.0, 0.1)
    assert torch.equal(first[0], second[0])
    assert torch.equal(first[1][id(student)], second[1][id(student)])


def test_atomic_reduction(monkeypatch):
    torch.manual_seed(9)
    student, teacher = features(33, 8), features(33, 12)
    ref_loss, _, _ = reference_fkd(student, [teacher], 1.0, 0.3)
    monkeypatch.setattr(tfkd, "DETERMINISTIC", False)  # the module-level setting
    assert_close(ops.fkd_forward(student, [teacher], 1.0, 0.3), ref_loss, 1e-5)


def test_public_api():
    torch.manual_seed(10)
    student = features(17, 12, requires_grad=True)
    teachers = [features(17, 5), features(17, 9)]
    ref_loss, ref_gs, _ = reference_fkd(student, teachers, 0.9, 0.2)
    loss = fastkd.fkd_loss(student, teachers, 0.9, 0.2, backend="triton", algorithm="tiled")
    (gs,) = torch.autograd.grad(loss, student)
    assert_close(loss.detach(), ref_loss, 1e-5)
    assert_close(gs, ref_gs, 1e-5)
    with torch.no_grad():  # no input requires grad: the plain forward op, not the fused one
        loss = fastkd.fkd_loss(student, teachers, 0.9, 0.2, backend="triton", algorithm="tiled")
    assert_close(loss, ref_loss, 1e-5)
    module = fastkd.FKDLoss(0.9, 0.2, backend="triton", algorithm="tiled")
    assert_close(module(student, teachers).detach(), ref_loss, 1e-5)
    loss = fastkd.FKDFunction.apply("triton", "ieee", 0.9, 0.2, student, *teachers)
    (gs,) = torch.autograd.grad(loss, student)
    assert_close(gs, ref_gs, 1e-5)
    assert resolve_backend("fkd", "triton", student.device) == "triton"
    assert "fkd" in fastkd.available_backends()["triton"]["ops"]


def test_opcheck():
    torch.manual_seed(11)
    student = features(3, 4, requires_grad=True)
    teachers = [features(3, 5), features(3, 2, requires_grad=True)]
    torch.library.opcheck(ops.fkd_forward, (student, teachers, 1.0, 0.5))
    grad = torch.tensor(1.5, device=DEVICE)
    detached = [t.detach() for t in teachers]
    for teachers_grad in (False, True):
        args = (grad, student.detach(), detached, 1.0, 0.5, teachers_grad)
        torch.library.opcheck(ops.fkd_backward, args)
        args = (student.detach(), detached, 1.0, 0.5, teachers_grad)
        torch.library.opcheck(ops.fkd_forward_backward, args)


def test_torch_compile_fullgraph():
    torch.manual_seed(12)
    student = features(5, 6, requires_grad=True)
    teacher = features(5, 3)

    def loss_fn(s, t):
        return 2.0 * ops.fkd_forward(s, [t], 1.0, 0.1) + 1.0

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    loss = compiled(student, teacher)
    (gs,) = torch.autograd.grad(loss, student)
    ref_loss, ref_gs, _ = reference_fkd(student, [teacher], 1.0, 0.1, grad=2.0)
    assert_close(loss.detach(), 2.0 * ref_loss + 1.0, 1e-5)
    assert_close(gs, ref_gs, 1e-5)

    # A training step through the public API (FKDFunction and the fused op) in one graph.
    layer = torch.nn.Linear(4, 6).to(DEVICE)
    x, teachers = features(5, 4), [teacher, features(5, 2)]

    def step(x):
        return fastkd.fkd_loss(layer(x), teachers, 1.0, 0.1, backend="triton", algorithm="tiled")

    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
    (gw,) = torch.autograd.grad(loss, layer.weight)
    ref_loss, ref_gs, _ = reference_fkd(layer(x), teachers, 1.0, 0.1)
    assert_close(loss.detach(), ref_loss, 1e-5)
    assert_close(gw, ref_gs.float().T @ x, 1e-5)


def test_bad_input():
    s, t = features(4, 3), features(4, 5)
    with pytest.raises(ValueError, match="student"):
        ops.fkd_forward(s[0], [t], 1.0, 0.0)
    with pytest.raises(TypeError, match="student"):
        ops.fkd_forward(s.to(torch.int32), [t], 1.0, 0.0)
    with pytest.raises(ValueError, match="teacher"):
        ops.fkd_forward(s, [features(5, 5)], 1.0, 0.0)
    with pytest.raises(ValueError, match="teacher"):
        ops.fkd_forward(s, [], 1.0, 0.0)
    with pytest.raises(ValueError, match="teacher\\[1\\]"):
        ops.fkd_forward(s, [t, t[:, :0]], 1.0, 0.0)
    with pytest.raises(ValueError, match="kd_weight"):
        ops.fkd_forward(s, [t], float("nan"), 0.0)
    with pytest.raises(ValueError, match="grad"):
        ops.fkd_backward(torch.ones(2, device=DEVICE), s, [t], 1.0, 0.0, False)
    if INTERPRET:
        with pytest.raises(TypeError, match="teacher\\[0\\].*bfloat16"):
            ops.fkd_forward(s, [t.bfloat16()], 1.0, 0.0)
    if INTERPRET and torch.cuda.is_available():
        with pytest.raises(ValueError, match="student"):
            ops.fkd_forward(s.cuda(), [t.cuda()], 1.0, 0.0)


def test_block_config():
    cfg = tfkd.block_config(4096, [2048, 512], torch.float16, interpret=False)
    assert (cfg["BLOCK"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["BLOCK_DO"]) == (64, 32, 32, 128)
    small = tfkd.block_config(3, [1], torch.float32, interpret=False)
    assert small["BLOCK"] == small["BLOCK_N"] == small["BLOCK_K"] == 16  # tl.dot needs >= 16
    assert tfkd.block_config(4096, [512], torch.float64, interpret=False)["BLOCK_K"] == 16


# ---------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [130, 4096])
def test_gpu_against_reference(dtype, batch):
    torch.manual_seed(13)
    student = features(batch, 300, dtype, requires_grad=True)
    teachers = [features(batch, 257, dtype), features(batch, 64, dtype)]
    loss, grads = run_op(student, teachers, 1.0, 0.1)
    ref_loss, ref_gs, _ = reference_fkd(student, teachers, 1.0, 0.1)
    # bf16 has 8 mantissa bits (three roundings of 2^-8 on the gradient); fp16 as above.
    grad_tol = {torch.bfloat16: 3e-2, torch.float16: 4e-3}.get(dtype, 1e-5)
    assert_close(loss, ref_loss, 1e-12 if dtype == torch.float64 else 1e-5)
    assert_close(grads[id(student)], ref_gs, max(grad_tol, 1e-12), atol_rel=grad_tol)


@pytest.mark.gpu
@needs_gpu
def test_gpu_tf32_and_cuda_backend(monkeypatch):
    torch.manual_seed(14)
    student = features(1000, 512, requires_grad=True)
    teacher = features(1000, 768)
    ref_loss, ref_gs, _ = reference_fkd(student, [teacher], 1.0, 0.0)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    loss, grads = run_op(student, [teacher], 1.0, 0.0)
    # TF32 rounds the fp32 operands to 10 mantissa bits (2^-11 relative).
    assert_close(loss, ref_loss, 1e-3)
    assert_close(grads[id(student)], ref_gs, 1e-2, atol_rel=4e-3)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    if fastkd.available_backends()["cuda"]["available"]:
        cuda = fastkd.fkd_loss(student, teacher, backend="cuda", algorithm="tiled")
        triton_loss = fastkd.fkd_loss(student, teacher, backend="triton", algorithm="tiled")
        assert_close(triton_loss.detach(), cuda.detach(), 1e-5)
