"""FKD through the whole stack on the CPU backend (tiled kernel and dual algorithm) against
the reference in float64, plus op registration checks (opcheck, torch.compile)."""

import pytest
import torch

import fastkd
from fastkd import reference

ALGORITHMS = ["tiled", "dual"]


def _reference64(student, teachers, kd_weight, fr_weight):
    """Reference value and gradients on float64 copies of the inputs."""
    s = student.detach().double().requires_grad_(student.requires_grad)
    ts = [t.detach().double().requires_grad_(t.requires_grad) for t in teachers]
    loss = reference.fkd_loss(s, ts, kd_weight, fr_weight)
    inputs = [x for x in (s, *ts) if x.requires_grad]
    grads = torch.autograd.grad(loss, inputs) if inputs else ()
    return loss.detach(), [g.detach() for g in grads]


def _fused(student, teachers, kd_weight, fr_weight, algorithm, backend="cpu"):
    loss = fastkd.fkd_loss(
        student, teachers, kd_weight, fr_weight, backend=backend, algorithm=algorithm
    )
    inputs = [x for x in (student, *teachers) if x.requires_grad]
    grads = torch.autograd.grad(loss, inputs) if inputs else ()
    return loss.detach(), list(grads)


def _assert_matches(got, want, rtol):
    (loss, grads), (ref_loss, ref_grads) = got, want
    torch.testing.assert_close(loss.double(), ref_loss, rtol=rtol, atol=0.0)
    assert len(grads) == len(ref_grads)
    for g, r in zip(grads, ref_grads, strict=True):
        scale = r.abs().max().item() or 1.0
        torch.testing.assert_close(g.double(), r, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("b", [2, 3, 17, 130, 513])
@pytest.mark.parametrize("ds,dt", [(1, 7), (7, 1), (64, 300), (300, 64)])
def test_cpu_matches_reference_float64(b, ds, dt, algorithm):
    torch.manual_seed(b * 1000 + ds + dt)
    s = torch.randn(b, ds, dtype=torch.float64, requires_grad=True)
    t = torch.randn(b, dt, dtype=torch.float64)
    got = _fused(s, [t], 0.8, 0.05, algorithm)
    _assert_matches(got, _reference64(s, [t], 0.8, 0.05), rtol=1e-10)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("b,ds,dt", [(3, 7, 64), (130, 64, 300), (513, 300, 7)])
def test_cpu_matches_reference_float32(b, ds, dt, algorithm):
    torch.manual_seed(b + ds)
    s = torch.randn(b, ds, requires_grad=True)
    t = torch.randn(b, dt)
    got = _fused(s, [t], 1.0, 0.1, algorithm)
    assert got[0].dtype == torch.float32 and got[1][0].dtype == torch.float32
    _assert_matches(got, _reference64(s, [t], 1.0, 0.1), rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_cpu_half_inputs_accumulate_in_float32(dtype, algorithm):
    torch.manual_seed(7)
    s = torch.randn(37, 24).to(dtype).requires_grad_()
    t = torch.randn(37, 40).to(dtype)
    loss, (grad,) = _fused(s, [t], 1.0, 0.2, algorithm)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    # Inputs are exact in float64, so the only error left is float32 accumulation and the
    # rounding of the gradient to the input dtype.
    ref_loss, (ref_grad,) = _reference64(s, [t], 1.0, 0.2)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=0.0)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(grad.double(), ref_grad, rtol=tol, atol=tol * ref_grad.abs().max())


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("widths", [[5], [3, 17], [1, 64, 9], [8, 8, 30, 2]])
def test_ensemble_of_teachers_with_different_widths(widths, algorithm):
    torch.manual_seed(len(widths))
    b = 41
    s = torch.randn(b, 12, dtype=torch.float64, requires_grad=True)
    ts = [torch.randn(b, w, dtype=torch.float64) for w in widths]
    got = _fused(s, ts, 1.3, 0.0, algorithm)
    _assert_matches(got, _reference64(s, ts, 1.3, 0.0), rtol=1e-10)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_teachers_requiring_grad_get_the_symmetric_gradient(algorithm):
    torch.manual_seed(3)
    b = 300  # more than one 256-row tile
    s = torch.randn(b, 10, dtype=torch.float64, requires_grad=True)
    ts = [torch.randn(b, w, dtype=torch.float64, requires_grad=True) for w in (6, 19)]
    got = _fused(s, ts, 0.9, 0.1, algorithm)
    assert len(got[1]) == 3
    _assert_matches(got, _reference64(s, ts, 0.9, 0.1), rtol=1e-10)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_zero_rows_are_finite_and_match_reference(algorithm):
    torch.manual_seed(4)
    s = torch.randn(19, 8, dtype=torch.float64)
    t = torch.randn(19, 5, dtype=torch.float64)
    s[[0, 7]] = 0.0
    t[[7, 11]] = 0.0
    s.requires_grad_()
    loss, grads = _fused(s, [t], 1.0, 0.5, algorithm)
    assert torch.isfinite(loss) and torch.isfinite(grads[0]).all()
    _assert_matches((loss, grads), _reference64(s, [t], 1.0, 0.5), rtol=1e-10)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_non_contiguous_inputs(algorithm):
    torch.manual_seed(5)
    base_s = torch.randn(20, 33, dtype=torch.float64)
    s = base_s.T[1:18].detach().requires_grad_()  # (17, 20), column-major
    t = torch.randn(40, 17, dtype=torch.float64).T[:, ::2]  # (17, 20), doubly strided
    assert not s.is_contiguous() and not t.is_contiguous()
    got = _fused(s, [t], 1.0, 0.3, algorithm)
    _assert_matches(got, _reference64(s, [t], 1.0, 0.3), rtol=1e-10)


def test_gradcheck_float64():
    torch.manual_seed(6)
    s = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    t1 = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    t2 = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    for algorithm in ALGORITHMS:

        def fn(a, b, c, algorithm=algorithm):
            return fastkd.fkd_loss(a, [b, c], 0.7, 0.2, backend="cpu", algorithm=algorithm)

        assert torch.autograd.gradcheck(fn, (s, t1, t2))


def test_deterministic_across_calls():
    torch.manual_seed(8)
    s = torch.randn(700, 50, requires_grad=True)
    t = torch.randn(700, 30)
    a = _fused(s, [t], 1.0, 0.1, "tiled")
    b = _fused(s, [t], 1.0, 0.1, "tiled")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1][0], b[1][0])


