"""SRD (SPEC §3): the compiled CPU kernels, the autograd Function and SRDLoss against the float64
reference, nn.BatchNorm1d, and the SPEC's bad-input rules."""

import math

import pytest
import torch
from srd_helpers import (
    TOL,
    assert_log_tiny_and_zero_grads,
    assert_matches,
    assert_nan_loss_keeps_student_stats,
    assert_same_runs,
    make_buffers,
    make_inputs,
    opcheck_srd_ops,
    rel_err,
    run,
    train_grad_scales,
)
from torch import nn

import fastkd
from fastkd import reference

# B = 2 normalises every column to +-c, so d can be exactly 0 where h = sign(d) jumps (p = 1):
# the p = 1 cases use B >= 3.
SHAPES = [(2, 7), (3, 1), (17, 64), (130, 300)]
POWERS = [1.0, 2.0, 3.0, 4.0, 4.5]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("p", POWERS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_matches_reference(dtype, shape, p, training):
    if p == 1.0 and shape[0] == 2:
        pytest.skip("h = sign(d) is discontinuous at the d = 0 that B = 2 produces")
    student, teacher = make_inputs(*shape, dtype=dtype, seed=hash((shape, p)) % 1000)
    buffers = make_buffers(shape[1])
    fused = run("cpu", student, teacher, p, training, buffers)
    ref = run("reference64", student, teacher, p, training, buffers)
    assert fused[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert fused[1].dtype == dtype and fused[2].dtype == dtype
    scales = train_grad_scales(student, teacher, p) if training else (0.0, 0.0)
    assert_matches(fused, ref, TOL[dtype], scales=scales, what=f"{dtype} {shape} p={p}")


@pytest.mark.parametrize("p", [6.0, 8.0, 9.0, 1.5])
def test_cpu_other_powers(p):
    # 5..8 take the run-time integer loop, 9 and 1.5 pow().
    student, teacher = make_inputs(17, 9, dtype=torch.float64, seed=int(p * 10))
    fused = run("cpu", student, teacher, p, True, make_buffers(9))
    ref = run("reference64", student, teacher, p, True, make_buffers(9))
    assert_matches(fused, ref, TOL[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
def test_cpu_half_precision_inputs(dtype, training):
    student, teacher = make_inputs(33, 20, dtype=dtype, seed=3)
    buffers = make_buffers(20)
    fused = run("cpu", student, teacher, 4.0, training, buffers)
    ref = run("reference64", student, teacher, 4.0, training, buffers)
    assert fused[0].dtype == torch.float32 and fused[1].dtype == dtype
    # float32 arithmetic on the same half-precision values: only the gradients' rounding to
    # the input dtype differs.
    assert rel_err(fused[0], ref[0]) <= 1e-5
    assert_matches(fused, ref, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_long_batch_and_several_column_blocks(dtype):
    # B > 256 rows (several row chunks, Chan merges) and D > 64 columns (several tasks).
    student, teacher = make_inputs(600, 70, dtype=dtype, seed=5, offset=3.0)
    fused = run("cpu", student, teacher, 4.0, True, make_buffers(70))
    ref = run("reference64", student, teacher, 4.0, True, make_buffers(70))
    assert_matches(fused, ref, TOL[dtype])


def large_offset_inputs(dtype):
    """Features around 1e4 and -3e4, some columns spread over a few ulps only."""
    student, teacher = make_inputs(130, 64, dtype=torch.float64, seed=7)
    student = student + 1e4
    student[:, :8] = 1e4 + 1e-3 * student[:, :8]
    teacher[:, 8:16] = -3e4 + 0.01 * teacher[:, 8:16]
    buffers = make_buffers(64)
    buffers[0] += 1e4
    return student.to(dtype), teacher.to(dtype), buffers


def shifted_oracle(student, teacher, p, training, buffers):
    """The float64 reference on inputs shifted by their first row: the shift is exact (nearby
    values) and leaves loss and gradients unchanged, while the plain float64 reference loses
    digits to the offset (1e4 / std 2e-3 times float64's eps)."""
    x0, t0 = student[0].double(), teacher[0].double()
    shifted = [
        buffers[0].double() - x0,
        buffers[1].double(),
        buffers[2].double() - t0,
        buffers[3].double(),
    ]
    return run("reference64", student.double() - x0, teacher.double() - t0, p, training, shifted)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_large_offset_and_near_constant_columns(dtype, training):
    # fp32 values near 1e4 have an ulp of ~1e-3: the kernels' shifted statistics keep s exact.
    student, teacher, buffers = large_offset_inputs(dtype)
    loss, gs, gt, bufs = run("cpu", student, teacher, 4.0, training, buffers)
    oracle = shifted_oracle(student, teacher, 4.0, training, buffers)
    assert_matches((loss, gs, gt, [None] * 4), oracle, TOL[dtype])
    ref_bufs = run("reference64", student, teacher, 4.0, training, buffers)[3]
    for b, rb in zip(bufs, ref_bufs, strict=True):
        assert rel_err(b, rb) <= 1e-6


@pytest.mark.parametrize("p", [1.0, 4.0, 4.5])
def test_zero_variance_columns(p):
    student, teacher = make_inputs(17, 9, dtype=torch.float32, seed=11)
    student[:, 0] = 2.5  # constant column: var = 0, s = 0 exactly
    teacher[:, 1] = -1.25
    student[:, 2], teacher[:, 2] = 7.0, 7.0  # both constant: d = 0
    fused = run("cpu", student, teacher, p, True, make_buffers(9))
    ref = run("reference64", student, teacher, p, True, make_buffers(9))
    assert_matches(fused, ref, TOL[torch.float32])
    assert torch.all(fused[1][:, 2] == 0) and torch.all(fused[2][:, 2] == 0)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_identical_inputs_give_log_tiny_and_zero_gradient(dtype, training):
    x, _ = make_inputs(13, 6, dtype=dtype, seed=2)
    buffers = make_buffers(6)
    buffers[2:] = [b.clone() for b in buffers[:2]]  # same running statistics on both sides
    assert_log_tiny_and_zero_grads(run("cpu", x, x.clone(), 4.0, training, buffers))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_propagate_and_leave_running_stats(bad):
    student, teacher = make_inputs(9, 5, seed=4)
    student[3, 2] = bad
    buffers = make_buffers(5)
    fused = run("cpu", student, teacher, 4.0, True, buffers)
    rloss, _, _, rbufs = run("reference64", student, teacher, 4.0, True, buffers)
    assert_nan_loss_keeps_student_stats(fused, buffers)
    assert math.isnan(rloss.item())
    _, gs, _, bufs = fused
    assert torch.isnan(gs).any()
    # The teacher side is finite, so its statistics are updated (as the reference does).
    assert not torch.equal(bufs[2], buffers[2])
    torch.testing.assert_close(bufs[2], rbufs[2], rtol=1e-6, atol=1e-7)
    # Eval mode: an Inf feature gives an infinite loss, NaN a NaN one, as in the reference.
    loss, *_ = run("cpu", student, teacher, 4.0, False, buffers)
    rloss, *_ = run("reference64", student, teacher, 4.0, False, buffers)
    assert (math.isnan(loss.item()) and math.isnan(rloss.item())) or loss.item() == rloss.item()


def test_teacher_without_grad_gets_none_and_same_student_grad():
    student, teacher = make_inputs(11, 4, seed=8)
    with_t = run("cpu", student, teacher, 4.0, True, teacher_grad=True)
    without_t = run("cpu", student, teacher, 4.0, True, teacher_grad=False)
    assert without_t[2] is None
    assert torch.equal(with_t[0], without_t[0]) and torch.equal(with_t[1], without_t[1])


def test_non_contiguous_and_mixed_dtype_inputs():
    base_s, base_t = make_inputs(10, 12, dtype=torch.float32, seed=9)
    student = base_s.t().contiguous().t()  # column-major view
    teacher = base_t.double()[:, ::1]
    assert not student.is_contiguous()
    loss = fastkd.srd_loss(student, teacher, backend="cpu")
    assert loss.dtype == torch.float64  # float64 if an input is float64
    ref = reference.srd_loss(student.double(), teacher)
    assert rel_err(loss, ref) <= 1e-10
    strided = torch.randn(10, 24)[:, ::2]
    loss = fastkd.srd_loss(strided, base_t, backend="cpu")
    assert rel_err(loss, reference.srd_loss(strided.double(), base_t.double())) <= 1e-5


def test_deterministic():
    student, teacher = make_inputs(300, 130, seed=12)
    first = run("cpu", student, teacher, 4.5, True)
    assert_same_runs(first, run("cpu", student, teacher, 4.5, True))


def test_running_stats_follow_reference_over_steps():
    width = 6
    buffers = [torch.zeros(width), torch.ones(width), torch.zeros(width), torch.ones(width)]
    ref_buffers = [b.clone() for b in buffers]
    for step in range(4):
        student, teacher = make_inputs(7 + step, width, seed=20 + step, offset=step)
        fastkd.srd_loss(student, teacher, 3.0, 1e-4, True, *buffers, momentum=0.3, backend="cpu")
        reference.srd_loss(student.double(), teacher.double(), 3.0, 1e-4, True, *ref_buffers, 0.3)
    for b, rb in zip(buffers, ref_buffers, strict=True):
        torch.testing.assert_close(b, rb, rtol=1e-6, atol=1e-7)


def test_opcheck_compiled_ops():
    student, teacher = make_inputs(9, 5, dtype=torch.float64, seed=13)
    buffers = [b.double() for b in make_buffers(5)]
    opcheck_srd_ops(
        torch.ops.fastkd.srd_forward.default,
        torch.ops.fastkd.srd_backward.default,
        student,
        teacher,
        buffers,
        grad=torch.tensor(1.5, dtype=torch.float64),
    )


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("p", [2.5, 4.0])
def test_gradcheck_float64(p, training):
    student, teacher = make_inputs(6, 3, dtype=torch.float64, seed=14)
    buffers = [b.double() for b in make_buffers(3)]
    student.requires_grad_()
    teacher.requires_grad_()

    def f(s, t):
        return fastkd.srd_loss(
            s, t, p, 1e-4, training, *[b.clone() for b in buffers], backend="cpu"
        )

    assert torch.autograd.gradcheck(f, (student, teacher))


def test_backend_table_and_reference_backend():
    report = fastkd.available_backends()
    assert report["cpu"]["available"] and "srd" in report["cpu"]["ops"]
    assert fastkd.resolve_backend("srd", None, torch.device("cpu")) in ("cpu",)
    student, teacher = make_inputs(5, 3, seed=15)
    loss = fastkd.srd_loss(student, teacher, backend="reference")
    assert loss.item() == reference.srd_loss(student, teacher).item()


def _bad_call(**overrides):
    student, teacher = make_inputs(4, 3, seed=16)
    kwargs = {"student": student, "teacher": teacher}
    kwargs.update(overrides)
    return fastkd.srd_loss(**kwargs, backend="cpu")


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"student": [[1.0]]}, TypeError, "student"),
        ({"student": torch.ones(4, 3, dtype=torch.int64)}, TypeError, "student"),
        ({"teacher": torch.ones(4)}, ValueError, "teacher"),
        ({"teacher": torch.ones(0, 3)}, ValueError, "teacher"),
        ({"teacher": torch.ones(4, 5)}, ValueError, "teacher has shape"),
        ({"teacher": torch.ones(5, 3)}, ValueError, "teacher has shape"),
        ({"student": torch.ones(1, 3), "teacher": torch.ones(1, 3)}, ValueError, "student"),
        ({"p": 0.5}, ValueError, "p must be >= 1"),
        ({"p": float("nan")}, ValueError, "p must be finite"),
        ({"p": "4"}, TypeError, "p must be a real number"),
        ({"eps": 0.0}, ValueError, "eps"),
        ({"momentum": 1.5}, ValueError, "momentum"),
        ({"momentum": float("inf")}, ValueError, "momentum"),
        ({"training": 1}, TypeError, "training"),
        ({"training": False}, ValueError, "running statistics"),
        ({"running_mean_s": torch.zeros(3)}, ValueError, "running_var_s"),
        (
            {"running_mean_t": torch.zeros(3), "running_var_t": torch.ones(4)},
            ValueError,
            "running_var_t",
        ),
        (
            {"running_mean_s": torch.zeros(3, dtype=torch.long), "running_var_s": torch.ones(3)},
            TypeError,
            "running_mean_s",
        ),
        (
            {"running_mean_s": [0.0] * 3, "running_var_s": torch.ones(3)},
            TypeError,
            "running_mean_s",
        ),
    ],
)
def test_bad_input(overrides, error, match):
    with pytest.raises(error, match=match):
        _bad_call(**overrides)


def test_batch_of_one_is_fine_in_eval_mode():
    student, teacher = make_inputs(1, 3, seed=17)
    buffers = make_buffers(3)
    loss = fastkd.srd_loss(student, teacher, 4.0, 1e-4, False, *buffers, backend="cpu")
    ref = reference.srd_loss(student.double(), teacher.double(), 4.0, 1e-4, False, *buffers)
    assert rel_err(loss, ref) <= 1e-5


def test_unknown_backend():
    student, teacher = make_inputs(4, 3, seed=18)
    with pytest.raises(ValueError, match="backend"):
        fastkd.srd_loss(student, teacher, backend="tpu")


# --- SRDLoss ------------------------------------------------------------------------------------


def _recipe(proj, bn_s, bn_t, fs, ft, p):
    """The explicit eager recipe SRDLoss replaces: Linear, BatchNorm1d(affine=False), LogSum."""
    diff = bn_s(proj(fs)) - bn_t(ft)
    return torch.log(diff.abs().pow(p).sum().clamp_min(torch.finfo(torch.float32).tiny))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_srd_loss_module_matches_linear_batchnorm_recipe(momentum):
    torch.manual_seed(0)
    ds, dt = 10, 6
    module = fastkd.SRDLoss(ds, dt, momentum=momentum, backend="cpu")
    proj = nn.Linear(ds, dt)
    proj.load_state_dict(module.projector.state_dict())
    bn_s = nn.BatchNorm1d(dt, eps=1e-4, momentum=momentum, affine=False)
    bn_t = nn.BatchNorm1d(dt, eps=1e-4, momentum=momentum, affine=False)
    opt = torch.optim.SGD(module.parameters(), lr=0.05)
    opt_ref = torch.optim.SGD(proj.parameters(), lr=0.05)
    for step in range(4):
        fs = torch.randn(8 + step, ds)
        ft = torch.randn(8 + step, dt) * 2 + 1
        loss = module(fs, ft)
        ref = _recipe(proj, bn_s, bn_t, fs, ft, 4.0)
        assert rel_err(loss, ref) <= 1e-5
        opt.zero_grad()
        opt_ref.zero_grad()
        loss.backward()
        ref.backward()
        assert rel_err(module.projector.weight.grad, proj.weight.grad) <= 1e-5
        opt.step()
        opt_ref.step()
    for mine, bn in (("s", bn_s), ("t", bn_t)):
        torch.testing.assert_close(getattr(module, f"running_mean_{mine}"), bn.running_mean)
        torch.testing.assert_close(getattr(module, f"running_var_{mine}"), bn.running_var)
    assert module.num_batches_tracked.item() == bn_s.num_batches_tracked.item() == 4

    module.eval()
    proj.eval(), bn_s.eval(), bn_t.eval()
    fs, ft = torch.randn(5, ds), torch.randn(5, dt)
    with torch.no_grad():
        assert rel_err(module(fs, ft), _recipe(proj, bn_s, bn_t, fs, ft, 4.0)) <= 1e-5

    # state_dict round trip: a fresh module loads the buffers and gives the same eval loss.
    state = module.state_dict()
    assert set(state) == {
        "projector.weight",
        "projector.bias",
        "running_mean_s",
        "running_var_s",
        "running_mean_t",
        "running_var_t",
        "num_batches_tracked",
    }
    clone = fastkd.SRDLoss(ds, dt, momentum=momentum, backend="cpu")
    clone.load_state_dict(state)
    clone.eval()
    with torch.no_grad():
        assert torch.equal(clone(fs, ft), module(fs, ft))


def test_srd_loss_module_batch_of_one_and_modes():
    module = fastkd.SRDLoss(4, 4, backend="cpu")
    assert module.projector is None
    with pytest.raises(ValueError, match="more than 1 value"):
        module(torch.randn(1, 4), torch.randn(1, 4))
    assert module.num_batches_tracked.item() == 0  # nothing counted for a rejected batch
    module.eval()
    assert math.isfinite(module(torch.randn(1, 4), torch.randn(1, 4)).item())
    untracked = fastkd.SRDLoss(4, 4, track_running_stats=False, backend="cpu").eval()
    assert untracked.running_mean_s is None and "running_mean_s" not in untracked.state_dict()
    fs, ft = torch.randn(6, 4), torch.randn(6, 4)
    # Without running statistics, eval mode normalises with the batch statistics.
    assert rel_err(untracked(fs, ft), reference.srd_loss(fs.double(), ft.double())) <= 1e-5
    with pytest.raises(ValueError, match="more than 1 value"):
        untracked(torch.randn(1, 4), torch.randn(1, 4))


def test_srd_loss_module_projector_options():
    assert isinstance(fastkd.SRDLoss(4, 4, projector=True).projector, nn.Linear)
    assert isinstance(fastkd.SRDLoss(3, 4).projector, nn.Linear)
    custom = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 4))
    assert fastkd.SRDLoss(3, 4, projector=custom).projector is custom
    with pytest.raises(ValueError, match="projector=False"):
        fastkd.SRDLoss(3, 4, projector=False)
    with pytest.raises(TypeError, match="projector"):
        fastkd.SRDLoss(3, 4, projector="linear")
    with pytest.raises(ValueError, match="student_dim"):
        fastkd.SRDLoss(0, 4)
    with pytest.raises(ValueError, match="p must be"):
        fastkd.SRDLoss(4, 4, p=0.0)
    module = fastkd.SRDLoss(3, 4, backend="cpu")
    with pytest.raises(ValueError, match="student_features"):
        module(torch.randn(5, 4), torch.randn(5, 4))
    with pytest.raises(ValueError, match="teacher_features"):
        module(torch.randn(5, 3), torch.randn(5, 3))
    assert "teacher_dim=4" in repr(module)


