"""SRD-specific cases (SPEC §3) on the CPU backend, on the harness: large offsets, zero-variance
columns, identical inputs, non-finite batches and the running statistics, partial gradients,
mixed dtypes, the running update over steps, eval mode at B = 1, and SRDLoss against
nn.Linear + nn.BatchNorm1d (state dict, projector options, compiled training step). The generic
cases (every p and mode on odd shapes, half inputs, raw ops, opcheck, gradcheck, determinism,
bad input) are in test_ops.py."""

import math

import pytest
import torch
from harness import (
    F16,
    F32,
    F64,
    TOL,
    assert_close,
    assert_matches,
    needs_cpu_kernels,
    oracle,
    run,
)
from srd_helpers import (
    SRD,
    check_identical_inputs,
    check_nan_keeps_student_stats,
    large_offset_inputs,
    shifted_oracle,
    srd_case,
)
from torch import nn

import fastkd
from fastkd import reference

pytestmark = needs_cpu_kernels
GRAD_OUT = 1.3


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
def test_large_offset_and_near_constant_columns(dtype, training):
    # fp32 values near 1e4 have an ulp of ~1e-3: the kernels' shifted statistics keep s exact.
    inputs = large_offset_inputs(dtype)
    inputs.options["training"] = training
    got = run(SRD, inputs, "cpu", "auto", GRAD_OUT)
    shifted, want = shifted_oracle(inputs)
    value_terms, terms = SRD.terms(shifted, GRAD_OUT, dtype)
    assert_close(got.loss, want.loss, dtype, TOL[dtype].value, value_terms, "loss")
    for i in range(2):
        assert_close(got.grads[i], want.grads[i], dtype, TOL[dtype].grad, terms[i], f"grad[{i}]")
    ref_bufs = oracle(SRD, inputs, GRAD_OUT).buffers
    for b, rb in zip(got.buffers, ref_bufs, strict=True):
        assert_close(b, rb, F32, 1e-6)


@pytest.mark.parametrize("p", [1.0, 4.0, 4.5])
def test_zero_variance_columns(p):
    inputs = SRD.inputs(srd_case(17, 9, F32, p))
    student, teacher = inputs.tensors
    student[:, 0] = 2.5  # constant column: var = 0, s = 0 exactly
    teacher[:, 1] = -1.25
    student[:, 2], teacher[:, 2] = 7.0, 7.0  # both constant: d = 0
    got = run(SRD, inputs, "cpu", "auto", GRAD_OUT)
    assert_matches(SRD, got, oracle(SRD, inputs, GRAD_OUT), inputs, GRAD_OUT)
    assert torch.all(got.grads[0][:, 2] == 0) and torch.all(got.grads[1][:, 2] == 0)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [F64, F32, F16], ids=str)
def test_identical_inputs_give_log_tiny_and_zero_gradient(dtype, training):
    check_identical_inputs(SRD.inputs(srd_case(13, 6, dtype, training=training)), "cpu")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_propagate_and_leave_running_stats(bad):
    inputs = SRD.inputs(srd_case(9, 5))
    inputs.tensors[0][3, 2] = bad
    got = run(SRD, inputs, "cpu")
    want = oracle(SRD, inputs)
    assert math.isnan(got.loss.item()) and math.isnan(want.loss.item())
    assert torch.isnan(got.grads[0]).any()
    assert torch.equal(got.buffers[0], inputs.buffers[0])
    assert torch.equal(got.buffers[1], inputs.buffers[1])
    # The teacher side is finite, so its statistics are updated (as the reference does).
    assert not torch.equal(got.buffers[2], inputs.buffers[2])
    assert_close(got.buffers[2], want.buffers[2], F32, 1e-6)
    # Eval mode: an Inf feature gives an infinite loss, NaN a NaN one, as in the reference.
    inputs.options["training"] = False
    loss, want = run(SRD, inputs, "cpu").loss, oracle(SRD, inputs).loss
    assert (math.isnan(loss.item()) and math.isnan(want.item())) or loss.item() == want.item()


def test_nan_in_a_long_batch_keeps_the_student_stats():
    check_nan_keeps_student_stats(SRD.inputs(srd_case(300, 20)), "cpu")


def test_teacher_without_grad_gets_none_and_same_student_grad():
    inputs = SRD.inputs(srd_case(11, 4))
    with_t = run(SRD, inputs, "cpu")
    inputs.requires_grad = [True, False]
    without_t = run(SRD, inputs, "cpu")
    assert without_t.grads[1] is None
    assert torch.equal(with_t.loss, without_t.loss)
    assert torch.equal(with_t.grads[0], without_t.grads[0])


def test_mixed_dtype_inputs_run_in_float64():
    inputs = SRD.inputs(srd_case(10, 12, F32))
    inputs.tensors[1] = inputs.tensors[1].double()
    got = run(SRD, inputs, "cpu", "auto", GRAD_OUT)
    assert got.loss.dtype == F64  # float64 if an input is float64
    assert got.grads[0].dtype == F32 and got.grads[1].dtype == F64
    want = oracle(SRD, inputs, GRAD_OUT)
    _, terms = SRD.terms(inputs.to64(), GRAD_OUT, F32)
    assert_close(got.loss, want.loss, F64, TOL[F64].value)
    assert_close(got.grads[0], want.grads[0], F32, TOL[F32].grad, terms[0])


def test_running_stats_follow_reference_over_steps():
    width = 6
    buffers = [torch.zeros(width), torch.ones(width), torch.zeros(width), torch.ones(width)]
    ref_buffers = [b.clone() for b in buffers]
    for step in range(4):
        student, teacher = SRD.inputs(srd_case(7 + step, width, offset=float(step))).tensors
        fastkd.srd_loss(student, teacher, 3.0, 1e-4, True, *buffers, momentum=0.3, backend="cpu")
        reference.srd_loss(student.double(), teacher.double(), 3.0, 1e-4, True, *ref_buffers, 0.3)
    for b, rb in zip(buffers, ref_buffers, strict=True):
        assert_close(b, rb, F32, 1e-6)


def test_backend_table_and_reference_backend():
    report = fastkd.available_backends()
    assert report["cpu"]["available"] and "srd" in report["cpu"]["ops"]
    assert fastkd.resolve_backend("srd", None, torch.device("cpu")) == "cpu"


def test_batch_of_one_is_fine_in_eval_mode():
    inputs = SRD.inputs(srd_case(1, 3, training=False))
    got = run(SRD, inputs, "cpu", "auto", GRAD_OUT)
    assert_matches(SRD, got, oracle(SRD, inputs, GRAD_OUT), inputs, GRAD_OUT)


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
        assert_close(loss, ref, F32, TOL[F32].value)
        opt.zero_grad()
        opt_ref.zero_grad()
        loss.backward()
        ref.backward()
        assert_close(module.projector.weight.grad, proj.weight.grad, F32, 1e-5)
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
        assert_close(module(fs, ft), _recipe(proj, bn_s, bn_t, fs, ft, 4.0), F32, 1e-5)

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
    assert_close(untracked(fs, ft), reference.srd_loss(fs.double(), ft.double()), F32, 1e-5)
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
            assert_close(loss, loss_eager, F32, 1e-6)
            grad, ref_grad = module.projector.weight.grad, eager.projector.weight.grad
            assert_close(grad, ref_grad, F32, 1e-6)
        for name, buf in eager.named_buffers():
            torch.testing.assert_close(module.get_buffer(name), buf)
    assert module.num_batches_tracked.item() == 2
