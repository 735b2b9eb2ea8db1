"""FKD on the CUDA backend against the float64 reference. Needs a GPU (skipped without one).

Run on a GPU machine with ``make test-gpu`` or ``pytest -q -m gpu tests/test_fkd_cuda.py``.
The loss is exact to float32 accumulation for every input dtype (float16/bfloat16 products are
exact on tensor cores); float16/bfloat16 gradients are held to the rounding of the returned
gradient plus a small multiple of the dtype's epsilon (the second product of the backward
pass runs on tensor cores in the input dtype).
"""

import os

import pytest
import torch

import fastkd
from fastkd import _extension, reference

CUDA_KERNELS = _extension.has_kernel("fkd_forward", "CUDA")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(
        not CUDA_KERNELS and os.environ.get("FASTKD_BUILD_CUDA") != "1",
        reason="fastkd._C was built without CUDA kernels (set FASTKD_BUILD_CUDA=1 and rebuild)",
    ),
]

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# Loss: relative error. Gradients: excess error over twice the rounding of the float64 gradient
# to the output dtype, relative to the largest gradient entry.
LOSS_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}
GRAD_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _inputs(b, widths, dtype, seed, device="cuda"):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, w, generator=gen, dtype=torch.float64).to(device, dtype) for w in widths]


def _reference64(student, teachers, kd_weight, fr_weight, teachers_grad=False):
    """Reference loss and gradients (student first, then teachers) on float64 copies."""
    s = student.detach().double().requires_grad_()
    ts = [t.detach().double().requires_grad_(teachers_grad) for t in teachers]
    loss = reference.fkd_loss(s, ts, kd_weight, fr_weight)
    grads = torch.autograd.grad(loss, [s] + (ts if teachers_grad else []))
    return loss.detach(), list(grads)


def _cuda(student, teachers, kd_weight, fr_weight, teachers_grad=False):
    """Loss and gradients through fastkd.fkd_loss on the cuda backend (tiled algorithm)."""
    s = student.detach().requires_grad_()
    ts = [t.detach().requires_grad_(teachers_grad) for t in teachers]
    loss = fastkd.fkd_loss(s, ts, kd_weight, fr_weight, backend="cuda", algorithm="tiled")
    grads = torch.autograd.grad(loss, [s] + (ts if teachers_grad else []))
    return loss.detach(), list(grads)


def _assert_loss(loss, ref, dtype):
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(loss.double(), ref, rtol=LOSS_RTOL[dtype], atol=0.0)


def _assert_grad(grad, ref, dtype, scale=None):
    assert grad.dtype == dtype and grad.shape == ref.shape
    assert torch.isfinite(grad).all()
    unavoidable = (ref.to(dtype).double() - ref).abs().max().item()
    scale = ref.abs().max().item() if scale is None else scale
    err = (grad.double() - ref).abs().max().item()
    assert err <= 2 * unavoidable + GRAD_TOL[dtype] * scale, (err, unavoidable, scale)


