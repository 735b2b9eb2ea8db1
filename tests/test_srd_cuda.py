"""SRD-specific cases of the CUDA kernels (and compiled Triton) on the GPU, on the harness: large
offsets, identical inputs, non-finite batches, agreement with the CPU kernels, the compiled
SRDLoss step. The generic cases (every p and mode on odd shapes up to many row splits, half
inputs, raw ops, opcheck, determinism) are in test_ops.py. Needs a CUDA device and an extension
built with FASTKD_BUILD_CUDA=1; every test is marked ``gpu``."""

import pytest
import torch
from harness import F32, TOL, assert_close, needs_cuda_kernels, needs_triton_gpu, run
from srd_helpers import (
    SRD,
    check_identical_inputs,
    check_nan_keeps_student_stats,
    large_offset_inputs,
    shifted_oracle,
    srd_case,
)

import fastkd

pytestmark = [pytest.mark.gpu, needs_cuda_kernels]
BACKENDS = ["cuda", pytest.param("triton", marks=needs_triton_gpu)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_offset_identical_and_non_finite(backend):
    inputs = large_offset_inputs(F32).map(lambda x: x.cuda())
    got = run(SRD, inputs, backend, "auto", 1.3)
    shifted, oracle = shifted_oracle(inputs)
    value_terms, terms = SRD.terms(shifted, 1.3, F32)
    assert_close(got.loss, oracle.loss, F32, TOL[F32].value, value_terms, "loss")
    for i in range(2):
        assert_close(got.grads[i], oracle.grads[i], F32, TOL[F32].grad, terms[i], f"grad[{i}]")
    check_identical_inputs(SRD.inputs(srd_case(1000, 40, backend=backend)), backend)
    check_nan_keeps_student_stats(SRD.inputs(srd_case(1000, 40, backend=backend)), backend)


def test_cuda_matches_cpu():
    inputs = SRD.inputs(srd_case(3000, 77, p=4.5))
    cuda = run(SRD, inputs.map(lambda x: x.cuda()), "cuda")
    cpu = run(SRD, inputs, "cpu")
    for a, b in zip([cuda.loss, *cuda.grads], [cpu.loss, *cpu.grads], strict=True):
        assert_close(a, b.double(), F32, 2e-6)


def test_cuda_compiled_module_step():
    torch.manual_seed(5)
    module = fastkd.SRDLoss(48, 32, backend="cuda").cuda()
    eager = fastkd.SRDLoss(48, 32, backend="cuda").cuda()
    eager.load_state_dict(module.state_dict())
    compiled = torch.compile(module, fullgraph=True)
    fs, ft = torch.randn(64, 48, device="cuda"), torch.randn(64, 32, device="cuda")
    loss, loss_eager = compiled(fs, ft), eager(fs, ft)
    loss.backward()
    loss_eager.backward()
    assert_close(loss, loss_eager, F32, 1e-6)
    assert_close(module.projector.weight.grad, eager.projector.weight.grad, F32, 1e-5)
    for name, buf in eager.named_buffers():
        torch.testing.assert_close(module.get_buffer(name), buf)