def test_srd_loss_module_skips_non_finite_batches():
    module = fastkd.SRDLoss(3, 3, backend="cpu")
    fs, ft = torch.randn(6, 3), torch.randn(6, 3)
    fs[0, 0] = float("nan")
    before = {k: v.clone() for k, v in module.state_dict().items()}
    assert math.isnan(module(fs, ft).item())
    assert torch.equal(module.running_mean_s, before["running_mean_s"])
    assert torch.equal(module.running_var_s, before["running_var_s"])
    assert not torch.equal(module.running_mean_t, before["running_mean_t"])


def test_compiled_training_step_fullgraph():
    torch.manual_seed(1)
    module = fastkd.SRDLoss(5, 7, backend="cpu")
    eager = fastkd.SRDLoss(5, 7, backend="cpu")
    eager.load_state_dict(module.state_dict())
    compiled = torch.compile(module, fullgraph=True)
    for step in range(2):
        fs, ft = torch.randn(9, 5), torch.randn(9, 7)
        if step == 1:
            fs[2, 1] = float("inf")  # a non-finite batch: running statistics untouched
        loss = compiled(fs, ft)
        loss_eager = eager(fs, ft)
        if step == 0:
            loss.backward()
            loss_eager.backward()
            assert rel_err(loss, loss_eager) <= 1e-6
            grad, ref_grad = module.projector.weight.grad, eager.projector.weight.grad
            assert rel_err(grad, ref_grad) <= 1e-6
        for name, buf in eager.named_buffers():
            torch.testing.assert_close(module.get_buffer(name), buf)
    assert module.num_batches_tracked.item() == 2