SHAPES = [(1, 7), (7, 1), (64, 300), (300, 64)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b", [2, 3, 17, 130, 513, 4096])
@pytest.mark.parametrize("ds,dt", SHAPES)
def test_matches_reference(b, ds, dt, dtype):
    student, teacher = _inputs(b, [ds, dt], dtype, seed=b * 1000 + ds + dt)
    loss, (grad,) = _cuda(student, [teacher], 0.8, 0.05)
    ref_loss, (ref_grad,) = _reference64(student, [teacher], 0.8, 0.05)
    _assert_loss(loss, ref_loss, dtype)
    scale = _grad_scale(ref_grad, student, student, [teacher], 0.8)
    _assert_grad(grad, ref_grad, dtype, scale=scale)


def _grad_scale(ref_grad, x, student, teachers, kd_weight):
    """What the gradient of input `x` (the student or one of the teachers) is judged against.

    Its largest entry, except for width 1: there normalize() is +-1 and its
    Jacobian zero, so the exact distillation gradient vanishes and only the rounding of that
    cancellation is left. It is then judged against the chain rule's input,
    max_i |kd_weight (4/B^2) ((rho_S - rho_T) x_hat)_i| / ||x_i|| (divided by E for a teacher).
    """
    scale = ref_grad.abs().max().item()
    if x.shape[1] > 1:
        return scale
    share = 1.0 if x is student else 1.0 / len(teachers)
    teachers64 = [t.double() for t in teachers]
    diff = reference.correlation_kernel(student.double()) - reference.teacher_kernel(teachers64)
    x = x.double()
    g = 4.0 / x.shape[0] ** 2 * (diff @ torch.nn.functional.normalize(x, dim=1))
    g = share * kd_weight * g / x.norm(dim=1, keepdim=True).clamp_min(reference.NORM_EPS)
    return max(scale, g.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b", [3, 130, 1000])
def test_forward_backward_and_fused_ops_separately(b, dtype):
    student, t1, t2 = _inputs(b, [24, 40, 9], dtype, seed=b)
    teachers = [t1, t2]
    ref_loss, ref_grads = _reference64(student, teachers, 0.7, 0.3, teachers_grad=True)
    ops = torch.ops.fastkd
    _assert_loss(ops.fkd_forward(student, teachers, 0.7, 0.3), ref_loss, dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    grad = torch.tensor(-0.37, dtype=acc, device="cuda")
    for teachers_grad in (False, True):
        gs, gts = ops.fkd_backward(grad, student, teachers, 0.7, 0.3, teachers_grad)
        _assert_grad(gs, -0.37 * ref_grads[0], dtype)
        assert len(gts) == (2 if teachers_grad else 0)
        for g, r in zip(gts, ref_grads[1:], strict=False):
            _assert_grad(g, -0.37 * r, dtype)
        loss, gs, gts = ops.fkd_forward_backward(student, teachers, 0.7, 0.3, teachers_grad)
        _assert_loss(loss, ref_loss, dtype)
        _assert_grad(gs, ref_grads[0], dtype)
        assert len(gts) == (2 if teachers_grad else 0)
        for g, r in zip(gts, ref_grads[1:], strict=False):
            _assert_grad(g, r, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("widths", [[5], [3, 17], [1, 64, 9], [8, 8, 30, 2]])
def test_ensembles_with_teachers_requiring_grad(widths, dtype):
    b = 300  # several 64-row tiles, last one partial
    student, *teachers = _inputs(b, [12] + widths, dtype, seed=len(widths))
    loss, grads = _cuda(student, teachers, 1.3, 0.1, teachers_grad=True)
    ref_loss, ref_grads = _reference64(student, teachers, 1.3, 0.1, teachers_grad=True)
    _assert_loss(loss, ref_loss, dtype)
    assert len(grads) == 1 + len(widths)
    for x, g, r in zip([student, *teachers], grads, ref_grads, strict=True):
        _assert_grad(g, r, dtype, scale=_grad_scale(r, x, student, teachers, 1.3))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_zero_rows_are_finite_and_match_reference(dtype):
    student, teacher = _inputs(150, [8, 5], dtype, seed=4)
    student[[0, 7, 149]] = 0.0
    teacher[[7, 11, 100]] = 0.0
    loss, grads = _cuda(student, [teacher], 1.0, 0.5, teachers_grad=True)
    ref_loss, ref_grads = _reference64(student, [teacher], 1.0, 0.5, teachers_grad=True)
    assert torch.isfinite(loss)
    _assert_loss(loss, ref_loss, dtype)
    for g, r in zip(grads, ref_grads, strict=True):
        _assert_grad(g, r, dtype)


def test_mixed_input_dtypes():
    # float16 student with a float32 teacher runs in float32 (gradient back in float16);
    # any float64 input makes everything float64.
    student, teacher = _inputs(70, [16, 24], torch.float32, seed=5)
    for s_dtype, t_dtype in ((torch.float16, torch.float32), (torch.bfloat16, torch.float64)):
        s, t = student.to(s_dtype), teacher.to(t_dtype)
        loss, (grad,) = _cuda(s, [t], 1.0, 0.2)
        ref_loss, (ref_grad,) = _reference64(s, [t], 1.0, 0.2)
        want = torch.float64 if torch.float64 in (s_dtype, t_dtype) else torch.float32
        assert loss.dtype == want
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=0.0)
        _assert_grad(grad, ref_grad, s_dtype)


def test_non_contiguous_inputs():
    base = _inputs(40, [33], torch.float32, seed=6)[0]
    s = base.T[1:18]  # (17, 40), column-major
    t = _inputs(80, [17], torch.float32, seed=7)[0].T[:, ::2]  # (17, 40), doubly strided
    assert not s.is_contiguous() and not t.is_contiguous()
    loss, (grad,) = _cuda(s, [t], 1.0, 0.3)
    ref_loss, (ref_grad,) = _reference64(s, [t], 1.0, 0.3)
    _assert_loss(loss, ref_loss, torch.float32)
    _assert_grad(grad, ref_grad, torch.float32)


def test_auto_backend_picks_cuda_for_cuda_tensors():
    assert fastkd.resolve_backend("fkd", "auto", torch.device("cuda")) == "cuda"


def test_runs_on_the_current_stream():
    student, teacher = _inputs(520, [32, 48], torch.float16, seed=8)
    want, (want_grad,) = _cuda(student, [teacher], 1.0, 0.1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got, (got_grad,) = _cuda(student, [teacher], 1.0, 0.1)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(got, want) and torch.equal(got_grad, want_grad)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device():
    student, teacher = _inputs(90, [10, 20], torch.float32, seed=9, device="cuda:1")
    loss, (grad,) = _cuda(student, [teacher], 1.0, 0.1)
    assert loss.device == student.device and grad.device == student.device
    ref_loss, (ref_grad,) = _reference64(student, [teacher], 1.0, 0.1)
    _assert_loss(loss, ref_loss, torch.float32)
    _assert_grad(grad, ref_grad, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deterministic_bit_identical_runs(dtype):
    student, t1, t2 = _inputs(1100, [40, 30, 7], dtype, seed=10)
    grad = torch.tensor(0.5, device="cuda", dtype=reference.loss_dtype(student))
    ops = torch.ops.fastkd

    def run():
        fused = ops.fkd_forward_backward(student, [t1, t2], 1.0, 0.1, True)
        backward = ops.fkd_backward(grad, student, [t1, t2], 1.0, 0.1, True)
        forward = ops.fkd_forward(student, [t1, t2], 1.0, 0.1)
        return [forward, fused[0], fused[1], *fused[2], backward[0], *backward[1]]

    for a, b in zip(run(), run(), strict=True):
        assert torch.equal(a, b)


def test_opcheck_on_cuda_tensors():
    student, t1, t2 = _inputs(67, [6, 4, 9], torch.float32, seed=11)
    s = student.clone().requires_grad_()
    ts = [t1, t2]
    ops = torch.ops.fastkd
    torch.library.opcheck(ops.fkd_forward, (s, ts, 0.5, 0.25))
    torch.library.opcheck(ops.fkd_forward, (s, [t.clone().requires_grad_() for t in ts], 1.0, 0.0))
    grad = torch.tensor(1.5, device="cuda")
    for teachers_grad in (False, True):
        torch.library.opcheck(ops.fkd_backward, (grad, student, ts, 0.5, 0.25, teachers_grad))
        torch.library.opcheck(ops.fkd_forward_backward, (student, ts, 0.5, 0.25, teachers_grad))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_training_step(backend):
    torch.manual_seed(12)
    student = torch.nn.Linear(12, 8).cuda()
    x = torch.randn(333, 12, device="cuda")
    teacher_feats = [torch.randn(333, 20, device="cuda"), torch.randn(333, 5, device="cuda")]
    loss_fn = fastkd.FKDLoss(kd_weight=1.0, fr_weight=0.1, backend="cuda", algorithm="tiled")

    def step(x, ts):
        return loss_fn(student(x), ts)

    eager = step(x, teacher_feats)
    eager.backward()
    eager_grad = student.weight.grad.clone()
    student.zero_grad()
    compiled = torch.compile(step, fullgraph=True, backend=backend)(x, teacher_feats)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(student.weight.grad, eager_grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_peak_memory_is_linear_in_batch(dtype):
    b, ds, dt = 16384, 64, 64
    student, teacher = _inputs(b, [ds, dt], dtype, seed=13)
    student.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss = fastkd.fkd_loss(student, teacher, 1.0, 0.1, backend="cuda", algorithm="tiled")
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    # One B x B float32 kernel would be 1 GiB; the kernels need a few B x D buffers (at most
    # 8 partial accumulators, 16 * B * (Ds + Dt) * 4 bytes = 128 MiB is a generous bound).
    assert peak < 16 * b * (ds + dt) * 4
    assert peak < b * b * 4 / 8
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


def test_bad_input_is_rejected_before_any_kernel():
    s = torch.randn(4, 3, device="cuda")
    with pytest.raises(ValueError, match="teacher"):
        fastkd.fkd_loss(s, torch.randn(5, 3, device="cuda"), backend="cuda")
    with pytest.raises(ValueError, match="teacher"):
        fastkd.fkd_loss(s, torch.randn(4, 3), backend="cuda")  # other device
    with pytest.raises(ValueError, match="at most 64 teachers"):
        ts = [torch.randn(4, 2, device="cuda") for _ in range(65)]
        torch.ops.fastkd.fkd_forward(s, ts, 1.0, 0.0)
