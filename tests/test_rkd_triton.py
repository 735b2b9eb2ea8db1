"""RKD-distance-specific cases of the Triton backend (fastkd.triton.rkd), on the harness: the
forward op's own autograd, agreement with the CPU kernel on strided inputs, duplicate rows and
op-level bad input. The generic cases (value/gradients across 16-row tiles and 32-wide chunks,
raw ops, opcheck, compile, determinism; the GPU grid) are in test_ops.py.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set by
conftest.py) whatever the host has; with TRITON_INTERPRET=0 on a CUDA machine (``make test-gpu``)
the same tests run compiled on the GPU.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from harness import (  # noqa: E402
    F32,
    F64,
    INTERPRET,
    OPS,
    TRITON_DEVICE,
    Case,
    Result,
    assert_close,
    assert_matches,
    needs_cpu_kernels,
    needs_triton,
    oracle,
)

import fastkd.triton  # noqa: E402, F401  (registers the fastkd_triton ops)

ops = torch.ops.fastkd_triton
pytestmark = needs_triton
RKD = OPS["rkd"]


def _inputs(batch, ds, dt, dtype=F32):
    return RKD.inputs(Case("rkd", "triton", dtype, batch, (ds, dt)))


def test_forward_op_autograd_with_upstream_gradient():
    inputs = _inputs(33, 10, 6)
    s, t = inputs.leaves()
    loss = ops.rkd_forward(s, t)
    loss.backward(torch.tensor(-3.0, device=loss.device))
    got = Result(loss.detach(), [s.grad, t.grad])
    assert_matches(RKD, got, oracle(RKD, inputs, -3.0), inputs, -3.0)


@needs_cpu_kernels
@pytest.mark.skipif(not INTERPRET, reason="compares with the CPU kernel on CPU tensors")
def test_matches_cpu_kernel_on_strided_inputs():
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(40, 2, 37, generator=gen, dtype=F64)[:, 1]  # strided (40, 37)
    t = torch.randn(19, 40, generator=gen, dtype=F64).T  # (40, 19), column-major
    got = ops.rkd_forward_backward(s, t, True)
    want = torch.ops.fastkd.rkd_forward_backward(s, t, True)
    inputs = _inputs(40, 37, 19, F64)
    inputs.tensors = [s, t]
    value_terms, terms = RKD.terms(inputs.to64(), 1.0, F64)
    for g, w, k in zip(got, want, [value_terms, *terms], strict=True):
        assert_close(g, w.double(), F64, 1e-12, k)


def test_duplicate_rows():
    inputs = _inputs(20, 5, 4, F64)
    s, _ = inputs.tensors
    s[7] = s[3]
    loss, gs, gt = ops.rkd_forward_backward(*inputs.tensors, True)
    assert_matches(RKD, Result(loss, [gs, gt]), oracle(RKD, inputs), inputs)


def test_bad_input():
    s, t = _inputs(4, 3, 5).tensors
    with pytest.raises(ValueError, match="student"):
        ops.rkd_forward(s[0], t)
    with pytest.raises(TypeError, match="student"):
        ops.rkd_forward(s.to(torch.int32), t)
    with pytest.raises(ValueError, match="batch size"):
        ops.rkd_forward(s, _inputs(5, 5, 5).tensors[0])
    with pytest.raises(ValueError, match="at least 2"):
        ops.rkd_forward(s[:1], t[:1])
    with pytest.raises(ValueError, match="grad"):
        ops.rkd_backward(torch.ones(2, device=TRITON_DEVICE), s, t, False)
    if INTERPRET:
        with pytest.raises(TypeError, match="teacher is bfloat16"):
            ops.rkd_forward(s, t.bfloat16())
