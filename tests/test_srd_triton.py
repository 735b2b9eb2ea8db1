"""SRD Triton kernels against the float64 reference, in Triton's CPU interpreter (small shapes,
float32/float16/float64; the interpreter has no bfloat16 math) on CPU tensors, or on the GPU with
TRITON_INTERPRET=0 (``make test-gpu``)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton's first import (conftest does too)


import pytest  # noqa: E402
import torch  # noqa: E402
from srd_helpers import (  # noqa: E402
    TOL,
    assert_log_tiny_and_zero_grads,
    assert_matches,
    assert_nan_loss_keeps_student_stats,
    make_buffers,
    make_inputs,
    opcheck_srd_ops,
    rel_err,
    run,
    train_grad_scales,
)

import fastkd  # noqa: E402

triton_srd = pytest.importorskip("fastkd.triton.srd")
# CPU tensors in the interpreter whatever the host has, the GPU only with TRITON_INTERPRET=0.
from triton_helpers import DEVICE, runs_here  # noqa: E402

pytestmark = runs_here

# Several column blocks and row splits on small shapes: exercises every merge path.
SMALL_TILES = {"BLOCK_B": 4, "BLOCK_D": 4, "rows_per_split": 8}


@pytest.fixture(params=["default", "small_tiles"])
def tiles(request, monkeypatch):
    if request.param == "small_tiles":
        monkeypatch.setattr(triton_srd, "_CONFIG_OVERRIDE", SMALL_TILES)
    return request.param


def on_device(*tensors):
    return [t.to(DEVICE) for t in tensors]


@pytest.mark.parametrize(
    ("shape", "p", "dtype"),
    [
        ((2, 7), 4.0, torch.float32),
        ((3, 1), 1.0, torch.float32),
        ((17, 7), 4.5, torch.float32),
        ((17, 7), 2.0, torch.float64),
        ((30, 9), 3.0, torch.float64),
        ((17, 9), 4.0, torch.float16),
    ],
)
@pytest.mark.parametrize("training", [True, False])
def test_triton_matches_reference(tiles, shape, p, dtype, training):
    student, teacher = on_device(*make_inputs(*shape, dtype=dtype, seed=shape[0] + int(p)))
    buffers = on_device(*make_buffers(shape[1]))
    fused = run("triton", student, teacher, p, training, buffers)
    ref = run("reference64", student, teacher, p, training, buffers)
    assert fused[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert fused[1].dtype == dtype and fused[2].dtype == dtype
    scales = train_grad_scales(student, teacher, p) if training else (0.0, 0.0)
    assert_matches(fused, ref, TOL[dtype], scales=scales, what=f"{tiles} {shape} p={p}")


def test_triton_matches_cpu_kernels_on_odd_shape(tiles):
    student, teacher = make_inputs(21, 13, dtype=torch.float32, seed=21, offset=1e4)
    buffers = make_buffers(13)
    cpu = run("cpu", student, teacher, 4.0, True, buffers)
    tri = run("triton", *on_device(student, teacher), 4.0, True, on_device(*buffers))
    for a, b in zip(cpu[:3], tri[:3], strict=True):
        assert rel_err(b.cpu(), a) <= 2e-6
    for a, b in zip(cpu[3], tri[3], strict=True):
        assert rel_err(b.cpu(), a) <= 1e-6


def test_triton_identical_inputs_and_zero_variance(tiles):
    x, _ = make_inputs(9, 6, dtype=torch.float32, seed=22)
    x[:, 1] = 3.0
    (x,) = on_device(x)
    assert_log_tiny_and_zero_grads(run("triton", x, x.clone(), 4.0, True))


def test_triton_non_finite_input_keeps_running_stats():
    student, teacher = make_inputs(9, 5, seed=23)
    student[4, 0] = float("nan")
    student, teacher = on_device(student, teacher)
    buffers = on_device(*make_buffers(5))
    fused = run("triton", student, teacher, 4.0, True, buffers)
    assert_nan_loss_keeps_student_stats(fused, buffers)
    assert not torch.equal(fused[3][2], buffers[2])


def test_triton_opcheck():
    student, teacher = on_device(*make_inputs(6, 5, dtype=torch.float32, seed=24))
    buffers = on_device(*make_buffers(5))
    grad = torch.tensor(0.5, device=DEVICE)
    opcheck_srd_ops(
        triton_srd.srd_forward, triton_srd.srd_backward, student, teacher, buffers, grad=grad
    )


def test_triton_module_matches_cpu_module():
    torch.manual_seed(3)
    tri = fastkd.SRDLoss(6, 4, backend="triton").to(DEVICE)
    cpu = fastkd.SRDLoss(6, 4, backend="cpu")
    cpu.load_state_dict({k: v.cpu() for k, v in tri.state_dict().items()})
    for _ in range(2):
        fs, ft = torch.randn(10, 6), torch.randn(10, 4)
        a = tri(*on_device(fs, ft))
        b = cpu(fs, ft)
        a.backward()
        b.backward()
        assert rel_err(a.cpu(), b) <= 1e-6
        assert rel_err(tri.projector.weight.grad.cpu(), cpu.projector.weight.grad) <= 1e-5
    for name, buf in cpu.named_buffers():
        torch.testing.assert_close(tri.get_buffer(name).cpu(), buf)
