"""RKD-distance-specific cases on the CUDA backend (csrc/cuda/rkd.cu), on the harness: mixed dtypes
and the teacher-gradient flag, duplicate/zero rows and NaN, strided inputs giving bitwise the
contiguous result, the current stream, agreement with Triton and the CPU kernel. The generic cases
(every dtype, odd batch sizes across the 64-row tiles, raw ops, opcheck, compile, bit-identical
reruns) are in test_ops.py. Needs a CUDA device and an extension built with FASTKD_BUILD_CUDA=1;
every test is marked ``gpu``. Without a GPU the kernels run on the CPU emulator
(tests/emulator/test_rkd_emulator.py, tools/cuda_emulator)."""

import pytest
import torch
from harness import (
    BF16,
    F16,
    F32,
    F64,
    OPS,
    TOL,
    Case,
    assert_close,
    assert_matches,
    needs_cuda_kernels,
    needs_triton_gpu,
    oracle,
    run,
)

pytestmark = [pytest.mark.gpu, needs_cuda_kernels]
RKD = OPS["rkd"]
ops = torch.ops.fastkd


def _inputs(b, ds, dt, dtype_s, dtype_t=None):
    inputs = RKD.inputs(Case("rkd", "cuda", F64, b, (ds, dt)))
    s, t = inputs.tensors
    inputs.tensors = [s.to(dtype_s), t.to(dtype_t or dtype_s)]
    return inputs


def test_teacher_grad_flag_and_mixed_dtypes():
    inputs = _inputs(65, 24, 40, F16, F32)
    s, t = inputs.tensors
    gs, gt = ops.rkd_backward(torch.tensor(1.0, device="cuda"), s, t, False)
    assert gt.shape == (0,) and gs.dtype == F16
    loss, gs, gt = ops.rkd_forward_backward(s, t, True)
    assert loss.dtype == F32 and gs.dtype == F16 and gt.dtype == F32
    want = oracle(RKD, inputs)
    _, terms = RKD.terms(inputs.to64(), 1.0, F16)
    assert_close(loss, want.loss, F32, TOL[F32].value, what="loss")
    assert_close(gs, want.grads[0], F16, TOL[F16].grad, terms[0], "student grad")
    assert_close(gt, want.grads[1], F32, TOL[F32].grad, terms[1], "teacher grad")
    s64, t16 = _inputs(65, 24, 40, F64, BF16).tensors
    loss, gs, gt = ops.rkd_forward_backward(s64, t16, True)
    assert loss.dtype == F64 and gs.dtype == F64 and gt.dtype == BF16


def test_duplicate_zero_rows_and_nan():
    inputs = _inputs(40, 8, 8, F64)
    s, t = inputs.tensors
    s[5], t[5] = s[9], t[9]
    s[11] = 0.0
    t[20] = 0.0
    assert_matches(
        RKD, run(RKD, inputs, "cuda", "auto", 0.75), oracle(RKD, inputs, 0.75), inputs, 0.75
    )
    s[3, 2] = float("nan")
    loss, gs, gt = ops.rkd_forward_backward(s, t, True)
    assert loss.isnan() and gs.isnan().all() and gt.isnan().all()


def test_non_contiguous_inputs_give_the_contiguous_result():
    s, t = _inputs(70, 12, 20, F32).tensors
    s_nc = s.repeat(1, 2)[:, ::2]
    t_nc = t.T.contiguous().T
    assert not s_nc.is_contiguous() and not t_nc.is_contiguous()
    a = ops.rkd_forward_backward(s, t, True)
    b = ops.rkd_forward_backward(s_nc, t_nc, True)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_runs_on_the_current_stream():
    s, t = _inputs(300, 33, 7, F32).tensors
    want = ops.rkd_forward_backward(s, t, True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = ops.rkd_forward_backward(s, t, True)
    stream.synchronize()
    for x, y in zip(want, got, strict=True):
        assert torch.equal(x, y)


@needs_triton_gpu
@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_agrees_with_triton_and_cpu(dtype):
    inputs = _inputs(333, 40, 24, dtype)
    tol = TOL[dtype]
    _, terms = RKD.terms(inputs.to64(), 1.0, dtype)
    cuda = run(RKD, inputs, "cuda")
    others = [run(RKD, inputs, "triton"), run(RKD, inputs.map(lambda x: x.cpu()), "cpu")]
    for other in others:
        assert_close(other.loss, cuda.loss.double(), dtype, tol.value, what="loss")
        for i, (g, w) in enumerate(zip(other.grads, cuda.grads, strict=True)):
            assert_close(g, w.double(), dtype, tol.grad, terms[i], f"grad[{i}]")
