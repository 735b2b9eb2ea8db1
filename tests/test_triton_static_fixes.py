"""Issue 12 findings that a first GPU run would hit, checked where this machine can see them
(Triton's interpreter on CPU tensors, or the kernels' source). Findings 1 and 2 are also caught
by the compile gate (tests/test_gpu_static.py), which compiles the kernels for sm_80/sm_90.

* Finding 1: a plain Python global read inside ``@triton.jit`` code (the compiler rejects it,
  the interpreter does not).
* Finding 4: the Triton SRD built a device tensor from Python floats on every call (a
  host-to-device copy: a host sync, illegal under CUDA-graph capture).
* Finding 6: int32 column offsets ``cols * stride_c`` past 2^31 for strided inputs with
  B * D > 2^31, and ``w.to(float16)`` overflowing in the Triton RKD gradient.
"""

from __future__ import annotations

import ast
import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

import triton.language as tl  # noqa: E402
from harness import INTERPRET  # noqa: E402
from harness import TRITON_DEVICE as DEVICE  # noqa: E402
from harness import needs_triton as runs_here

from fastkd import reference  # noqa: E402
from fastkd.triton import fkd as triton_fkd  # noqa: E402
from fastkd.triton import rkd as triton_rkd  # noqa: E402
from fastkd.triton import srd as triton_srd  # noqa: E402

ops = torch.ops.fastkd_triton
ROOT = Path(__file__).resolve().parents[1]
pytestmark = runs_here


def _jit_functions(module):
    """The module's own @triton.jit functions (JITFunction, or the interpreter's wrapper)."""
    for name, obj in vars(module).items():
        fn = getattr(obj, "fn", None)
        if callable(fn) and getattr(fn, "__module__", None) == module.__name__:
            yield name, fn


