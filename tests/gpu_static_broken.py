"""Deliberately broken Triton kernels (and their fixed twins) for tests/test_gpu_static.py: the
gate must flag the two defects of issue 12 (findings 1 and 2) and pass the fixes.

Loaded by ``python -m tools.gpu_static --variants tests/gpu_static_broken.py:variants`` in a
process without TRITON_INTERPRET (compiled, not interpreted). Not a test module.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.jit import MockTensor

from tools.gpu_static.triton_gate import Variant

PLAIN_EPS = 1e-12  # a plain global: readable by the interpreter, not by the compiler
CONSTEXPR_EPS = tl.constexpr(1e-12)


@triton.jit
def global_read_kernel(x_ptr, y_ptr, N, BLOCK: tl.constexpr):
    """Finding 1: a plain Python global inside @triton.jit."""
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < N)
    tl.store(y_ptr + offs, tl.maximum(x, PLAIN_EPS), mask=offs < N)


@triton.jit
def constexpr_global_kernel(x_ptr, y_ptr, N, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < N)
    eps = tl.full((), CONSTEXPR_EPS, x.dtype)
    tl.store(y_ptr + offs, tl.where(x < eps, eps, x), mask=offs < N)


@triton.jit
def python_float_scale_kernel(x_ptr, y_ptr, N, scale, BLOCK: tl.constexpr):
    """Finding 2: a Python float argument (typed float32) scaling float64 data."""
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < N)
    tl.store(y_ptr + offs, x * scale, mask=offs < N)


@triton.jit
def float64_scale_kernel(x_ptr, y_ptr, N, scale: tl.float64, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < N)
    tl.store(y_ptr + offs, x * tl.full((), scale, x.dtype), mask=offs < N)


@triton.jit
def float_literal_compare_kernel(x_ptr, y_ptr, N, BLOCK: tl.constexpr):
    """A Python float compared with float64 data is rounded to float32 first."""
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < N)
    tl.store(y_ptr + offs, tl.where(x < 0.1, 0.0, x), mask=offs < N)


def variants() -> list[Variant]:
    f64 = MockTensor(torch.float64)
    args = dict(x_ptr=f64, y_ptr=f64, N=100, BLOCK=128)

    def variant(name, fn, **extra):
        return Variant("broken", name, "float64", "fp64", "ieee", False, None, fn,
                       dict(args, **extra))  # fmt: skip

    return [
        variant("global_read_kernel", global_read_kernel),
        variant("constexpr_global_kernel", constexpr_global_kernel),
        variant("python_float_scale_kernel", python_float_scale_kernel, scale=0.1),
        variant("float64_scale_kernel", float64_scale_kernel, scale=0.1),
        variant("float_literal_compare_kernel", float_literal_compare_kernel),
    ]
