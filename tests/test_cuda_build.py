"""The CUDA build really contains the FKD (and RKD) CUDA kernels.

CI builds with FASTKD_BUILD_CUDA=1 on machines without a GPU (.ci/run): nothing can run there,
so these checks look at what the extension registered. They need no device.
"""

import os

import pytest
import torch

import fastkd
from fastkd import _extension
from fastkd.registry import BackendUnavailableError

requires_cuda_build = pytest.mark.skipif(
    os.environ.get("FASTKD_BUILD_CUDA") != "1",
    reason="FASTKD_BUILD_CUDA is not 1: this build was not required to compile CUDA kernels",
)


@requires_cuda_build
@pytest.mark.parametrize("op", ["fkd_forward", "fkd_backward", "fkd_forward_backward"])
def test_extension_registers_cuda_kernels(op):
    assert _extension.loaded(), _extension.LOAD_ERROR
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastkd::{op}", "CUDA")


@requires_cuda_build
@pytest.mark.parametrize("op", ["rkd_forward", "rkd_backward", "rkd_forward_backward"])
def test_extension_registers_cuda_rkd_kernels(op):
    assert _extension.loaded(), _extension.LOAD_ERROR
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastkd::{op}", "CUDA")


@requires_cuda_build
def test_cuda_backend_lists_rkd():
    info = fastkd.available_backends()["cuda"]
    assert "rkd" in info["ops"]
    if not torch.cuda.is_available():
        assert "rkd" in info["detail"] and "no CUDA device" in info["detail"]


@requires_cuda_build
def test_cuda_backend_reports_its_compiled_kernels():
    info = fastkd.available_backends()["cuda"]
    assert "fkd" in info["ops"]
    if torch.cuda.is_available():
        assert info["available"], info["detail"]
        assert "fkd" in info["detail"]
    else:
        # Compiled but idle: unavailable only for lack of a device, and the reason says so.
        assert not info["available"]
        assert "compiled" in info["detail"] and "fkd" in info["detail"]
        assert "no CUDA device" in info["detail"]


def test_cuda_backend_refuses_cpu_tensors():
    # With or without CUDA kernels or a GPU: an explicit backend never silently falls back.
    s, t = torch.randn(4, 3), torch.randn(4, 5)
    with pytest.raises(BackendUnavailableError, match="cuda"):
        fastkd.fkd_loss(s, t, backend="cuda", algorithm="tiled")
