"""RKD-distance-specific cases on the CPU backend (csrc/cpu/rkd.cpp), on the harness: feature maps,
duplicate and zero rows (the clamp), auto dispatch, the raw op's own autograd, unavailable
backends and the op's shape checks. The generic cases (value/gradients on odd shapes and tile
edges, half inputs, raw ops, opcheck, compile, determinism) are in test_ops.py."""

import pytest
import torch
from harness import F64, OPS, Case, assert_matches, needs_cpu_kernels, oracle, run

import fastkd

pytestmark = needs_cpu_kernels
RKD = OPS["rkd"]
GRAD_OUT = -2.5


def test_feature_maps_are_flattened_and_strided_inputs_accepted():
    gen = torch.Generator().manual_seed(5)
    case = Case("rkd", "cpu", F64, 19, (12, 6))
    inputs = RKD.inputs(case)
    s = torch.randn(19, 3, 4, 2, generator=gen, dtype=F64)[:, :, ::2]  # (19, 3, 2, 2) -> 12
    t = torch.randn(6, 19, generator=gen, dtype=F64).T  # (19, 6), not contiguous
    inputs.tensors = [s, t]
    got = run(RKD, inputs, "cpu", "auto", GRAD_OUT)
    assert got.grads[0].shape == s.shape
    assert_matches(RKD, got, oracle(RKD, inputs, GRAD_OUT), inputs, GRAD_OUT)


def test_duplicate_and_zero_rows_use_the_clamp_like_the_reference():
    # Duplicates give q = 0 < 1e-12: d = 1e-6 and no gradient through the clamp.
    inputs = RKD.inputs(Case("rkd", "cpu", F64, 40, (8, 8)))
    s, t = inputs.tensors
    s[5], t[5] = s[9], t[9]
    s[11] = 0.0
    t[20] = 0.0
    got = run(RKD, inputs, "cpu", "auto", GRAD_OUT)
    assert all(torch.isfinite(g).all() for g in got.grads)
    assert_matches(RKD, got, oracle(RKD, inputs, GRAD_OUT), inputs, GRAD_OUT)


def test_auto_is_the_cpu_kernel_and_the_teacher_gets_no_grad_unless_asked():
    inputs = RKD.inputs(Case("rkd", "cpu", torch.float32, 31, (6, 9), teacher_grad=False))
    auto, cpu = run(RKD, inputs, "auto"), run(RKD, inputs, "cpu")
    assert auto.grads[1] is None
    assert torch.equal(auto.loss, cpu.loss) and torch.equal(auto.grads[0], cpu.grads[0])


def test_gradcheck_of_the_raw_op_autograd():
    s, t = (x.requires_grad_() for x in RKD.inputs(Case("rkd", "cpu", F64, 9, (3, 4))).tensors)
    assert torch.autograd.gradcheck(torch.ops.fastkd.rkd_forward, (s, t))


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
