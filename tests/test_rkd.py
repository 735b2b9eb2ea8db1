"""RKD distance on the CPU backend (csrc/cpu/rkd.cpp) against the float64 reference: values and
gradients (student and teacher), odd shapes across tile and panel edges, clamped distances,
half inputs, op registration (opcheck, torch.compile) and backend errors."""

import pytest
import torch

import fastkd
from fastkd import reference

pytestmark = pytest.mark.skipif(
    not fastkd.available_backends()["cpu"]["available"], reason="needs the compiled CPU kernels"
)


def _reference64(student, teacher):
    """Reference loss and gradients (of the inputs requiring grad) on float64 copies."""
    s = student.detach().double().requires_grad_(student.requires_grad)
    t = teacher.detach().double().requires_grad_(teacher.requires_grad)
    loss = reference.rkd_distance_loss(s, t)
    inputs = [x for x in (s, t) if x.requires_grad]
    return loss.detach(), list(torch.autograd.grad(loss, inputs)) if inputs else []


def _cpu(student, teacher):
    loss = fastkd.rkd_distance_loss(student, teacher, backend="cpu")
    inputs = [x for x in (student, teacher) if x.requires_grad]
    return loss.detach(), list(torch.autograd.grad(loss, inputs)) if inputs else []


def _assert_matches(got, want, rtol):
    (loss, grads), (ref_loss, ref_grads) = got, want
    torch.testing.assert_close(loss.double(), ref_loss, rtol=rtol, atol=rtol * 1e-3)
    assert len(grads) == len(ref_grads)
    for g, r in zip(grads, ref_grads, strict=True):
        scale = r.abs().max().item() or 1.0
        torch.testing.assert_close(g.double(), r, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("b", [2, 3, 17, 130, 513])
@pytest.mark.parametrize("ds,dt", [(1, 7), (7, 1), (64, 300)])
def test_cpu_matches_reference_float64(b, ds, dt):
    torch.manual_seed(b * 7 + ds)
    s = torch.randn(b, ds, dtype=torch.float64, requires_grad=True)
    t = torch.randn(b, dt, dtype=torch.float64, requires_grad=True)
    got = _cpu(s, t)
    assert got[0].dtype == torch.float64
    _assert_matches(got, _reference64(s, t), rtol=1e-10)


@pytest.mark.parametrize("b,ds,dt", [(3, 7, 64), (130, 64, 300), (513, 300, 7)])
def test_cpu_matches_reference_float32(b, ds, dt):
    torch.manual_seed(b + dt)
    s = torch.randn(b, ds, requires_grad=True)
    t = torch.randn(b, dt)
    got = _cpu(s, t)
    assert got[0].dtype == torch.float32 and got[1][0].dtype == torch.float32
    _assert_matches(got, _reference64(s, t), rtol=1e-5)


def test_rows_across_tiles_and_column_panels():
    # 2100 rows: nine 256-row blocks (the last partial) and two 2048-column panels.
    torch.manual_seed(3)
    s = torch.randn(2100, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2100, 3, dtype=torch.float64, requires_grad=True)
    _assert_matches(_cpu(s, t), _reference64(s, t), rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_float32(dtype):
    torch.manual_seed(4)
    s = torch.randn(65, 24, dtype=dtype, requires_grad=True)
    t = torch.randn(65, 40, dtype=dtype)
    loss, (grad,) = _cpu(s, t)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    want_loss, (want_grad,) = _reference64(s, t)  # same half values, upcast
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=0)
    scale = want_grad.abs().max().item()
    # the gradient itself is rounded to the input dtype
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-2, atol=1e-2 * scale)


def test_feature_maps_are_flattened_and_strided_inputs_accepted():
    torch.manual_seed(5)
    s = torch.randn(19, 3, 4, 2, dtype=torch.float64)[:, :, ::2].requires_grad_()
    t = torch.randn(6, 19, dtype=torch.float64).T.requires_grad_()  # (19, 6), not contiguous
    assert not t.is_contiguous()
    _assert_matches(_cpu(s, t), _reference64(s, t), rtol=1e-10)


def test_duplicate_and_zero_rows_use_the_clamp_like_the_reference():
    # Duplicates give q = 0 < 1e-12: d = 1e-6 and no gradient through the clamp.
    torch.manual_seed(6)
    s = torch.randn(40, 8, dtype=torch.float64)
    s[5] = s[9]
    s[11] = 0.0
    t = torch.randn(40, 8, dtype=torch.float64)
    t[5] = t[9]
    t[20] = 0.0
    s.requires_grad_()
    t.requires_grad_()
    got = _cpu(s, t)
    assert all(torch.isfinite(g).all() for g in got[1])
    _assert_matches(got, _reference64(s, t), rtol=1e-10)


