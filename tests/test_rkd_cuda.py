"""RKD distance on the CUDA backend (csrc/cuda/rkd.cu) against the float64 reference: every
dtype, odd batch sizes across the 64-row tiles, teacher gradients, opcheck, torch.compile,
bit-identical reruns and agreement with the Triton backend. Needs a CUDA device and an extension
built with FASTKD_BUILD_CUDA=1; every test is marked ``gpu`` (skipped without a device). Without
a GPU the kernels themselves run on the CPU emulator: tests/emulator/test_rkd_emulator.py."""

import pytest
import torch

import fastkd
from fastkd import _extension, reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
LOSS_TOL = {F64: 1e-10, F32: 1e-5, F16: 1e-5, BF16: 1e-5}
GRAD_TOL = {F64: 1e-10, F32: 1e-5, F16: 1e-2, BF16: 1e-2}  # half: rounded to the input dtype


@pytest.fixture(scope="module", autouse=True)
def _needs_cuda_kernels():
    if not _extension.has_kernel("rkd_forward", "CUDA"):
        pytest.fail("fastkd._C has no CUDA RKD kernels: build with FASTKD_BUILD_CUDA=1")


def _reference64(student, teacher, grad=1.0):
    s = student.detach().double().requires_grad_()
    t = teacher.detach().double().requires_grad_()
    loss = reference.rkd_distance_loss(s, t)
    gs, gt = torch.autograd.grad(loss, [s, t])
    return loss.detach(), grad * gs, grad * gt


def _rel(got, want):
    assert torch.isfinite(got).all()
    return ((got.double() - want).abs().max() / (want.abs().max().clamp_min(1e-30))).item()


def _inputs(b, ds, dt, dtype_s, dtype_t=None, seed=0):
    gen = torch.Generator().manual_seed(seed + b * 7 + ds)
    s = torch.randn(b, ds, generator=gen, dtype=F64).to(dtype_s).cuda()
    t = torch.randn(b, dt, generator=gen, dtype=F64).to(dtype_t or dtype_s).cuda()
    return s, t


def _loss_dtype(*xs):
    return F64 if any(x.dtype == F64 for x in xs) else F32


@pytest.mark.parametrize("b", [2, 17, 130, 4096])
@pytest.mark.parametrize("dtype", [F64, F32, F16, BF16])
def test_cuda_matches_reference(dtype, b):
    s, t = _inputs(b, 33, 70, dtype, seed=1)
    grad = torch.tensor(0.75, dtype=_loss_dtype(s, t), device="cuda")
    loss = torch.ops.fastkd.rkd_forward(s, t)
    gs, gt = torch.ops.fastkd.rkd_backward(grad, s, t, True)
    loss_fb, gs_fb, gt_fb = torch.ops.fastkd.rkd_forward_backward(s, t, True)
    assert loss.dtype == _loss_dtype(s, t) and loss.device.type == "cuda"
    assert gs.dtype == dtype and gt.dtype == dtype and gs.shape == s.shape and gt.shape == t.shape
    ref_loss, ref_gs, ref_gt = _reference64(s, t)
    for x in (loss, loss_fb):
        if b == 2:  # both normalised distances are 1: exactly 0
            assert abs(x.item()) <= 1e-12
        else:
            assert _rel(x, ref_loss) <= LOSS_TOL[dtype]
    if b > 2:
        assert _rel(gs, 0.75 * ref_gs) <= GRAD_TOL[dtype]
        assert _rel(gt, 0.75 * ref_gt) <= GRAD_TOL[dtype]
        assert _rel(gs_fb, ref_gs) <= GRAD_TOL[dtype]
        assert _rel(gt_fb, ref_gt) <= GRAD_TOL[dtype]


@pytest.mark.parametrize("ds,dt", [(1, 7), (7, 1), (300, 64)])
def test_cuda_odd_widths_and_autograd(ds, dt):
    s, t = _inputs(130, ds, dt, F64, seed=2)
    s.requires_grad_()
    t.requires_grad_()
    loss = fastkd.rkd_distance_loss(s, t, backend="cuda")
    loss.backward()
    ref_loss, ref_gs, ref_gt = _reference64(s, t)
    assert _rel(loss.detach(), ref_loss) <= 1e-10
    assert _rel(s.grad, ref_gs) <= 1e-10 and _rel(t.grad, ref_gt) <= 1e-10