def _global_reads(fn) -> set[str]:
    """Names a function body loads that are neither its parameters nor assigned in it."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    local = set(inspect.signature(fn).parameters)
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            local.add(node.id)
    return {
        node.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id not in local
    }


def _allowed_in_jit(value) -> bool:
    """What the Triton compiler lets @triton.jit code read from module globals."""
    return (
        isinstance(value, tl.constexpr)
        or inspect.ismodule(value)
        or hasattr(value, "fn")  # another @triton.jit function
        or getattr(value, "__module__", "").startswith("triton")  # tl.* objects
    )


@pytest.mark.parametrize("module", [triton_fkd, triton_rkd, triton_srd], ids=lambda m: m.__name__)
def test_jit_code_reads_only_constexpr_globals(module):
    """Finding 1: RKD read ``SQUARED_DISTANCE_EPS = 1e-12`` (a plain float) inside its kernels:
    ``NameError: Cannot access global variable`` on every GPU, fine in the interpreter."""
    functions = dict(_jit_functions(module))
    assert functions, f"no @triton.jit functions found in {module.__name__}"
    bad = []
    for name, fn in functions.items():
        for ref in _global_reads(fn):
            if ref in fn.__globals__ and not _allowed_in_jit(fn.__globals__[ref]):
                bad.append(f"{name} reads {ref} = {fn.__globals__[ref]!r}")
    assert not bad, "plain globals inside @triton.jit code: " + "; ".join(bad)


def test_the_global_read_check_catches_a_plain_float():
    def kernel(x):
        return x + SOME_FLOAT  # noqa: F821

    kernel.__globals__["SOME_FLOAT"] = 1e-12
    try:
        assert "SOME_FLOAT" in _global_reads(kernel)
        assert not _allowed_in_jit(kernel.__globals__["SOME_FLOAT"])
        assert _allowed_in_jit(tl.constexpr(1e-12))
    finally:
        del kernel.__globals__["SOME_FLOAT"]


@pytest.mark.parametrize("training", [True, False])
def test_srd_launch_builds_no_tensor_from_python_values(monkeypatch, training):
    """Finding 4: ``torch.tensor([p, eps, tiny], device=cuda)`` in forward and backward was a
    host-to-device copy per step. p, eps and tiny now travel as float64 kernel arguments."""
    g = torch.Generator().manual_seed(4)
    student = torch.randn(9, 5, generator=g, dtype=torch.float64).to(DEVICE)
    teacher = torch.randn(9, 5, generator=g, dtype=torch.float64).to(DEVICE)
    buffers = [torch.zeros(5), torch.ones(5), torch.zeros(5), torch.ones(5)]
    buffers = [b.to(DEVICE, torch.float64) for b in buffers]
    expected = reference.srd_loss(
        student.clone(), teacher, 4.5, 1e-5, training, *[b.clone() for b in buffers]
    )

    def no_tensor(*args, **kwargs):
        raise AssertionError("torch.tensor called during a Triton SRD launch")

    monkeypatch.setattr(torch, "tensor", no_tensor)
    loss, total, stats_s, stats_t, sums = ops.srd_forward(
        student, teacher, 4.5, 1e-5, training, *buffers
    )
    grad = torch.ones((), dtype=torch.float64, device=DEVICE)
    grads = ops.srd_backward(
        grad, student, teacher, 4.5, training, total, stats_s, stats_t, sums, True
    )
    monkeypatch.undo()
    # p = 4.5 and eps = 1e-5 reach the float64 kernels unrounded: float64 agreement
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-12, atol=0)
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.skipif(not INTERPRET, reason="the rounding check is for the interpreter's fp16")
def test_rkd_float16_gradient_survives_small_and_near_duplicate_rows():
    """Finding 6: w = dL/dq ~ 1 / (mu d_ij) passes float16's 65504 for small features or
    near-duplicate rows; ``w.to(float16)`` for the tensor cores made it inf (and inf - inf NaN).
    Each row of W is now scaled into range before the float16 product and back after."""
    g = torch.Generator().manual_seed(6)
    base = torch.randn(24, 16, generator=g, dtype=torch.float64) * 3e-3
    base[7] = base[3] + 2e-5 * torch.randn(16, generator=g, dtype=torch.float64)
    student = base.to(torch.float16)
    teacher = (torch.randn(24, 8, generator=g, dtype=torch.float64) * 3e-3).to(torch.float16)
    loss, grad_s, grad_t = ops.rkd_forward_backward(student, teacher, True)
    s = student.double().requires_grad_()
    t = teacher.double().requires_grad_()
    ref = reference.rkd_distance_loss(s, t)
    ref.backward()
    # the regime that overflowed: |w_ij| ~ 1 / (2 mu d_ij) far above float16's 65504
    dist = torch.cdist(s.detach(), s.detach())
    off = ~torch.eye(24, dtype=torch.bool)
    assert 1 / (2 * dist[off].mean() * dist[off].min()) > 1e5
    for got, want in ((grad_s, s.grad), (grad_t, t.grad)):
        assert torch.isfinite(got).all()
        # W and the result each rounded to float16 once, scaled by the gradient's size
        err = (got.double() - want).abs().max() / want.abs().max()
        assert err < 4e-3, err
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-4, atol=0)


_INT32_OFFSETS_SCRIPT = """
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch
from fastkd import reference
import fastkd.triton  # registers the ops
ops = torch.ops.fastkd_triton
# A (3, 3) float16 view whose columns are 2**30 elements apart: column 2 starts at element
# 2**31, past int32. Only the pages of its 9 elements of the 4 GiB allocation are touched.
big = torch.empty(2**31 + 16, dtype=torch.float16)
student = big.as_strided((3, 3), (1, 2**30))
g = torch.Generator().manual_seed(0)
values = torch.randn(3, 3, generator=g).to(torch.float16)
student.copy_(values)
teacher = torch.randn(3, 4, generator=g).to(torch.float16)
xs = values.double().requires_grad_()
if sys.argv[1] == "fkd":
    loss, grad, _ = ops.fkd_forward_backward(student, [teacher], 1.0, 0.5, False)
    ref = reference.fkd_loss(xs, [teacher.double()], 1.0, 0.5)
else:
    loss, grad, _ = ops.rkd_forward_backward(student, teacher, False)
    ref = reference.rkd_distance_loss(xs, teacher.double())
ref.backward()
scale = xs.grad.abs().max().item()
print("loss", abs(loss.item() - ref.item()) / abs(ref.item()))
print("grad", (grad.double() - xs.grad).abs().max().item() / scale)
"""


@pytest.mark.skipif(not INTERPRET, reason="builds a 4 GiB sparse CPU view for the interpreter")
@pytest.mark.skipif(sys.platform != "linux", reason="relies on lazily committed memory")
@pytest.mark.parametrize("op", ["fkd", "rkd"])
def test_column_offsets_past_int32(op):
    """Finding 6: ``cols * stride_c`` in int32 wrapped for a strided input whose columns lie
    more than 2^31 elements apart (the interpreter then read far outside the tensor and
    crashed). Run in a subprocess: before the fix it dies with SIGSEGV."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", _INT32_OFFSETS_SCRIPT, op],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, f"rc {proc.returncode}: {proc.stderr[-2000:]}"
    errors = dict(line.split() for line in proc.stdout.strip().splitlines())
    # float16 inputs, float32 accumulation; the gradient is written in float16
    assert float(errors["loss"]) < 1e-5, errors
    assert float(errors["grad"]) < 4e-3, errors
