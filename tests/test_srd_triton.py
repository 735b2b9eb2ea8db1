"""SRD-specific cases of the Triton kernels (fastkd.triton.srd), on the harness: small tiles that
force every column-block and row-split merge, agreement with the CPU kernels, identical inputs and
zero-variance columns, non-finite batches, SRDLoss against the CPU module. The generic cases
(default tiles on odd shapes, raw ops, opcheck, determinism) are in test_ops.py.

Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py) runs on CPU tensors whatever the
host has (float32/float16/float64: it has no bfloat16 math); with TRITON_INTERPRET=0
(``make test-gpu``) the kernels run compiled on the GPU.
"""

import pytest
import torch

triton_srd = pytest.importorskip("fastkd.triton.srd")

from harness import (  # noqa: E402
    F16,
    F32,
    F64,
    TRITON_DEVICE,
    assert_close,
    assert_matches,
    needs_cpu_kernels,
    needs_triton,
    oracle,
    run,
)
from srd_helpers import SRD, check_identical_inputs, check_nan_keeps_student_stats, srd_case  # noqa: E402

import fastkd  # noqa: E402

pytestmark = needs_triton
GRAD_OUT = 1.3

# Several column blocks and row splits on small shapes: exercises every merge path.
SMALL_TILES = {"BLOCK_B": 4, "BLOCK_D": 4, "rows_per_split": 8}


@pytest.fixture(params=["default", "small_tiles"])
def tiles(request, monkeypatch):
    if request.param == "small_tiles":
        monkeypatch.setattr(triton_srd, "_CONFIG_OVERRIDE", SMALL_TILES)
    return request.param


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(triton_srd, "_CONFIG_OVERRIDE", SMALL_TILES)


@pytest.mark.parametrize(
    ("shape", "p", "dtype"),
    [
        ((2, 7), 4.0, F32),
        ((3, 1), 1.0, F32),
        ((17, 7), 4.5, F32),
        ((17, 7), 2.0, F64),
        ((30, 9), 3.0, F64),
        ((17, 9), 4.0, F16),
    ],
    ids=str,
)
@pytest.mark.parametrize("training", [True, False])
def test_small_tiles_match_reference(small_tiles, shape, p, dtype, training):
    # the default tiles run the same grid in test_ops.py
    inputs = SRD.inputs(srd_case(*shape, dtype, p, training, backend="triton"))
    got = run(SRD, inputs, "triton", "auto", GRAD_OUT)
    assert_matches(SRD, got, oracle(SRD, inputs, GRAD_OUT), inputs, GRAD_OUT)


@needs_cpu_kernels
def test_matches_cpu_kernels_on_odd_shape(tiles):
    inputs = SRD.inputs(srd_case(21, 13, offset=1e4))
    cpu = run(SRD, inputs, "cpu")
    tri = run(SRD, inputs.map(lambda x: x.to(TRITON_DEVICE)), "triton")
    for a, b in zip([cpu.loss, *cpu.grads], [tri.loss, *tri.grads], strict=True):
        assert_close(b, a.double(), F32, 2e-6)
    for a, b in zip(cpu.buffers, tri.buffers, strict=True):
        assert_close(b, a.double(), F32, 1e-6)


def test_identical_inputs_and_zero_variance(tiles):
    inputs = SRD.inputs(srd_case(9, 6, backend="triton"))
    inputs.tensors[0][:, 1] = 3.0
    check_identical_inputs(inputs, "triton")


def test_non_finite_input_keeps_running_stats():
    check_nan_keeps_student_stats(SRD.inputs(srd_case(9, 5, backend="triton")), "triton")


@needs_cpu_kernels
def test_module_matches_cpu_module():
    torch.manual_seed(3)
    tri = fastkd.SRDLoss(6, 4, backend="triton").to(TRITON_DEVICE)
    cpu = fastkd.SRDLoss(6, 4, backend="cpu")
    cpu.load_state_dict({k: v.cpu() for k, v in tri.state_dict().items()})
    for _ in range(2):
        fs, ft = torch.randn(10, 6), torch.randn(10, 4)
        a = tri(fs.to(TRITON_DEVICE), ft.to(TRITON_DEVICE))
        b = cpu(fs, ft)
        a.backward()
        b.backward()
        assert_close(a, b, F32, 1e-6)
        assert_close(tri.projector.weight.grad, cpu.projector.weight.grad, F32, 1e-5)
    for name, buf in cpu.named_buffers():
        torch.testing.assert_close(tri.get_buffer(name).cpu(), buf)
