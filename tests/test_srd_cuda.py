"""SRD CUDA kernels (and Triton on the GPU) against the float64 reference. Needs a CUDA device
and an extension built with FASTKD_BUILD_CUDA=1; every test is marked ``gpu``."""

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

import fastkd
from fastkd import _extension

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def cuda(*tensors):
    return [t.cuda() for t in tensors]


@pytest.fixture(scope="module", autouse=True)
def _needs_cuda_kernels():
    if not _extension.has_kernel("srd_forward", "CUDA"):
        pytest.fail("fastkd._C has no CUDA SRD kernels: build with FASTKD_BUILD_CUDA=1")


# (3, 1) and (2, 7): tiny; (130, 300): several column blocks; (4096, 33) and (20000, 5): many
# row splits, several lanes per split.
SHAPES = [(2, 7), (3, 1), (17, 64), (130, 300), (4096, 33), (20000, 5)]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("p", [1.0, 2.0, 4.0, 4.5])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_matches_reference(backend, dtype, shape, p, training):
    if p == 1.0 and shape[0] == 2:
        pytest.skip("h = sign(d) is discontinuous at the d = 0 that B = 2 produces")
    student, teacher = cuda(*make_inputs(*shape, dtype=dtype, seed=shape[0] + int(10 * p)))
    buffers = cuda(*make_buffers(shape[1]))
    fused = run(backend, student, teacher, p, training, buffers)
    ref = run("reference64", student, teacher, p, training, buffers)
    assert fused[1].dtype == dtype and fused[1].device.type == "cuda"
    scales = train_grad_scales(student, teacher, p) if training else (0.0, 0.0)
    assert_matches(fused, ref, TOL[dtype], scales=scales, what=f"{backend} {shape} p={p}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_half_precision(backend, dtype):
    student, teacher = cuda(*make_inputs(777, 96, dtype=dtype, seed=31))
    buffers = cuda(*make_buffers(96))
    for training in (True, False):
        fused = run(backend, student, teacher, 4.0, training, buffers)
        ref = run("reference64", student, teacher, 4.0, training, buffers)
        assert rel_err(fused[0], ref[0]) <= 1e-5
        assert_matches(fused, ref, TOL[dtype])


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_large_offset_identical_and_non_finite(backend):
    student, teacher = make_inputs(1000, 40, seed=32, offset=1e4)
    shift_s, shift_t = student[0].double(), teacher[0].double()
    fused = run(backend, *cuda(student, teacher), 4.0, True)
    oracle = run(
        "reference64", *cuda(student.double() - shift_s, teacher.double() - shift_t), 4.0, True
    )
    assert_matches(fused, oracle, TOL[torch.float32])

    (x,) = cuda(student)
    assert_log_tiny_and_zero_grads(run(backend, x, x.clone(), 4.0, True))

    bad = student.clone()
    bad[500, 3] = float("nan")
    buffers = cuda(*make_buffers(40))
    assert_nan_loss_keeps_student_stats(
        run(backend, *cuda(bad, teacher), 4.0, True, buffers), buffers
    )


def test_cuda_deterministic_and_matches_cpu():
    student, teacher = make_inputs(3000, 77, seed=33)
    first = run("cuda", *cuda(student, teacher), 4.5, True)
    assert_same_runs(first, run("cuda", *cuda(student, teacher), 4.5, True))
    cpu = run("cpu", student, teacher, 4.5, True)
    for a, b in zip(first[:3], cpu[:3], strict=True):
        assert rel_err(a.cpu(), b) <= 2e-6


def test_cuda_opcheck():
    student, teacher = cuda(*make_inputs(9, 5, dtype=torch.float64, seed=34))
    buffers = cuda(*[b.double() for b in make_buffers(5)])
    opcheck_srd_ops(torch.ops.fastkd.srd_forward.default, None, student, teacher, buffers)


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
    assert rel_err(loss, loss_eager) <= 1e-6
    assert rel_err(module.projector.weight.grad, eager.projector.weight.grad) <= 1e-5
    for name, buf in eager.named_buffers():
        torch.testing.assert_close(module.get_buffer(name), buf)
