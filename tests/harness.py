"""The test harness: one table of ops, one float64 reference, one tolerance table, one judgement.

Every backend test of fastkd goes through these pieces:

* :data:`OPS`: one :class:`OpSpec` per op (fkd, sp, rkd, srd): how to make its inputs for a
  :class:`Case` (shape, dtype, backend, options), how to call the loss through the public API,
  the float64 reference call, the size of the terms its value and gradients are summed from
  (:meth:`OpSpec.terms`, from :mod:`fastkd.testing`), its raw ops
  (``torch.ops.<namespace>.<op>_*``) and its bad inputs.
* :func:`oracle`: :func:`fastkd.testing.reference64` of an op, value and gradient of every
  input, for an upstream gradient ``grad_out`` (the tests use values != 1, so a kernel that
  ignores it fails).
* The tolerance table (:data:`fastkd.testing.TOL`) and the judgement
  (:func:`fastkd.testing.assert_close`: errors within rounding + max(tol * max |want|,
  ``ULPS`` eps terms), entry by entry, never on a scale that comes from roundoff) are
  :mod:`fastkd.testing`'s, re-exported here; :func:`assert_matches` applies them to a whole
  :class:`Result`.

It also says where each backend runs (:func:`device_of`, :func:`backend_marks`): the Triton
interpreter (``TRITON_INTERPRET=1``, set by conftest.py) on CPU tensors whatever the host has,
compiled Triton and CUDA on the GPU (``make test-gpu``: ``-m gpu`` with ``TRITON_INTERPRET=0``).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import pytest
import torch

import fastkd
from fastkd import _extension, reference
from fastkd.testing import (  # noqa: F401  (the tests import the judgement from here)
    TOL,
    ULPS,
    Tol,
    accumulation_eps,
    allowed_error,
    assert_close,
    fkd_terms,
    reference64,
    rkd_terms,
    rounding_error,
    sp_terms,
    srd_terms,
)
from fastkd.validation import interpreter_enabled

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
DTYPES = (F64, F32, F16, BF16)

# ------------------------------------------------------------------------------ where things run

INTERPRET = interpreter_enabled()
HAS_CUDA = torch.cuda.is_available()
TRITON_DEVICE = "cpu" if INTERPRET else "cuda"
try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False


def device_of(backend: str) -> str:
    """Device type of the tensors a backend's cases use."""
    return {"reference": "cpu", "cpu": "cpu", "cuda": "cuda", "triton": TRITON_DEVICE}[backend]


def _cuda_kernels(op: str = "fkd") -> bool:
    return _extension.has_kernel(f"{op}_forward", "CUDA")


needs_cpu_kernels = pytest.mark.skipif(
    not _extension.has_kernel("fkd_forward", "CPU"), reason="fastkd._C has no CPU kernels"
)
needs_triton = pytest.mark.skipif(
    not HAS_TRITON or not (INTERPRET or HAS_CUDA),
    reason="needs Triton and a CUDA device or TRITON_INTERPRET=1",
)
# compiled Triton on a GPU (the interpreter is too slow for large shapes)
needs_triton_gpu = pytest.mark.skipif(
    not HAS_TRITON or INTERPRET or not HAS_CUDA, reason="needs CUDA and TRITON_INTERPRET=0"
)
needs_cuda_kernels = pytest.mark.skipif(
    not HAS_CUDA or not _cuda_kernels(),
    reason="needs a CUDA device and fastkd._C built with FASTKD_BUILD_CUDA=1",
)


def backend_marks(backend: str, gpu: bool = False) -> list:
    """pytest marks of a case on ``backend``; ``gpu`` marks a Triton case for the GPU suite."""
    if backend == "cpu":
        return [needs_cpu_kernels]
    if backend == "cuda":
        return [pytest.mark.gpu, needs_cuda_kernels]
    if backend == "triton":
        return [pytest.mark.gpu, needs_triton_gpu] if gpu else [needs_triton]
    return []


