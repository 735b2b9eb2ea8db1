"""What the Triton test modules share: where the kernels run and how inputs are made.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set
by conftest.py); with TRITON_INTERPRET=0 on a CUDA machine they run on the GPU.
"""

from __future__ import annotations

import pytest
import torch

from fastkd.triton import interpreter_enabled

INTERPRET = interpreter_enabled()
DEVICE = "cpu" if INTERPRET else "cuda"

# module-level pytestmark of a Triton test module
runs_here = pytest.mark.skipif(
    not INTERPRET and not torch.cuda.is_available(),
    reason="Triton needs a CUDA device or TRITON_INTERPRET=1",
)
needs_gpu = pytest.mark.skipif(
    INTERPRET or not torch.cuda.is_available(), reason="needs CUDA and TRITON_INTERPRET=0"
)


def features(batch, width, dtype=torch.float32, requires_grad=False):
    x = torch.randn(batch, width, device=DEVICE).to(dtype)
    return x.requires_grad_(requires_grad)