def test_opcheck_compiled_ops():
    torch.manual_seed(9)
    s = torch.randn(17, 6, dtype=torch.float64, requires_grad=True)
    ts = [torch.randn(17, 4, dtype=torch.float64), torch.randn(17, 9, dtype=torch.float64)]
    torch.library.opcheck(torch.ops.fastkd.fkd_forward, (s, ts, 0.5, 0.25))
    ts_grad = [t.clone().requires_grad_() for t in ts]
    torch.library.opcheck(torch.ops.fastkd.fkd_forward, (s, ts_grad, 1.0, 0.0))
    grad = torch.tensor(1.5, dtype=torch.float64)
    for teachers_grad in (False, True):
        torch.library.opcheck(
            torch.ops.fastkd.fkd_backward, (grad, s.detach(), ts, 0.5, 0.25, teachers_grad)
        )
        torch.library.opcheck(
            torch.ops.fastkd.fkd_forward_backward, (s.detach(), ts, 0.5, 0.25, teachers_grad)
        )


def test_forward_backward_op_equals_forward_then_backward():
    torch.manual_seed(13)
    s = torch.randn(300, 9, dtype=torch.float64)
    ts = [torch.randn(300, 4, dtype=torch.float64), torch.randn(300, 11, dtype=torch.float64)]
    loss, gs, gts = torch.ops.fastkd.fkd_forward_backward(s, ts, 0.6, 0.3, True)
    want_gs, want_gts = torch.ops.fastkd.fkd_backward(
        torch.tensor(1.0, dtype=torch.float64), s, ts, 0.6, 0.3, True
    )
    torch.testing.assert_close(loss, torch.ops.fastkd.fkd_forward(s, ts, 0.6, 0.3))
    torch.testing.assert_close(gs, want_gs)
    for g, w in zip(gts, want_gts, strict=True):
        torch.testing.assert_close(g, w)


def test_second_derivatives_are_refused_not_silently_wrong():
    s = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 2, dtype=torch.float64)
    for algorithm in ALGORITHMS:
        loss = fastkd.fkd_loss(s, t, backend="cpu", algorithm=algorithm)
        (g,) = torch.autograd.grad(loss, s, create_graph=True)
        with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
            g.sum().backward()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_training_step(backend):
    torch.manual_seed(10)
    student = torch.nn.Linear(12, 8).double()
    x = torch.randn(33, 12, dtype=torch.float64)
    teacher_feats = [torch.randn(33, 20, dtype=torch.float64), torch.randn(33, 5).double()]
    loss_fn = fastkd.FKDLoss(kd_weight=1.0, fr_weight=0.1, backend="cpu", algorithm="tiled")

    def step(x, ts):
        return loss_fn(student(x), ts)

    eager = step(x, teacher_feats)
    eager.backward()
    eager_grad = student.weight.grad.clone()
    student.zero_grad()
    # fullgraph: any graph break (e.g. in backend resolution or a missing fake kernel) fails.
    compiled = torch.compile(step, fullgraph=True, backend=backend)(x, teacher_feats)
    compiled.backward()  # runs the AOT-compiled backward graph
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(student.weight.grad, eager_grad)


def test_module_matches_function_and_repr():
    torch.manual_seed(11)
    s, t = torch.randn(9, 4), torch.randn(9, 6)
    mod = fastkd.FKDLoss(0.5, 0.2, backend="cpu")
    assert mod(s, t).item() == pytest.approx(fastkd.fkd_loss(s, t, 0.5, 0.2).item())
    assert "kd_weight=0.5" in repr(mod)