# ------------------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    """One input configuration of one op on one backend.

    ``widths``: the student's, then each teacher's. ``options``: the op's settings as sorted
    (name, value) pairs (SRD: ``p``, ``training``; FKD: ``kd_weight``, ``fr_weight``).
    ``teacher_grad``: whether the teacher(s) require grad (the student always does).
    ``gpu``: a Triton case for the GPU suite (compiled Triton, large shapes).
    """

    op: str
    backend: str
    dtype: torch.dtype
    batch: int
    widths: tuple[int, ...]
    algorithm: str = "auto"
    teacher_grad: bool = True
    options: tuple = ()
    gpu: bool = False

    @property
    def opts(self) -> dict:
        return dict(self.options)

    @property
    def device(self) -> str:
        return device_of(self.backend)

    @property
    def id(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        extra = "-".join(f"{k}={v}" for k, v in self.options)
        parts = [self.op, self.backend, self.algorithm, dt, f"B{self.batch}"]
        parts += ["x".join(map(str, self.widths)), "tg" if self.teacher_grad else "nog", extra]
        return "-".join(p for p in parts if p)

    @property
    def seed(self) -> int:
        return zlib.crc32(self.id.encode())

    def param(self):
        """This case as a pytest param with its id and marks."""
        return pytest.param(self, id=self.id, marks=backend_marks(self.backend, self.gpu))


@dataclass
class Inputs:
    """The inputs of one call: ``tensors`` (student first, then the teacher(s)), which of them
    require grad, and the op's other arguments (``buffers``: SRD's running statistics)."""

    tensors: list[torch.Tensor]
    requires_grad: list[bool]
    options: dict = field(default_factory=dict)
    buffers: list[torch.Tensor] | None = None

    def leaves(self) -> list[torch.Tensor]:
        """Fresh leaves with the wanted requires_grad (views keep their strides)."""
        pairs = zip(self.tensors, self.requires_grad, strict=True)
        return [t.detach().requires_grad_(r) for t, r in pairs]

    def fresh_buffers(self) -> list[torch.Tensor] | None:
        return None if self.buffers is None else [b.clone() for b in self.buffers]

    def to64(self) -> Inputs:
        """float64 copies of the features (buffers as they are: they keep their own dtype)."""
        tensors = [t.detach().double() for t in self.tensors]
        return Inputs(tensors, list(self.requires_grad), dict(self.options), self.buffers)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Inputs:
        """Same inputs with ``fn`` applied to every tensor (e.g. ``.cuda()``)."""
        bufs = None if self.buffers is None else [fn(b) for b in self.buffers]
        return Inputs([fn(t) for t in self.tensors], list(self.requires_grad), self.options, bufs)


def randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    """float64 standard normal numbers from ``gen`` (on the CPU: reproducible on every host)."""
    return torch.randn(*shape, generator=gen, dtype=F64)


# ------------------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Result:
    """Loss, gradient of each input (None where it does not require grad), updated buffers."""

    loss: torch.Tensor
    grads: list[torch.Tensor | None]
    buffers: list[torch.Tensor] | None = None


@dataclass(frozen=True)
class OpCall:
    """One raw op call: ``name`` (``fkd_forward``...), its arguments, and how to read the loss
    and the gradients (times ``grad``) out of its result for a comparison with the reference."""

    name: str
    args: tuple
    loss: Callable | None = None
    grads: Callable | None = None
    scale: float = 1.0


@dataclass(frozen=True)
class BadInput:
    """A public-API call with one argument made wrong, and the error it must raise."""

    id: str
    overrides: dict
    error: type
    match: str


@dataclass(frozen=True)
class OpSpec:
    name: str
    fused_backends: tuple[str, ...]
    algorithms: tuple[str, ...]
    make: Callable[[torch.Generator, Case], Inputs]
    call: Callable  # (inputs, leaves, buffers, backend, algorithm) -> loss (public API)
    ref: Callable  # (inputs, leaves, buffers) -> loss (fastkd.reference)
    # (float64 inputs, grad_out, input dtype) -> (value terms, [terms of each gradient entry]):
    # a number for the loss, a tensor of each input's size (or a number) for its gradient
    terms: Callable
    op_calls: Callable | None = None  # (namespace, inputs, grad) -> [OpCall]
    module: Callable | None = None  # (backend, algorithm, options) -> nn.Module
    bad_inputs: tuple[BadInput, ...] = ()

    def inputs(self, case: Case) -> Inputs:
        """Fresh inputs of ``case`` on its device, in its dtype."""
        gen = torch.Generator().manual_seed(case.seed)
        x = self.make(gen, case)
        return x.map(lambda t: t.to(case.device))

    def namespace(self, backend: str):
        return torch.ops.fastkd_triton if backend == "triton" else torch.ops.fastkd


def _grad_tensor(inputs: Inputs, value: float) -> torch.Tensor:
    like = inputs.tensors[0]
    return torch.tensor(value, dtype=reference.loss_dtype(*inputs.tensors), device=like.device)


def run(
    op: OpSpec, inputs: Inputs, backend: str, algorithm: str = "auto", grad_out: float = 1.0
) -> Result:
    """Loss through the public API on ``backend``, then backward with upstream ``grad_out``."""
    leaves, bufs = inputs.leaves(), inputs.fresh_buffers()
    loss = op.call(inputs, leaves, bufs, backend, algorithm)
    if any(inputs.requires_grad):
        loss.backward(torch.tensor(grad_out, dtype=loss.dtype, device=loss.device))
    return Result(loss.detach(), [x.grad for x in leaves], bufs)


def oracle(op: OpSpec, inputs: Inputs, grad_out: float = 1.0) -> Result:
    """:func:`fastkd.testing.reference64` of ``op`` on ``inputs``: gradients of every input
    times ``grad_out`` (the running buffers are updated in their own dtype, as the kernels do)."""
    x = inputs.to64()
    bufs = x.fresh_buffers()
    loss, grads = reference64(
        lambda *leaves: op.ref(x, list(leaves), bufs), x.tensors, None, grad_out
    )
    return Result(loss, grads, bufs)


def assert_matches(
    op: OpSpec,
    got: Result,
    want: Result,
    inputs: Inputs,
    grad_out: float = 1.0,
    tol: Tol | None = None,
    what: str = "",
    rows: torch.Tensor | None = None,
) -> None:
    """``got`` (a :func:`run`) matches ``want`` (a :func:`oracle` of the same inputs): loss
    dtype, value, the gradient of each input requiring grad (dtype and value), buffers.

    ``rows`` (a (B,) bool mask, e.g. the zero rows, whose gradient is ~1e12 times the others'):
    the gradients of those rows and of the other rows are also judged on their own scale."""
    dtype = _input_dtype(inputs)
    tol = tol or TOL[dtype]
    value_terms, grad_terms = op.terms(inputs.to64(), grad_out, dtype)
    assert got.loss.dtype == reference.loss_dtype(*inputs.tensors), f"{what}: loss dtype"
    assert_close(got.loss, want.loss, dtype, tol.value, value_terms, f"{what} loss")
    for i, (g, w, x) in enumerate(zip(got.grads, want.grads, inputs.tensors, strict=True)):
        if not inputs.requires_grad[i]:
            assert g is None, f"{what}: input {i} does not require grad but got one"
            continue
        assert g is not None and g.dtype == x.dtype, f"{what}: gradient {i} dtype"
        assert_close(g, w, dtype, tol.grad, grad_terms[i], f"{what} grad[{i}]")
        for mask in () if rows is None else (rows, ~rows):
            mask = mask.to(g.device)
            terms = grad_terms[i]
            terms = (
                terms.reshape(g.shape)[mask.to(terms.device)] if torch.is_tensor(terms) else terms
            )
            assert_close(g[mask], w[mask.to(w.device)], dtype, tol.grad, terms, f"{what} rows")
    for i, (b, w) in enumerate(zip(got.buffers or [], want.buffers or [], strict=True)):
        assert_close(b, w, F32, max(tol.value, 1e-6), 0.0, f"{what} buffer[{i}]")


def _input_dtype(inputs: Inputs) -> torch.dtype:
    """The dtype that sets the tolerances: float64 if any input is, else the widest one."""
    dtypes = {t.dtype for t in inputs.tensors}
    for d in DTYPES:
        if d in dtypes:
            return d
    raise AssertionError(dtypes)


def check_op_calls(op: OpSpec, backend: str, inputs: Inputs, grad: float) -> None:
    """Every raw op of ``backend`` against the float64 reference (upstream ``grad``)."""
    want = oracle(op, inputs, 1.0)
    dtype = _input_dtype(inputs)
    tol = TOL[dtype]
    value_terms, grad_terms = op.terms(inputs.to64(), 1.0, dtype)
    for call in op.op_calls(op.namespace(backend), inputs, grad):
        out = getattr(op.namespace(backend), call.name)(*call.args)
        what = f"{backend}::{call.name}"
        if call.loss is not None:
            assert_close(call.loss(out), want.loss, dtype, tol.value, value_terms, what)
        if call.grads is not None:
            for i, g in enumerate(call.grads(out)):
                ref = call.scale * want.grads[i]
                terms = abs(call.scale) * grad_terms[i]
                assert_close(g, ref, dtype, tol.grad, terms, f"{what} grad[{i}]")


# ------------------------------------------------------------------------------------ FKD (§1)

FKD_WEIGHTS = (("fr_weight", 0.05), ("kd_weight", 0.8))


def _fkd_sizes(x: Inputs, grad_out: float, dtype: torch.dtype) -> tuple[float, list]:
    s, *ts = x.tensors
    return fkd_terms(s, ts, x.options["kd_weight"], x.options["fr_weight"], grad_out)


def _fkd_make(gen, case):
    widths = case.widths
    tensors = [randn(gen, case.batch, w).to(case.dtype) for w in widths]
    opts = dict(FKD_WEIGHTS) | case.opts
    return Inputs(tensors, [True] + [case.teacher_grad] * (len(widths) - 1), opts)


def _fkd_teachers(ts):
    return ts[0] if len(ts) == 1 else ts  # one teacher as a tensor: both call forms are tested


def _fkd_call(x, leaves, bufs, backend, algorithm):
    s, *ts = leaves
    o = x.options
    return fastkd.fkd_loss(
        s, _fkd_teachers(ts), o["kd_weight"], o["fr_weight"], backend=backend, algorithm=algorithm
    )


def _fkd_ref(x, leaves, bufs):
    s, *ts = leaves
    return reference.fkd_loss(s, ts, x.options["kd_weight"], x.options["fr_weight"])


def _fkd_op_calls(ns, x, grad):
    s, *ts = [t.detach() for t in x.tensors]
    kd, fr = x.options["kd_weight"], x.options["fr_weight"]
    g = _grad_tensor(x, grad)
    calls = [OpCall("fkd_forward", (s, ts, kd, fr), loss=lambda out: out)]
    for tg in (False, True):
        calls.append(
            OpCall(
                "fkd_backward",
                (g, s, ts, kd, fr, tg),
                grads=lambda out, tg=tg: [out[0], *(out[1] if tg else [])],
                scale=grad,
            )
        )
        calls.append(
            OpCall(
                "fkd_forward_backward",
                (s, ts, kd, fr, tg),
                loss=lambda out: out[0],
                grads=lambda out, tg=tg: [out[1], *(out[2] if tg else [])],
            )
        )
    return calls


def _fkd_opcheck_args(ns, x, grad):
    s, *ts = [t.detach() for t in x.tensors]
    kd, fr = x.options["kd_weight"], x.options["fr_weight"]
    g = _grad_tensor(x, grad)
    sg = s.clone().requires_grad_()
    out = [
        ("fkd_forward", (sg, ts, kd, fr)),
        ("fkd_forward", (sg, [t.clone().requires_grad_() for t in ts], kd, 0.0)),
    ]
    for tg in (False, True):
        out += [("fkd_backward", (g, s, ts, kd, fr, tg))]
        out += [("fkd_forward_backward", (s, ts, kd, fr, tg))]
    return out


def _fkd_module(backend, algorithm, options):
    o = dict(FKD_WEIGHTS) | options
    return fastkd.FKDLoss(o["kd_weight"], o["fr_weight"], backend=backend, algorithm=algorithm)


_T = torch.randn  # bad inputs are made at call time by these lambdas (fresh, any seed)

FKD_BAD = (
    BadInput("student-not-tensor", {"student": "x"}, TypeError, "student"),
    BadInput("teacher-not-tensor", {"teacher": "nope"}, TypeError, "teacher"),
    BadInput("student-1d", {"student": lambda: _T(4)}, ValueError, "student must be 2-D"),
    BadInput("teacher-3d", {"teacher": lambda: _T(4, 3, 1)}, ValueError, "teacher must be 2-D"),
    BadInput("batch-mismatch", {"teacher": lambda: _T(5, 3)}, ValueError, "batch size"),
    BadInput(
        "batch-1",
        {"student": lambda: _T(1, 3), "teacher": lambda: _T(1, 3)},
        ValueError,
        "at least 2",
    ),
    BadInput(
        "empty", {"student": lambda: _T(0, 3), "teacher": lambda: _T(0, 3)}, ValueError, "empty"
    ),
    BadInput("no-teachers", {"teacher": []}, ValueError, "at least one"),
    BadInput(
        "teacher-1-batch",
        {"teacher": lambda: [_T(4, 2), _T(3, 2)]},
        ValueError,
        r"teacher\[1\]",
    ),
    BadInput(
        "int-student",
        {"student": lambda: torch.ones(4, 3, dtype=torch.int64)},
        TypeError,
        "float16",
    ),
    BadInput("kd-nan", {"kd_weight": float("nan")}, ValueError, "kd_weight"),
    BadInput("fr-inf", {"fr_weight": float("inf")}, ValueError, "fr_weight"),
    BadInput("fr-str", {"fr_weight": "1"}, TypeError, "fr_weight"),
    BadInput("algorithm", {"algorithm": "x"}, ValueError, "algorithm"),
    BadInput("backend", {"backend": "tpu"}, ValueError, "backend"),
    BadInput(
        "device-mismatch",
        {"teacher": lambda: torch.randn(4, 3, device="meta")},
        ValueError,
        "teacher is on meta but student is on cpu",
    ),
)


# ------------------------------------------------------------------------------------- SP (§2)


def _pair_make(scale_t: float = 1.0):
    def make(gen, case):
        b, (ds, dt) = case.batch, case.widths
        s, t = randn(gen, b, ds), scale_t * randn(gen, b, dt)
        return Inputs([s.to(case.dtype), t.to(case.dtype)], [True, case.teacher_grad])

    return make


def _sp_call(x, leaves, bufs, backend, algorithm):
    return fastkd.sp_loss(*leaves, backend=backend, algorithm=algorithm)


def _sp_ref(x, leaves, bufs):
    return reference.sp_loss(*leaves)


RELATIONAL_BAD = (
    BadInput(
        "batch-1",
        {"student": lambda: _T(1, 3), "teacher": lambda: _T(1, 3)},
        ValueError,
        "at least 2",
    ),
    BadInput("batch-mismatch", {"teacher": lambda: _T(5, 3)}, ValueError, "batch size"),
    BadInput(
        "1d",
        {"student": lambda: _T(4), "teacher": lambda: _T(4)},
        ValueError,
        "feature dimension",
    ),
    BadInput("teacher-list", {"teacher": [1, 2, 3]}, TypeError, "teacher"),
    BadInput(
        "int-teacher",
        {"teacher": lambda: torch.ones(4, 3, dtype=torch.int32)},
        TypeError,
        "float",
    ),
    BadInput("algorithm", {"algorithm": "x"}, ValueError, "algorithm"),
    BadInput("backend", {"backend": "tpu"}, ValueError, "backend"),
)


# ------------------------------------------------------------------------------ RKD distance (§2)


def _rkd_call(x, leaves, bufs, backend, algorithm):
    return fastkd.rkd_distance_loss(*leaves, backend=backend, algorithm=algorithm)


def _rkd_ref(x, leaves, bufs):
    return reference.rkd_distance_loss(*leaves)


def _rkd_op_calls(ns, x, grad):
    s, t = [v.detach() for v in x.tensors]
    g = _grad_tensor(x, grad)
    calls = [OpCall("rkd_forward", (s, t), loss=lambda out: out)]
    for tg in (False, True):
        calls.append(
            OpCall(
                "rkd_backward",
                (g, s, t, tg),
                grads=lambda out, tg=tg: [out[0], *([out[1]] if tg else [])],
                scale=grad,
            )
        )
        calls.append(
            OpCall(
                "rkd_forward_backward",
                (s, t, tg),
                loss=lambda out: out[0],
                grads=lambda out, tg=tg: [out[1], *([out[2]] if tg else [])],
            )
        )
    return calls


def _rkd_opcheck_args(ns, x, grad):
    s, t = [v.detach() for v in x.tensors]
    g = _grad_tensor(x, grad)
    sg = s.clone().requires_grad_()
    out = [("rkd_forward", (sg, t)), ("rkd_forward", (sg, t.clone().requires_grad_()))]
    for tg in (False, True):
        out += [("rkd_backward", (g, s, t, tg)), ("rkd_forward_backward", (s, t, tg))]
    return out


# ------------------------------------------------------------------------------------ SRD (§3)

SRD_OPTIONS = (("p", 4.0), ("training", True))


def srd_buffers(gen: torch.Generator, width: int) -> list[torch.Tensor]:
    """Running (mean_s, var_s, mean_t, var_t), float32 as nn.BatchNorm1d keeps them."""
    mean_s, mean_t = randn(gen, 2, width).float()
    var_s, var_t = torch.rand(2, width, generator=gen) * 2.0 + 0.25
    return [mean_s, var_s, mean_t, var_t]


def _srd_sizes(x: Inputs, grad_out: float, dtype: torch.dtype) -> tuple[float, list]:
    o = x.options
    eps = o.get("eps", reference.SRD_EPS)
    return srd_terms(*x.tensors, o["p"], eps, o["training"], x.buffers, grad_out)


def _srd_make(gen, case):
    b, (d,) = case.batch, case.widths[:1]
    offset = case.opts.get("offset", 0.0)
    s = randn(gen, b, d) * 2.0 + offset
    t = randn(gen, b, d) * 0.5 - 1.0
    opts = dict(SRD_OPTIONS) | case.opts
    opts.pop("offset", None)
    bufs = srd_buffers(gen, d)
    return Inputs([s.to(case.dtype), t.to(case.dtype)], [True, case.teacher_grad], opts, bufs)


def _srd_call(x, leaves, bufs, backend, algorithm):
    o = x.options
    p, eps, training = o["p"], o.get("eps", reference.SRD_EPS), o["training"]
    bufs = bufs if bufs is not None else [None] * 4
    return fastkd.srd_loss(*leaves, p, eps, training, *bufs, backend=backend, algorithm=algorithm)


def _srd_ref(x, leaves, bufs):
    o = x.options
    bufs = bufs if bufs is not None else [None] * 4
    return reference.srd_loss(
        *leaves, o["p"], o.get("eps", reference.SRD_EPS), o["training"], *bufs
    )


def _srd_forward_args(x, s, t):
    o = x.options
    bufs = [b.to(s.dtype) if s.dtype == F64 else b for b in x.fresh_buffers()]
    return (s, t, o["p"], o.get("eps", reference.SRD_EPS), o["training"], *bufs)


def _srd_op_calls(ns, x, grad):
    s, t = [v.detach() for v in x.tensors]
    fwd_args = _srd_forward_args(x, s, t)
    out = ns.srd_forward(*fwd_args)
    g = _grad_tensor(x, grad)
    o = x.options
    bwd = (g, s, t, o["p"], o["training"], *out[1:], True)
    return [
        OpCall("srd_forward", fwd_args, loss=lambda out: out[0]),
        OpCall("srd_backward", bwd, grads=lambda out: list(out), scale=grad),
    ]


def _srd_opcheck_args(ns, x, grad):
    s, t = [v.detach() for v in x.tensors]
    g = _grad_tensor(x, grad)
    out = []
    for training in (True, False):
        y = replace_options(x, training=training)
        args = _srd_forward_args(y, s.clone().requires_grad_(), t.clone().requires_grad_())
        out.append(("srd_forward", args))
        res = ns.srd_forward(*_srd_forward_args(y, s, t))
        out.append(("srd_backward", (g, s, t, y.options["p"], training, *res[1:], True)))
    return out


def replace_options(x: Inputs, **options) -> Inputs:
    return Inputs(x.tensors, x.requires_grad, x.options | options, x.buffers)


def _srd_module(backend, algorithm, options):
    o = dict(SRD_OPTIONS) | options
    return fastkd.SRDLoss(5, 5, p=o["p"], backend=backend, algorithm=algorithm)


SRD_BAD = (
    BadInput("student-list", {"student": [[1.0]]}, TypeError, "student"),
    BadInput(
        "int-student",
        {"student": lambda: torch.ones(4, 3, dtype=torch.int64)},
        TypeError,
        "student",
    ),
    BadInput("teacher-1d", {"teacher": lambda: torch.ones(4)}, ValueError, "teacher"),
    BadInput("teacher-empty", {"teacher": lambda: torch.ones(0, 3)}, ValueError, "teacher"),
    BadInput("width", {"teacher": lambda: torch.ones(4, 5)}, ValueError, "teacher has shape"),
    BadInput("batch", {"teacher": lambda: torch.ones(5, 3)}, ValueError, "teacher has shape"),
    BadInput(
        "batch-1",
        {"student": lambda: torch.ones(1, 3), "teacher": lambda: torch.ones(1, 3)},
        ValueError,
        "student",
    ),
    BadInput("p-small", {"p": 0.5}, ValueError, "p must be >= 1"),
    BadInput("p-nan", {"p": float("nan")}, ValueError, "p must be finite"),
    BadInput("p-str", {"p": "4"}, TypeError, "p must be a real number"),
    BadInput("eps-0", {"eps": 0.0}, ValueError, "eps"),
    BadInput("momentum-big", {"momentum": 1.5}, ValueError, "momentum"),
    BadInput("momentum-inf", {"momentum": float("inf")}, ValueError, "momentum"),
    BadInput("training-int", {"training": 1}, TypeError, "training"),
    BadInput("eval-no-stats", {"training": False}, ValueError, "running statistics"),
    BadInput("half-pair", {"running_mean_s": lambda: torch.zeros(3)}, ValueError, "running_var_s"),
    BadInput(
        "var-width",
        {"running_mean_t": lambda: torch.zeros(3), "running_var_t": lambda: torch.ones(4)},
        ValueError,
        "running_var_t",
    ),
    BadInput(
        "int-buffer",
        {
            "running_mean_s": lambda: torch.zeros(3, dtype=torch.long),
            "running_var_s": lambda: torch.ones(3),
        },
        TypeError,
        "running_mean_s",
    ),
    BadInput(
        "list-buffer",
        {"running_mean_s": [0.0] * 3, "running_var_s": lambda: torch.ones(3)},
        TypeError,
        "running_mean_s",
    ),
    BadInput("algorithm", {"algorithm": "tiled"}, ValueError, "algorithm"),
    BadInput("backend", {"backend": "tpu"}, ValueError, "backend"),
)


# ----------------------------------------------------------------------------------- the table

OPS: dict[str, OpSpec] = {
    "fkd": OpSpec(
        "fkd",
        ("cpu", "cuda", "triton"),
        ("tiled", "dual"),
        _fkd_make,
        _fkd_call,
        _fkd_ref,
        _fkd_sizes,
        _fkd_op_calls,
        _fkd_module,
        FKD_BAD,
    ),
    "sp": OpSpec(
        "sp",
        (),
        ("explicit", "dual"),
        _pair_make(),
        _sp_call,
        _sp_ref,
        lambda x, grad_out, dtype: sp_terms(*x.tensors, grad_out),
        None,
        lambda backend, algorithm, options: fastkd.SPLoss(backend=backend, algorithm=algorithm),
        RELATIONAL_BAD,
    ),
    "rkd": OpSpec(
        "rkd",
        ("cpu", "cuda", "triton"),
        ("tiled",),
        _pair_make(3.0),
        _rkd_call,
        _rkd_ref,
        lambda x, grad_out, dtype: rkd_terms(*x.tensors, grad_out, dtype),
        _rkd_op_calls,
        lambda backend, algorithm, options: fastkd.RKDDistanceLoss(
            backend=backend, algorithm=algorithm
        ),
        RELATIONAL_BAD,
    ),
    "srd": OpSpec(
        "srd",
        ("cpu", "cuda", "triton"),
        ("fused",),
        _srd_make,
        _srd_call,
        _srd_ref,
        _srd_sizes,
        _srd_op_calls,
        _srd_module,
        SRD_BAD,
    ),
}
OPCHECK_ARGS = {"fkd": _fkd_opcheck_args, "rkd": _rkd_opcheck_args, "srd": _srd_opcheck_args}


def bad_call(op: OpSpec, overrides: dict) -> torch.Tensor:
    """The op's public call on small valid inputs with ``overrides`` (callables are called)."""
    kwargs = {"student": torch.randn(4, 3), "teacher": torch.randn(4, 3)}
    for k, v in overrides.items():
        kwargs[k] = v() if callable(v) else v
    student, teacher = kwargs.pop("student"), kwargs.pop("teacher")
    fn = {
        "fkd": fastkd.fkd_loss,
        "sp": fastkd.sp_loss,
        "rkd": fastkd.rkd_distance_loss,
        "srd": fastkd.srd_loss,
    }[op.name]
    return fn(student, teacher, **kwargs)


def cases(
    op: str,
    backend: str,
    dtypes: Sequence[torch.dtype],
    shapes: Sequence[tuple[int, tuple[int, ...]]],
    algorithms: Sequence[str] = ("auto",),
    options: Sequence[dict] = ({},),
    gpu: bool = False,
) -> list[Case]:
    """The product dtype x shape x algorithm x options; teachers require grad in every other
    case, so both kernel paths (with and without teacher gradients) run on every grid."""
    out = []
    for dtype in dtypes:
        for batch, widths in shapes:
            for algorithm in algorithms:
                for opts in options:
                    tg = len(out) % 2 == 0
                    out.append(
                        Case(
                            op,
                            backend,
                            dtype,
                            batch,
                            tuple(widths),
                            algorithm,
                            tg,
                            tuple(sorted(opts.items())),
                            gpu,
                        )
                    )
    return out


def with_teacher_grad(case: Case, teacher_grad: bool = True) -> Case:
    return replace(case, teacher_grad=teacher_grad)