def test_teacher_without_grad_and_module_form():
    torch.manual_seed(7)
    s = torch.randn(31, 6, requires_grad=True)
    t = torch.randn(31, 9)
    loss = fastkd.rkd_distance_loss(s, t)  # auto = cpu on CPU tensors
    loss.backward()
    assert t.grad is None and s.grad is not None
    mod = fastkd.RKDDistanceLoss(backend="cpu")
    assert mod(s, t).item() == loss.item()


def test_upstream_gradient_scales_and_forward_backward_op_matches():
    torch.manual_seed(8)
    s = torch.randn(70, 5, dtype=torch.float64)
    t = torch.randn(70, 12, dtype=torch.float64)
    loss, gs, gt = torch.ops.fastkd.rkd_forward_backward(s, t, True)
    torch.testing.assert_close(loss, torch.ops.fastkd.rkd_forward(s, t), rtol=1e-14, atol=0)
    grad = torch.tensor(-2.5, dtype=torch.float64)
    bs, bt = torch.ops.fastkd.rkd_backward(grad, s, t, True)
    torch.testing.assert_close(bs, -2.5 * gs)
    torch.testing.assert_close(bt, -2.5 * gt)
    bs2, bt2 = torch.ops.fastkd.rkd_backward(grad, s, t, False)
    torch.testing.assert_close(bs2, bs)
    assert bt2.numel() == 0
    # through autograd: d(3 L)/ds = 3 dL/ds
    sr = s.clone().requires_grad_()
    (3.0 * fastkd.rkd_distance_loss(sr, t, backend="cpu")).backward()
    torch.testing.assert_close(sr.grad, 3.0 * gs)


def test_deterministic_across_calls():
    torch.manual_seed(9)
    s = torch.randn(700, 20, requires_grad=True)
    t = torch.randn(700, 30)
    a, b = _cpu(s, t), _cpu(s, t)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1][0], b[1][0])


def test_non_finite_features_propagate():
    s = torch.randn(12, 4)
    s[3, 1] = float("nan")
    assert torch.isnan(fastkd.rkd_distance_loss(s, torch.randn(12, 4), backend="cpu"))


def test_gradcheck_float64():
    torch.manual_seed(10)
    s = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b: fastkd.rkd_distance_loss(a, b, backend="cpu"), (s, t)
    )
    assert torch.autograd.gradcheck(torch.ops.fastkd.rkd_forward, (s, t))


def test_opcheck_compiled_ops():
    torch.manual_seed(11)
    s = torch.randn(17, 6, dtype=torch.float64, requires_grad=True)
    t = torch.randn(17, 4, dtype=torch.float64)
    torch.library.opcheck(torch.ops.fastkd.rkd_forward, (s, t))
    torch.library.opcheck(torch.ops.fastkd.rkd_forward, (s, t.clone().requires_grad_()))
    grad = torch.tensor(0.75, dtype=torch.float64)
    for teacher_grad in (False, True):
        torch.library.opcheck(torch.ops.fastkd.rkd_backward, (grad, s.detach(), t, teacher_grad))
        torch.library.opcheck(torch.ops.fastkd.rkd_forward_backward, (s.detach(), t, teacher_grad))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_training_step(backend):
    torch.manual_seed(12)
    student = torch.nn.Linear(12, 8).double()
    x = torch.randn(33, 12, dtype=torch.float64)
    teacher_feats = torch.randn(33, 20, dtype=torch.float64)
    loss_fn = fastkd.RKDDistanceLoss(backend="cpu")

    def step(x, t):
        return loss_fn(student(x), t)

    eager = step(x, teacher_feats)
    eager.backward()
    eager_grad = student.weight.grad.clone()
    student.zero_grad()
    compiled = torch.compile(step, fullgraph=True, backend=backend)(x, teacher_feats)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(student.weight.grad, eager_grad)


def test_unavailable_backends_are_errors():
    s, t = torch.randn(5, 3), torch.randn(5, 3)
    # CPU tensors never run on the cuda backend (no device here, or a device but CPU inputs)
    with pytest.raises(fastkd.BackendUnavailableError, match="cuda"):
        fastkd.rkd_distance_loss(s, t, backend="cuda")
    with pytest.raises(fastkd.BackendUnavailableError, match="no kernel for 'sp'"):
        fastkd.sp_loss(s, t, backend="cpu")
    assert "rkd" in fastkd.available_backends()["cpu"]["ops"]


def test_op_rejects_bad_shapes():
    with pytest.raises(RuntimeError, match="at least 2 rows"):
        torch.ops.fastkd.rkd_forward(torch.randn(1, 3), torch.randn(1, 3))
    with pytest.raises(RuntimeError, match="batch size"):
        torch.ops.fastkd.rkd_forward(torch.randn(4, 3), torch.randn(5, 3))