def test_auto_algorithm_cost_model():
    from fastkd.fkd import choose_algorithm

    assert choose_algorithm("auto", 16384, 128, 128) == "dual"
    assert choose_algorithm("auto", 256, 2048, 2048) == "tiled"
    assert choose_algorithm("tiled", 16384, 1, 1) == "tiled"
    with pytest.raises(ValueError, match="algorithm"):
        choose_algorithm("fast", 4, 4, 4)


def test_dual_survives_cancellation_when_student_equals_teacher():
    torch.manual_seed(12)
    t = torch.randn(2000, 16)
    s = (t + 1e-4 * torch.randn(2000, 16)).requires_grad_()
    got = _fused(s, [t], 1.0, 0.0, "dual")
    _assert_matches(got, _reference64(s, [t], 1.0, 0.0), rtol=1e-5)


@pytest.mark.parametrize(
    "student,teacher,kwargs,error,match",
    [
        ("not a tensor", torch.randn(4, 3), {}, TypeError, "student"),
        (torch.randn(4, 3), "nope", {}, TypeError, "teacher"),
        (torch.randn(4), torch.randn(4, 3), {}, ValueError, "student must be 2-D"),
        (torch.randn(4, 3), torch.randn(4, 3, 1), {}, ValueError, "teacher must be 2-D"),
        (torch.randn(4, 3), torch.randn(5, 3), {}, ValueError, "batch size"),
        (torch.randn(1, 3), torch.randn(1, 3), {}, ValueError, "at least 2"),
        (torch.randn(0, 3), torch.randn(0, 3), {}, ValueError, "empty"),
        (torch.randn(4, 3), [], {}, ValueError, "at least one"),
        (
            torch.randn(4, 3),
            [torch.randn(4, 2), torch.randn(3, 2)],
            {},
            ValueError,
            r"teacher\[1\]",
        ),
        (torch.ones(4, 3, dtype=torch.int64), torch.randn(4, 3), {}, TypeError, "float16"),
        (
            torch.randn(4, 3),
            torch.randn(4, 3),
            {"kd_weight": float("nan")},
            ValueError,
            "kd_weight",
        ),
        (
            torch.randn(4, 3),
            torch.randn(4, 3),
            {"fr_weight": float("inf")},
            ValueError,
            "fr_weight",
        ),
        (torch.randn(4, 3), torch.randn(4, 3), {"fr_weight": "1"}, TypeError, "fr_weight"),
        (torch.randn(4, 3), torch.randn(4, 3), {"algorithm": "x"}, ValueError, "algorithm"),
        (torch.randn(4, 3), torch.randn(4, 3), {"backend": "tpu"}, ValueError, "backend"),
    ],
)
def test_bad_input_is_a_clear_error(student, teacher, kwargs, error, match):
    with pytest.raises(error, match=match):
        fastkd.fkd_loss(student, teacher, **kwargs)


def test_mismatched_devices_are_rejected():
    s = torch.randn(4, 3)
    t = torch.randn(4, 3, device="meta")
    with pytest.raises(ValueError, match="teacher is on meta but student is on cpu"):
        fastkd.fkd_loss(s, t)


def test_nan_in_features_propagates():
    s, t = torch.randn(6, 3), torch.randn(6, 3)
    s[2, 1] = float("nan")
    for algorithm in ALGORITHMS:
        assert torch.isnan(fastkd.fkd_loss(s, t, backend="cpu", algorithm=algorithm))
    assert torch.isnan(fastkd.fkd_loss(s, t, backend="reference"))


def test_op_autograd_with_only_some_teachers_requiring_grad():
    torch.manual_seed(14)
    s = torch.randn(21, 3, dtype=torch.float64, requires_grad=True)
    t1 = torch.randn(21, 5, dtype=torch.float64, requires_grad=True)
    t2 = torch.randn(21, 2, dtype=torch.float64)
    loss = torch.ops.fastkd.fkd_forward(s, [t1, t2], 0.9, 0.2)
    got = torch.autograd.grad(loss, [s, t1])
    want = torch.autograd.grad(reference.fkd_loss(s, [t1, t2], 0.9, 0.2), [s, t1])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-6)])
@pytest.mark.parametrize("b,ds,dts", [(513, 7, [64]), (1000, 16, [5, 40]), (4000, 3, [2])])
def test_dual_matches_reference_to_1e6(b, ds, dts, dtype, rtol):
    # The dual algorithm works in float64 whatever the input, so even float32 inputs land within
    # 1e-6 of the float64 reference (value and gradients), teachers requiring grad included.
    torch.manual_seed(b + ds)
    s = torch.randn(b, ds, dtype=dtype, requires_grad=True)
    ts = [torch.randn(b, d, dtype=dtype, requires_grad=True) for d in dts]
    got = _fused(s, ts, 1.0, 0.05, "dual")
    _assert_matches(got, _reference64(s, ts, 1.0, 0.05), rtol=rtol)