def test_cuda_teacher_grad_flag_and_mixed_dtypes():
    s, t = _inputs(65, 24, 40, F16, F32, seed=3)
    gs, gt = torch.ops.fastkd.rkd_backward(torch.tensor(1.0, device="cuda"), s, t, False)
    assert gt.shape == (0,) and gs.dtype == F16
    loss, gs, gt = torch.ops.fastkd.rkd_forward_backward(s, t, True)
    assert loss.dtype == F32 and gs.dtype == F16 and gt.dtype == F32
    ref_loss, ref_gs, ref_gt = _reference64(s, t)
    assert _rel(loss, ref_loss) <= 1e-5
    assert _rel(gs, ref_gs) <= 1e-2 and _rel(gt, ref_gt) <= 1e-5
    s64, t16 = _inputs(65, 24, 40, F64, BF16, seed=3)
    loss, gs, gt = torch.ops.fastkd.rkd_forward_backward(s64, t16, True)
    assert loss.dtype == F64 and gs.dtype == F64 and gt.dtype == BF16


def test_cuda_duplicate_zero_rows_and_nan():
    s, t = _inputs(40, 8, 8, F64, seed=4)
    s[5], t[5] = s[9], t[9]
    s[11] = 0.0
    t[20] = 0.0
    loss, gs, gt = torch.ops.fastkd.rkd_forward_backward(s, t, True)
    ref_loss, ref_gs, ref_gt = _reference64(s, t)
    assert _rel(loss, ref_loss) <= 1e-10
    assert _rel(gs, ref_gs) <= 1e-10 and _rel(gt, ref_gt) <= 1e-10
    s[3, 2] = float("nan")
    loss, gs, gt = torch.ops.fastkd.rkd_forward_backward(s, t, True)
    assert loss.isnan() and gs.isnan().all() and gt.isnan().all()


def test_cuda_non_contiguous_inputs():
    s, t = _inputs(70, 12, 20, F32, seed=5)
    s_nc = s.repeat(1, 2)[:, ::2]
    t_nc = t.T.contiguous().T
    assert not s_nc.is_contiguous() and not t_nc.is_contiguous()
    a = torch.ops.fastkd.rkd_forward_backward(s, t, True)
    b = torch.ops.fastkd.rkd_forward_backward(s_nc, t_nc, True)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_cuda_bit_identical_reruns(dtype):
    s, t = _inputs(1000, 77, 50, dtype, seed=6)
    first = torch.ops.fastkd.rkd_forward_backward(s, t, True)
    for _ in range(3):
        again = torch.ops.fastkd.rkd_forward_backward(s, t, True)
        for x, y in zip(first, again, strict=True):
            assert torch.equal(x, y)


def test_cuda_runs_on_the_current_stream():
    s, t = _inputs(300, 33, 7, F32, seed=7)
    want = torch.ops.fastkd.rkd_forward_backward(s, t, True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = torch.ops.fastkd.rkd_forward_backward(s, t, True)
    stream.synchronize()
    for x, y in zip(want, got, strict=True):
        assert torch.equal(x, y)


def test_cuda_opcheck():
    s, t = _inputs(17, 6, 4, F64, seed=8)
    s.requires_grad_()
    torch.library.opcheck(torch.ops.fastkd.rkd_forward, (s, t))
    torch.library.opcheck(torch.ops.fastkd.rkd_forward, (s, t.clone().requires_grad_()))
    grad = torch.tensor(0.75, dtype=F64, device="cuda")
    for teacher_grad in (False, True):
        torch.library.opcheck(torch.ops.fastkd.rkd_backward, (grad, s.detach(), t, teacher_grad))
        torch.library.opcheck(torch.ops.fastkd.rkd_forward_backward, (s.detach(), t, teacher_grad))


def test_cuda_torch_compile_fullgraph_training_step():
    torch.manual_seed(9)
    student = torch.nn.Linear(12, 8).cuda()
    x = torch.randn(130, 12, device="cuda")
    teacher_feats = torch.randn(130, 20, device="cuda")
    loss_fn = fastkd.RKDDistanceLoss(backend="cuda")

    def step(x, t):
        return loss_fn(student(x), t)

    eager = step(x, teacher_feats)
    eager.backward()
    eager_grad = student.weight.grad.clone()
    student.zero_grad()
    compiled = torch.compile(step, fullgraph=True)(x, teacher_feats)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(student.weight.grad, eager_grad)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_cuda_agrees_with_triton_and_cpu(dtype):
    pytest.importorskip("triton")
    s, t = _inputs(333, 40, 24, dtype, seed=10)
    tol = 1e-10 if dtype == F64 else 1e-5
    out = {}
    for backend in ("cuda", "triton"):
        a, b = s.clone().requires_grad_(), t.clone().requires_grad_()
        loss = fastkd.rkd_distance_loss(a, b, backend=backend)
        loss.backward()
        out[backend] = (loss.detach(), a.grad, b.grad)
    cpu = torch.ops.fastkd.rkd_forward_backward(s.cpu(), t.cpu(), True)
    for x, y, z in zip(out["cuda"], out["triton"], cpu, strict=True):
        assert _rel(x, y.double()) <= tol
        assert _rel(x.cpu(), z.double()) <= tol
