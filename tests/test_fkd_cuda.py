"""FKD-specific cases on the CUDA backend, on the harness (the generic value/gradient, raw-op,
opcheck, compile and determinism cases of the cuda backend are in test_ops.py). Needs a GPU and
an extension built with FASTKD_BUILD_CUDA=1; every test is marked ``gpu``.

Run on a GPU machine with ``make test-gpu`` or ``pytest -q -m gpu tests/test_fkd_cuda.py``.
"""

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
    oracle,
    run,
)

import fastkd

pytestmark = [pytest.mark.gpu, needs_cuda_kernels]
FKD = OPS["fkd"]
GRAD_OUT = -0.37


def _check(case: Case, inputs=None, rows=None):
    inputs = inputs or FKD.inputs(case)
    got = run(FKD, inputs, "cuda", "tiled", GRAD_OUT)
    want = oracle(FKD, inputs, GRAD_OUT)
    assert_matches(FKD, got, want, inputs, GRAD_OUT, what=case.id, rows=rows)
    return got


@pytest.mark.parametrize("dtype", [F64, F32, F16], ids=str)
@pytest.mark.parametrize("widths", [[5], [3, 17], [1, 64, 9], [8, 8, 30, 2]])
def test_ensembles_with_teachers_requiring_grad(widths, dtype):
    # 300 rows: several 64-row tiles, the last one partial; a width-1 teacher's gradient is zero
    # in exact arithmetic (judged on its chain-rule terms, see harness.assert_close)
    opts = (("fr_weight", 0.1), ("kd_weight", 1.3))
    got = _check(Case("fkd", "cuda", dtype, 300, (12, *widths), "tiled", True, opts))
    assert len(got.grads) == 1 + len(widths)


@pytest.mark.parametrize("dtype", [F64, F32], ids=str)
def test_zero_rows_are_finite_and_match_reference(dtype):
    case = Case("fkd", "cuda", dtype, 150, (8, 5), "tiled", True, (("fr_weight", 0.5),))
    inputs = FKD.inputs(case)
    inputs.tensors[0][[0, 7, 149]] = 0.0
    inputs.tensors[1][[7, 11, 100]] = 0.0
    got = _check(case, inputs, rows=(inputs.tensors[0] == 0).all(1))
    assert torch.isfinite(got.loss)


def test_mixed_input_dtypes():
    # float16 student with a float32 teacher runs in float32 (gradient back in float16);
    # any float64 input makes everything float64.
    for s_dtype, t_dtype in ((F16, F32), (BF16, F64)):
        case = Case("fkd", "cuda", F32, 70, (16, 24), "tiled", False)
        inputs = FKD.inputs(case)
        inputs.tensors = [inputs.tensors[0].to(s_dtype), inputs.tensors[1].to(t_dtype)]
        got = run(FKD, inputs, "cuda", "tiled", GRAD_OUT)
        want = oracle(FKD, inputs, GRAD_OUT)
        _, terms = FKD.terms(inputs.to64(), GRAD_OUT, s_dtype)
        assert got.loss.dtype == (F64 if t_dtype == F64 else F32)
        assert_close(got.loss, want.loss, F32, TOL[F32].value, what="loss")
        assert got.grads[0].dtype == s_dtype
        assert_close(got.grads[0], want.grads[0], s_dtype, TOL[s_dtype].grad, terms[0], "grad")


def test_auto_backend_picks_cuda_for_cuda_tensors():
    assert fastkd.resolve_backend("fkd", "auto", torch.device("cuda")) == "cuda"


def test_runs_on_the_current_stream():
    inputs = FKD.inputs(Case("fkd", "cuda", F16, 520, (32, 48), "tiled", False))
    want = run(FKD, inputs, "cuda", "tiled")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = run(FKD, inputs, "cuda", "tiled")
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(got.loss, want.loss) and torch.equal(got.grads[0], want.grads[0])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device():
    case = Case("fkd", "cuda", F32, 90, (10, 20), "tiled", False)
    inputs = FKD.inputs(case).map(lambda t: t.to("cuda:1"))
    got = run(FKD, inputs, "cuda", "tiled", GRAD_OUT)
    assert got.loss.device == inputs.tensors[0].device == got.grads[0].device
    assert_matches(FKD, got, oracle(FKD, inputs, GRAD_OUT), inputs, GRAD_OUT)


@pytest.mark.parametrize("dtype", [F16, F32], ids=str)
def test_peak_memory_is_linear_in_batch(dtype):
    b, ds, dt = 16384, 64, 64
    gen = torch.Generator(device="cuda").manual_seed(13)
    student = torch.randn(b, ds, device="cuda", generator=gen).to(dtype).requires_grad_()
    teacher = torch.randn(b, dt, device="cuda", generator=gen).to(dtype)
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
