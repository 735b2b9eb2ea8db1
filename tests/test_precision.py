"""The ``precision`` argument of FKD and RKD (SPEC §6) through every layer.

* validation: "ieee" | "tf32x3" | "tf32"; a bad value is a clear error on every entry point
  (functional, Module, the compiled and the Triton ops) before any kernel runs;
* cpu (compiled) backend: all three accepted, bit-identical to "ieee" (the CPU always forms full
  fp32 products);
* triton backend in the interpreter: all three within the float32 tolerance of the float64
  reference. Triton's interpreter ignores ``input_precision`` (its ``tl.dot`` is a NumPy fp32
  matmul), so there the three values are also bit-identical; the TF32 rounding itself is only
  seen on a GPU (``tests/test_gpu_only.py``-style checks, and the compile gate's MMA count);
* the op schemas carry it, opcheck passes with a non-default value, autograd passes it to the
  backward op, ``torch.compile(fullgraph=True)`` traces it;
* the TF32 accuracy stated in the docs, measured here on the reference with TF32-rounded
  operands (a model of the tensor-core products: a TF32 x TF32 product is exact in fp32).
"""

from __future__ import annotations

import pytest
import torch

import fastkd
from fastkd import reference
from fastkd.validation import PRECISIONS, check_precision

HAS_CPU_OPS = "cpu" in fastkd.available_backends()


def _has_triton() -> bool:
    try:
        import fastkd.triton  # noqa: F401
        from fastkd.triton import interpreter_enabled
    except ImportError:
        return False
    return interpreter_enabled() or torch.cuda.is_available()


HAS_TRITON = _has_triton()
needs_cpu_ops = pytest.mark.skipif(not HAS_CPU_OPS, reason="fastkd._C not built")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="no Triton device or interpreter")


def _device() -> str:
    from fastkd.triton import interpreter_enabled

    return "cpu" if interpreter_enabled() else "cuda"


def _ref_fkd(student, teachers, kd, fr):
    s = student.detach().double().requires_grad_()
    ts = [t.detach().double().requires_grad_() for t in teachers]
    loss = reference.fkd_loss(s, ts, kd, fr)
    loss.backward()
    return loss.detach(), s.grad, [t.grad for t in ts]


def _ref_rkd(student, teacher):
    s = student.detach().double().requires_grad_()
    t = teacher.detach().double().requires_grad_()
    loss = reference.rkd_distance_loss(s, t)
    loss.backward()
    return loss.detach(), s.grad, t.grad


def _close(actual, expected, rtol):
    """|a - e| <= rtol (|e| + max|e|): relative to the tensor's scale, not to entries that are
    small by cancellation."""
    expected = expected.double()
    atol = rtol * expected.abs().max().item()
    torch.testing.assert_close(actual.detach().double(), expected, rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------- validation


def test_check_precision():
    assert PRECISIONS == ("ieee", "tf32x3", "tf32")
    for p in PRECISIONS:
        assert check_precision(p) == p
    with pytest.raises(ValueError, match="precision must be one of"):
        check_precision("fp32")
    with pytest.raises(ValueError, match="precision"):
        check_precision("TF32")
    with pytest.raises(TypeError, match="precision must be a str"):
        check_precision(None)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_bad_precision_is_a_clear_error(backend):
    if backend == "cpu" and not HAS_CPU_OPS:
        pytest.skip("fastkd._C not built")
    if backend == "triton" and not HAS_TRITON:
        pytest.skip("no Triton")
    dev = _device() if backend == "triton" else "cpu"
    s, t = torch.randn(5, 3, device=dev), torch.randn(5, 4, device=dev)
    with pytest.raises(ValueError, match="precision"):
        fastkd.fkd_loss(s, t, backend=backend, precision="tf16")
    with pytest.raises(ValueError, match="precision"):
        fastkd.rkd_distance_loss(s, t, backend=backend, precision="high")
    with pytest.raises(ValueError, match="precision"):
        fastkd.FKDLoss(precision="half")
    with pytest.raises(ValueError, match="precision"):
        fastkd.RKDDistanceLoss(precision="")


@needs_cpu_ops
def test_compiled_ops_reject_a_bad_precision():
    s, t = torch.randn(5, 3), torch.randn(5, 4)
    with pytest.raises(ValueError, match='precision must be "ieee", "tf32x3" or "tf32"'):
        torch.ops.fastkd.fkd_forward(s, [t], 1.0, 0.0, "bogus")
    with pytest.raises(ValueError, match="precision"):
        torch.ops.fastkd.fkd_forward_backward(s, [t], 1.0, 0.0, False, "bogus")
    with pytest.raises(ValueError, match="precision"):
        torch.ops.fastkd.rkd_forward(s, t, "tf64")
    with pytest.raises(ValueError, match="precision"):
        torch.ops.fastkd.rkd_backward(torch.tensor(1.0), s, t, True, "tf64")


@needs_triton
def test_triton_ops_reject_a_bad_precision():
    dev = _device()
    s, t = torch.randn(5, 3, device=dev), torch.randn(5, 4, device=dev)
    ops = torch.ops.fastkd_triton
    with pytest.raises(ValueError, match="precision"):
        ops.fkd_forward(s, [t], 1.0, 0.0, "bogus")
    with pytest.raises(ValueError, match="precision"):
        ops.rkd_forward_backward(s, t, False, "bogus")


def test_modules_show_precision():
    assert "precision='tf32x3'" in repr(fastkd.FKDLoss(precision="tf32x3"))
    assert "precision='tf32'" in repr(fastkd.RKDDistanceLoss(precision="tf32"))
    assert "precision='ieee'" in repr(fastkd.FKDLoss())


# ------------------------------------------------------------------------------- schemas


@pytest.mark.parametrize(
    "name",
    ["fkd_forward", "fkd_backward", "fkd_forward_backward", "rkd_forward", "rkd_backward",
     "rkd_forward_backward"],
)  # fmt: skip
def test_schemas_end_with_precision(name):
    from fastkd.ops import fkd as fkd_ops
    from fastkd.ops import rkd as rkd_ops

    schema = {**fkd_ops.SCHEMAS, **rkd_ops.SCHEMAS}[name]
    assert schema.split(") ->")[0].endswith('str precision="ieee"'), schema


# ------------------------------------------------------------------------------- cpu backend


@needs_cpu_ops
@pytest.mark.parametrize("precision", PRECISIONS)
def test_cpu_backend_computes_full_fp32_whatever_asked(precision):
    """The cpu kernels accept every value and return exactly the "ieee" result."""
    torch.manual_seed(3)
    s = torch.randn(17, 7, requires_grad=True)
    ts = [torch.randn(17, 5), torch.randn(17, 3, requires_grad=True)]
    loss = fastkd.fkd_loss(s, ts, 0.8, 0.2, backend="cpu", algorithm="tiled", precision=precision)
    grads = torch.autograd.grad(loss, [s, ts[1]])
    ieee = fastkd.fkd_loss(s, ts, 0.8, 0.2, backend="cpu", algorithm="tiled")
    grads_ieee = torch.autograd.grad(ieee, [s, ts[1]])
    assert torch.equal(loss, ieee)
    for g, gi in zip(grads, grads_ieee, strict=True):
        assert torch.equal(g, gi)

    r = fastkd.rkd_distance_loss(s, ts[1], backend="cpu", precision=precision)
    rg = torch.autograd.grad(r, [s, ts[1]])
    ri = fastkd.rkd_distance_loss(s, ts[1], backend="cpu")
    rgi = torch.autograd.grad(ri, [s, ts[1]])
    assert torch.equal(r, ri)
    for g, gi in zip(rg, rgi, strict=True):
        assert torch.equal(g, gi)


@needs_cpu_ops
def test_cpu_backward_op_receives_precision():
    """The non-fused path (forward op, then autograd's backward op) with a non-default value."""
    torch.manual_seed(4)
    s = torch.randn(6, 4, requires_grad=True)
    t = torch.randn(6, 5)
    loss = torch.ops.fastkd.fkd_forward(s, [t], 1.0, 0.5, "tf32")
    (g,) = torch.autograd.grad(loss, s)
    _, ref_g, _ = _ref_fkd(s, [t], 1.0, 0.5)
    _close(g, ref_g, 1e-5)
    loss = torch.ops.fastkd.rkd_forward(s, t, "tf32x3")
    (g,) = torch.autograd.grad(loss, s)
    _close(g, _ref_rkd(s, t)[1], 1e-5)


@needs_cpu_ops
def test_cpu_opcheck_non_default_precision():
    torch.manual_seed(5)
    s = torch.randn(4, 3, requires_grad=True)
    t = torch.randn(4, 5, requires_grad=True)
    ops = torch.ops.fastkd
    torch.library.opcheck(ops.fkd_forward, (s, [t], 1.0, 0.5, "tf32x3"))
    torch.library.opcheck(ops.fkd_backward, (torch.tensor(1.5), s.detach(), [t.detach()], 1.0,
                                             0.5, True, "tf32"))  # fmt: skip
    torch.library.opcheck(ops.fkd_forward_backward, (s.detach(), [t.detach()], 1.0, 0.5, True,
                                                     "tf32"))  # fmt: skip
    torch.library.opcheck(ops.rkd_forward, (s, t, "tf32"))
    torch.library.opcheck(ops.rkd_forward_backward, (s.detach(), t.detach(), True, "tf32x3"))


# ------------------------------------------------------------------------------- triton backend


@needs_triton
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("batch, ds, dt", [(3, 7, 2), (17, 40, 7), (33, 5, 130)], ids=str)
def test_triton_fkd_precision_against_reference(precision, batch, ds, dt):
    """Within 1e-5 of the float64 reference for "ieee" and "tf32x3" (fp32 accuracy); "tf32"
    has the same tolerance here only because the interpreter computes its dots in full fp32
    (on a GPU "tf32" is ~1e-3, see test_tf32_accuracy_model)."""
    dev = _device()
    torch.manual_seed(batch + ds)
    s = torch.randn(batch, ds, device=dev, requires_grad=True)
    t = torch.randn(batch, dt, device=dev, requires_grad=True)
    loss = fastkd.fkd_loss(s, t, 0.9, 0.1, backend="triton", algorithm="tiled",
                           precision=precision)  # fmt: skip
    gs, gt = torch.autograd.grad(loss, [s, t])
    ref_loss, ref_gs, (ref_gt,) = _ref_fkd(s, [t], 0.9, 0.1)
    rtol = 1e-5 if precision != "tf32" or dev == "cpu" else 5e-3
    _close(loss, ref_loss, rtol)
    _close(gs, ref_gs, rtol)
    _close(gt, ref_gt, rtol)


@needs_triton
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("batch, ds, dt", [(3, 2, 3), (17, 9, 40), (33, 130, 5)], ids=str)
def test_triton_rkd_precision_against_reference(precision, batch, ds, dt):
    dev = _device()
    torch.manual_seed(batch * 7 + dt)
    s = torch.randn(batch, ds, device=dev, requires_grad=True)
    t = torch.randn(batch, dt, device=dev, requires_grad=True)
    loss = fastkd.rkd_distance_loss(s, t, backend="triton", precision=precision)
    gs, gt = torch.autograd.grad(loss, [s, t])
    ref_loss, ref_gs, ref_gt = _ref_rkd(s, t)
    rtol = 1e-5 if precision != "tf32" or dev == "cpu" else 5e-3
    _close(loss, ref_loss, rtol)
    _close(gs, ref_gs, rtol)
    _close(gt, ref_gt, rtol)


@needs_triton
def test_interpreter_ignores_input_precision():
    """What the interpreter measures: its tl.dot is a NumPy float32 matmul whatever
    ``input_precision`` says, so all three values give bit-identical results there."""
    if _device() != "cpu":
        pytest.skip("interpreter only")
    torch.manual_seed(9)
    s, t = torch.randn(19, 33), torch.randn(19, 21)
    fkd = [fastkd.fkd_loss(s, t, backend="triton", algorithm="tiled", precision=p)
           for p in PRECISIONS]  # fmt: skip
    rkd = [fastkd.rkd_distance_loss(s, t, backend="triton", precision=p) for p in PRECISIONS]
    assert all(torch.equal(x, fkd[0]) for x in fkd)
    assert all(torch.equal(x, rkd[0]) for x in rkd)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_triton_non_fp32_ignores_precision(dtype):
    """16-bit and float64 inputs: "tf32" changes nothing (float64 dots stay IEEE)."""
    dev = _device()
    if dtype == torch.float16 and dev == "cpu":
        dtype = torch.float64  # the interpreter's fp16 path is covered by test_fkd_triton
    torch.manual_seed(10)
    s, t = torch.randn(9, 6, device=dev, dtype=dtype), torch.randn(9, 4, device=dev, dtype=dtype)
    a = fastkd.fkd_loss(s, t, backend="triton", algorithm="tiled", precision="tf32")
    b = fastkd.fkd_loss(s, t, backend="triton", algorithm="tiled")
    assert torch.equal(a, b)
    a = fastkd.rkd_distance_loss(s, t, backend="triton", precision="tf32")
    assert torch.equal(a, fastkd.rkd_distance_loss(s, t, backend="triton"))
    if dtype == torch.float64:
        _close(a, _ref_rkd(s, t)[0], 1e-12)


@needs_triton
def test_triton_opcheck_non_default_precision():
    dev = _device()
    torch.manual_seed(11)
    s = torch.randn(3, 4, device=dev, requires_grad=True)
    t = torch.randn(3, 5, device=dev, requires_grad=True)
    ops = torch.ops.fastkd_triton
    torch.library.opcheck(ops.fkd_forward, (s, [t], 1.0, 0.5, "tf32x3"))
    grad = torch.tensor(1.5, device=dev)
    torch.library.opcheck(ops.fkd_backward, (grad, s.detach(), [t.detach()], 1.0, 0.5, True,
                                             "tf32"))  # fmt: skip
    torch.library.opcheck(ops.rkd_forward, (s, t, "tf32"))
    torch.library.opcheck(ops.rkd_backward, (grad, s.detach(), t.detach(), True, "tf32x3"))


@needs_triton
@pytest.mark.parametrize("op", ["fkd", "rkd"])
def test_triton_fullgraph_compile_with_precision(op):
    dev = _device()
    torch.manual_seed(12)
    layer = torch.nn.Linear(4, 6).to(dev)
    x, teacher = torch.randn(9, 4, device=dev), torch.randn(9, 5, device=dev)
    if op == "fkd":
        loss_mod = fastkd.FKDLoss(1.0, 0.1, backend="triton", algorithm="tiled", precision="tf32")
    else:
        loss_mod = fastkd.RKDDistanceLoss(backend="triton", precision="tf32x3")

    def step(x):
        return loss_mod(layer(x), teacher)

    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
    (gw,) = torch.autograd.grad(loss, layer.weight)
    out = layer(x)
    if op == "fkd":
        ref_loss, ref_gs, _ = _ref_fkd(out, [teacher], 1.0, 0.1)
    else:
        ref_loss, ref_gs, _ = _ref_rkd(out, teacher)
    rtol = 1e-5 if dev == "cpu" else 5e-3
    _close(loss, ref_loss, rtol)
    _close(gw, ref_gs.float().T @ x, rtol)


# ------------------------------------------------------------------------------- TF32 model


def _tf32(x: torch.Tensor) -> torch.Tensor:
    """x rounded to TF32 (10 explicit mantissa bits), round half away from zero on the bit
    pattern (as cvt.rna.tf32.f32): the operand the tensor cores see."""
    bits = x.float().contiguous().view(torch.int32)
    bits = (bits + 0x1000) & ~0x1FFF
    return bits.view(torch.float32)


def _model_loss(s, t, split):
    """FKD loss with Grams from TF32 products (split: tf32x3's hi/lo), fp64 elsewhere."""

    def gram(x):
        x = x.float()
        hi = _tf32(x)
        g = hi.double() @ hi.double().T
        if split:
            lo = _tf32(x - hi)
            g = g + hi.double() @ lo.double().T + lo.double() @ hi.double().T
        inv = 1.0 / x.double().norm(dim=1).clamp_min(1e-12)
        return g * inv[:, None] * inv[None, :]

    return ((gram(s) - gram(t)) ** 2).mean()


def test_tf32_accuracy_model():
    """The accuracy the docs state, on a model of the tensor-core products (TF32 operands,
    exact products, fp64 sums, so only the operand rounding is measured): "tf32" ~1e-3
    relative error of the loss, "tf32x3" ~1e-6 (at fp32 level)."""
    torch.manual_seed(13)
    s, t = torch.randn(256, 64), torch.randn(256, 96)
    exact = reference.fkd_loss(s.double(), [t.double()], 1.0, 0.0)
    assert _tf32(torch.tensor([1.0 + 2**-11])).item() == 1.0 + 2**-10  # ties away from zero
    assert _tf32(torch.tensor([1.0 + 2**-12])).item() == 1.0
    err_tf32 = abs(_model_loss(s, t, False) - exact) / exact
    err_x3 = abs(_model_loss(s, t, True) - exact) / exact
    assert 1e-6 < err_tf32 < 5e-3, err_tf32
    assert err_x3 < 2e-6, err_x3


@needs_triton
def test_block_config_narrows_rkd_tf32x3():
    """float32 RKD at "tf32x3" halves the gradient accumulator (its grad kernel spilled inside
    the loop on sm_90 at 64 x 128, found by tools/gpu_static); other choices keep 128."""
    from fastkd.triton._common import block_config

    def do(op, dtype, precision):
        return block_config(4096, [512], dtype, False, op=op, precision=precision)["BLOCK_DO"]

    assert do("rkd", torch.float32, "tf32x3") == 64
    assert do("rkd", torch.float32, "tf32") == do("rkd", torch.float32, "ieee") == 128
    assert do("fkd", torch.float32, "tf32x3") == 128
    assert do("rkd", torch.float16, "tf32x3") == 128
