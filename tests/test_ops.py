"""Every op on every backend through one table (tests/harness.py): value and gradients against the
float64 reference with an upstream gradient != 1, the raw ops, torch.library.opcheck, a
fullgraph-compiled training step, bit-identical reruns, strided inputs, NaN, second derivatives,
gradcheck, the Module form and bad input.

Backends: ``reference`` (the public API's reference backend in float32/float16: its accumulation
against the float64 oracle), ``cpu`` (compiled kernels), ``triton`` (Triton's interpreter on CPU
tensors, small shapes; the ``gpu`` grids run compiled Triton on the GPU) and ``cuda`` (``gpu``,
skipped without a device). Op-specific cases (ensembles, SRD running statistics, RKD duplicate
rows, the dual's cancellation...) live in the per-op files, on the same harness.
"""

from __future__ import annotations

import pytest
import torch
from harness import (
    BF16,
    F16,
    F32,
    F64,
    INTERPRET,
    OPCHECK_ARGS,
    OPS,
    TOL,
    Case,
    assert_close,
    assert_matches,
    bad_call,
    cases,
    check_op_calls,
    oracle,
    run,
)

GRAD_OUT = -1.7  # upstream gradient of every backward pass: a kernel that ignores it fails
ALL = (F64, F32, F16, BF16)
FKD_WIDTHS = [(1, 7), (7, 1), (64, 300), (300, 64)]
SRD_P = [{"p": p, "training": tr} for p in (1.0, 2.0, 3.0, 4.0, 4.5) for tr in (True, False)]


def _srd_grid(backend, dtypes, shapes, powers, gpu=False):
    """SRD cases; p = 1 skips B = 2, where every column normalises to +-c and d = s - t can be
    exactly 0 at the jump of h = sign(d)."""
    out = []
    for opts in powers:
        rows = [(b, w) for b, w in shapes if not (opts["p"] == 1.0 and b == 2)]
        out += cases("srd", backend, dtypes, rows, ("auto",), [opts], gpu)
    return out


VALUE_CASES = [
    # ---- reference backend: float32/float16 accumulation against the float64 oracle
    *cases("fkd", "reference", (F32, F16), [(9, (5, 3)), (17, (7, 1, 4))]),
    *cases("sp", "reference", (F32,), [(17, (5, 8))], ("explicit", "dual")),
    *cases("sp", "reference", (F64,), [(2, (1, 3)), (17, (5, 8)), (130, (7, 3))], ("dual",)),
    *cases("sp", "reference", (F64,), [(300, (16, 40))], ("dual",)),
    *cases("rkd", "reference", (F32, F16), [(17, (12, 7))]),
    *cases("srd", "reference", (F32, F16), [(17, (7,))], options=[{"p": 4.0, "training": True}]),
    # ---- cpu
    *cases(
        "fkd",
        "cpu",
        (F64,),
        [(b, w) for b in (2, 3, 17, 130, 513) for w in FKD_WIDTHS],
        ("tiled", "dual"),
    ),
    *cases(
        "fkd",
        "cpu",
        (F32,),
        [(3, (7, 64)), (130, (64, 300)), (513, (300, 7))],
        ("tiled", "dual"),
    ),
    *cases("fkd", "cpu", (F16, BF16), [(37, (24, 40))], ("tiled", "dual")),
    *cases("rkd", "cpu", (F64,), [(b, w) for b in (2, 3, 17, 130, 513) for w in FKD_WIDTHS[:3]]),
    *cases("rkd", "cpu", (F64,), [(2100, (5, 3))]),  # nine 256-row blocks, two column panels
    *cases("rkd", "cpu", (F32,), [(3, (7, 64)), (130, (64, 300)), (513, (300, 7))]),
    *cases("rkd", "cpu", (F16, BF16), [(65, (24, 40))]),
    *_srd_grid("cpu", (F64, F32), [(2, (7,)), (3, (1,)), (17, (64,)), (130, (300,))], SRD_P),
    *cases("srd", "cpu", (F16, BF16), [(33, (20,))], options=SRD_P[6:8]),
    *cases(
        "srd",
        "cpu",
        (F64, F32),
        [(600, (70,))],  # several row chunks (Chan merges) and column tasks
        options=[{"p": 4.0, "training": True, "offset": 3.0}],
    ),
    *cases(
        "srd",
        "cpu",
        (F64,),
        [(17, (9,))],
        options=[{"p": p, "training": True} for p in (6.0, 8.0, 9.0, 1.5)],
    ),
    # ---- triton (interpreter: small shapes; 16-row blocks, 32-wide chunks)
    *cases("fkd", "triton", (F32,), [(2, (1, 7)), (3, (7, 1)), (17, (40, 7)), (33, (7, 40))]),
    *cases("fkd", "triton", (F64,), [(17, (9, 40))]),
    *cases("fkd", "triton", (F16,), [(17, (40, 33))]),
    *cases("rkd", "triton", (F64,), [(2, (1, 7)), (3, (7, 1)), (45, (40, 33))]),
    *cases("rkd", "triton", (F32,), [(17, (65, 3)), (45, (33, 40))]),
    *cases("rkd", "triton", (F16,), [(40, (20, 9))]),
    *_srd_grid(
        "triton",
        (F32,),
        [(2, (7,)), (17, (7,))],
        [{"p": 4.0, "training": tr} for tr in (True, False)],
    ),
    *_srd_grid("triton", (F32,), [(3, (1,))], [{"p": 1.0, "training": tr} for tr in (True, False)]),
    *_srd_grid(
        "triton", (F32,), [(17, (7,))], [{"p": 4.5, "training": tr} for tr in (True, False)]
    ),
    *_srd_grid(
        "triton", (F64,), [(17, (7,))], [{"p": 2.0, "training": tr} for tr in (True, False)]
    ),
    *_srd_grid(
        "triton", (F64,), [(30, (9,))], [{"p": 3.0, "training": tr} for tr in (True, False)]
    ),
    *_srd_grid(
        "triton", (F16,), [(17, (9,))], [{"p": 4.0, "training": tr} for tr in (True, False)]
    ),
    # ---- triton on the GPU (compiled)
    *cases("fkd", "triton", ALL, [(b, (300, 257, 64)) for b in (130, 4096)], gpu=True),
    *cases("rkd", "triton", ALL, [(b, (300, 257)) for b in (130, 4096)], gpu=True),
    *_srd_grid(
        "triton",
        (F64, F32),
        [(2, (7,)), (3, (1,)), (17, (64,)), (130, (300,)), (4096, (33,)), (20000, (5,))],
        [{"p": p, "training": tr} for p in (1.0, 2.0, 4.0, 4.5) for tr in (True, False)],
        gpu=True,
    ),
    *cases("srd", "triton", (F16, BF16), [(777, (96,))], options=SRD_P[6:8], gpu=True),
    # ---- cuda
    *cases(
        "fkd",
        "cuda",
        ALL,
        [(b, w) for b in (2, 3, 17, 130, 513, 4096) for w in FKD_WIDTHS],
        ("tiled",),
    ),
    *cases("rkd", "cuda", ALL, [(b, (33, 70)) for b in (2, 17, 130, 4096)]),
    *cases("rkd", "cuda", (F64,), [(130, (1, 7)), (130, (7, 1)), (130, (300, 64))]),
    *_srd_grid(
        "cuda",
        (F64, F32),
        [(2, (7,)), (3, (1,)), (17, (64,)), (130, (300,)), (4096, (33,)), (20000, (5,))],
        [{"p": p, "training": tr} for p in (1.0, 2.0, 4.0, 4.5) for tr in (True, False)],
    ),
    *cases("srd", "cuda", (F16, BF16), [(777, (96,))], options=SRD_P[6:8]),
]


@pytest.mark.parametrize("case", [c.param() for c in VALUE_CASES])
def test_value_and_gradients_match_float64_reference(case: Case):
    op = OPS[case.op]
    inputs = op.inputs(case)
    got = run(op, inputs, case.backend, case.algorithm, GRAD_OUT)
    want = oracle(op, inputs, GRAD_OUT)
    assert got.loss.device.type == case.device
    assert_matches(op, got, want, inputs, GRAD_OUT, what=case.id)


# Raw ops (forward, backward with grad != 1 for teachers with and without gradient,
# forward-backward) against the reference. B = 1 is only reachable here (the losses need
# B >= 2): the FKD teacher gradient is exactly 0 in exact arithmetic.
OP_CALL_CASES = [
    *cases("fkd", "cpu", (F64,), [(1, (3, 4)), (300, (9, 4, 11))]),
    *cases("fkd", "cpu", (F32,), [(1, (5, 3))]),
    *cases("rkd", "cpu", (F64,), [(70, (5, 12))]),
    *cases("srd", "cpu", (F64,), [(17, (7,))], options=SRD_P[6:8]),
    *cases("fkd", "triton", (F32,), [(6, (5, 3, 4)), (17, (20, 9, 40))]),
    *cases("rkd", "triton", (F32,), [(17, (10, 6))]),
    *cases("srd", "triton", (F32,), [(9, (5,))], options=SRD_P[6:8]),
    *cases("fkd", "cuda", ALL, [(b, (24, 40, 9)) for b in (1, 3, 130, 1000)]),
    *cases("rkd", "cuda", ALL, [(b, (33, 70)) for b in (2, 17, 130)]),
    *cases("srd", "cuda", (F64, F32), [(130, (33,))], options=SRD_P[6:8]),
]


@pytest.mark.parametrize("case", [c.param() for c in OP_CALL_CASES])
def test_raw_ops_match_reference(case: Case):
    op = OPS[case.op]
    check_op_calls(op, case.backend, op.inputs(case), GRAD_OUT)


OPCHECK_CASES = [
    *cases("fkd", "cpu", (F64,), [(17, (6, 4, 9))]),
    *cases("rkd", "cpu", (F64,), [(17, (6, 4))]),
    *cases("srd", "cpu", (F64,), [(9, (5,))]),
    *cases("fkd", "triton", (F32,), [(3, (4, 5, 2))]),
    *cases("rkd", "triton", (F32,), [(5, (4, 3))]),
    *cases("srd", "triton", (F32,), [(6, (5,))]),
    *cases("fkd", "cuda", (F32,), [(67, (6, 4, 9))]),
    *cases("rkd", "cuda", (F64,), [(17, (6, 4))]),
    *cases("srd", "cuda", (F64,), [(9, (5,))]),
]


@pytest.mark.parametrize("case", [c.param() for c in OPCHECK_CASES])
def test_opcheck(case: Case):
    """torch.library.opcheck (schema, fake kernel, autograd registration, aot dispatch) of every
    raw op of the backend's namespace, with teacher gradients on and off."""
    op = OPS[case.op]
    inputs = op.inputs(case)
    ns = op.namespace(case.backend)
    for name, args in OPCHECK_ARGS[case.op](ns, inputs, 1.5):
        torch.library.opcheck(getattr(ns, name), args)


COMPILE_CASES = [
    (c, compiler)
    for c, compilers in [
        (Case("fkd", "cpu", F64, 33, (8, 20, 5), "tiled"), ("aot_eager", "inductor")),
        (Case("rkd", "cpu", F64, 33, (8, 20)), ("aot_eager", "inductor")),
        (Case("fkd", "triton", F32, 5, (6, 3, 2), "tiled"), ("aot_eager",)),
        (Case("rkd", "triton", F32, 9, (6, 5)), ("aot_eager",)),
        (Case("fkd", "cuda", F32, 333, (8, 20, 5), "tiled"), ("inductor",)),
        (Case("rkd", "cuda", F32, 130, (8, 20)), ("inductor",)),
    ]
    for compiler in compilers
]


@pytest.mark.parametrize(
    "case,compiler",
    [pytest.param(c, k, id=f"{c.id}-{k}", marks=c.param().marks) for c, k in COMPILE_CASES],
)
def test_torch_compile_fullgraph_training_step(case: Case, compiler: str):
    """A training step (Linear student -> loss -> backward) compiled with fullgraph=True: any
    graph break (backend resolution, a missing fake kernel) fails; value and weight gradient
    equal the eager step's."""
    op = OPS[case.op]
    inputs = op.inputs(case)
    torch.manual_seed(case.seed % 1000)
    layer = torch.nn.Linear(12, case.widths[0]).to(case.device, case.dtype)
    x = torch.randn(case.batch, 12, device=case.device, dtype=case.dtype)
    teachers = [t.detach() for t in inputs.tensors[1:]]

    def step(x, *teachers):
        return op.call(inputs, [layer(x), *teachers], None, case.backend, case.algorithm)

    eager = step(x, *teachers)
    (eager_grad,) = torch.autograd.grad(eager, layer.weight)
    compiled = torch.compile(step, fullgraph=True, backend=compiler)(x, *teachers)
    (grad,) = torch.autograd.grad(compiled, layer.weight)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(grad, eager_grad)


DETERMINISM_CASES = [
    *cases("fkd", "cpu", (F32,), [(700, (50, 30))], ("tiled",)),
    *cases("rkd", "cpu", (F32,), [(700, (20, 30))]),
    *cases("srd", "cpu", (F32,), [(300, (130,))], options=[{"p": 4.5, "training": True}]),
    *cases("fkd", "triton", (F32,), [(33, (20, 9, 35))], ("tiled",)),
    *cases("rkd", "triton", (F32,), [(50, (12, 8))]),
    *cases("srd", "triton", (F32,), [(17, (7,))], options=[{"p": 4.5, "training": True}]),
    *cases("fkd", "cuda", ALL, [(1100, (40, 30, 7))], ("tiled",)),
    *cases("rkd", "cuda", (F32, F64), [(1000, (77, 50))]),
    *cases("srd", "cuda", (F32,), [(3000, (77,))], options=[{"p": 4.5, "training": True}]),
]


@pytest.mark.parametrize("case", [c.param() for c in DETERMINISM_CASES])
def test_reruns_are_bit_identical(case: Case):
    """The public call (forward-backward path) and the raw ops give bitwise equal results (on
    the interpreter and the CPU the plain forward op only: the others are the public path's)."""
    op = OPS[case.op]
    inputs = op.inputs(case)
    ns = op.namespace(case.backend)
    first, second = (run(op, inputs, case.backend, case.algorithm, GRAD_OUT) for _ in range(2))
    for a, b in zip([first.loss, *first.grads], [second.loss, *second.grads], strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    calls = op.op_calls(ns, inputs, GRAD_OUT)
    for call in calls if case.backend == "cuda" else calls[:1]:
        outs = [getattr(ns, call.name)(*call.args) for _ in range(2)]
        flat = [_flatten(o) for o in outs]
        assert all(torch.equal(a, b) for a, b in zip(*flat, strict=True)), call.name


def _flatten(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _flatten(o)]


def _strided(x: torch.Tensor, column_major: bool) -> torch.Tensor:
    """The same values, not contiguous: column-major, or every other column of a wider matrix."""
    if column_major:
        return x.t().contiguous().t()
    return torch.stack([x, x], 2).flatten(1)[:, ::2]


STRIDED_CASES = [
    *cases("fkd", "cpu", (F64,), [(17, (20, 20))], ("tiled", "dual")),
    *cases("rkd", "cpu", (F64,), [(19, (6, 6))]),
    *cases("srd", "cpu", (F32,), [(10, (12,))]),
    *cases("sp", "reference", (F64,), [(9, (4, 5))], ("dual",)),
    *cases("fkd", "triton", (F32,), [(17, (9, 13))], ("tiled",)),
    *cases("fkd", "cuda", (F32,), [(17, (40, 40))], ("tiled",)),
    *cases("rkd", "cuda", (F32,), [(70, (12, 20))]),
]


@pytest.mark.parametrize("case", [c.param() for c in STRIDED_CASES])
def test_non_contiguous_inputs(case: Case):
    op = OPS[case.op]
    inputs = op.inputs(case)
    inputs.tensors = [_strided(t, i == 0) for i, t in enumerate(inputs.tensors)]
    assert not any(t.is_contiguous() for t in inputs.tensors)
    got = run(op, inputs, case.backend, case.algorithm, GRAD_OUT)
    assert_matches(op, got, oracle(op, inputs, GRAD_OUT), inputs, GRAD_OUT, what=case.id)


NAN_CASES = [
    *cases("fkd", "reference", (F32,), [(6, (3, 3))]),
    *cases("fkd", "cpu", (F32,), [(6, (3, 3))], ("tiled", "dual")),
    *cases("sp", "reference", (F32,), [(6, (3, 3))], ("explicit", "dual")),
    *cases("rkd", "cpu", (F32,), [(12, (4, 4))]),
    *cases("srd", "cpu", (F32,), [(9, (5,))]),
    *cases("fkd", "triton", (F32,), [(17, (5, 3))], ("tiled",)),
    *cases("rkd", "triton", (F64,), [(20, (5, 4))]),
    *cases("srd", "triton", (F32,), [(9, (5,))]),
]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's, in the Triton interpreter
@pytest.mark.parametrize("case", [c.param() for c in NAN_CASES])
def test_nan_in_features_propagates(case: Case):
    op = OPS[case.op]
    inputs = op.inputs(case)
    inputs.tensors[0][2, 1] = float("nan")
    assert torch.isnan(oracle(op, inputs).loss)
    assert torch.isnan(run(op, inputs, case.backend, case.algorithm, GRAD_OUT).loss)


FUNCTION_CASES = [
    *cases("fkd", "cpu", (F64,), [(5, (3, 4, 2))], ("tiled", "dual")),
    *cases("rkd", "cpu", (F64,), [(9, (3, 4))]),
    *cases(
        "srd",
        "cpu",
        (F64,),
        [(6, (3,))],
        options=[
            {"p": 2.5, "training": True},
            {"p": 4.0, "training": False},
            {"p": 4.0, "training": True},
            {"p": 2.5, "training": False},
        ],
    ),
    *cases("sp", "reference", (F64,), [(5, (3, 4))], ("explicit", "dual")),
    *cases("rkd", "reference", (F64,), [(5, (3, 4))]),
]


@pytest.mark.parametrize("case", [c.param() for c in FUNCTION_CASES])
def test_gradcheck_float64(case: Case):
    op = OPS[case.op]
    inputs = op.inputs(case)
    leaves = [t.detach().requires_grad_() for t in inputs.tensors]

    def f(*xs):
        return op.call(inputs, list(xs), inputs.fresh_buffers(), case.backend, case.algorithm)

    assert torch.autograd.gradcheck(f, tuple(leaves))


@pytest.mark.parametrize("case", [c.param() for c in FUNCTION_CASES if c.backend != "reference"])
def test_second_derivatives_are_refused_not_silently_wrong(case: Case):
    op = OPS[case.op]
    inputs = op.inputs(case)
    leaves = inputs.leaves()
    loss = op.call(inputs, leaves, inputs.fresh_buffers(), case.backend, case.algorithm)
    (g,) = torch.autograd.grad(loss, leaves[0], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        g.sum().backward()


MODULE_CASES = [
    Case("fkd", "cpu", F32, 9, (5, 5), "tiled", options=(("fr_weight", 0.2), ("kd_weight", 0.5))),
    Case("fkd", "cpu", F32, 9, (5, 5), "dual"),
    Case("sp", "reference", F32, 9, (5, 5), "dual"),
    Case("rkd", "cpu", F32, 9, (5, 5)),
    Case("srd", "cpu", F32, 9, (5,), options=(("p", 3.0), ("training", True))),
]


@pytest.mark.parametrize("case", [c.param() for c in MODULE_CASES])
def test_module_matches_functional_and_repr(case: Case):
    """The nn.Module form: same value as the functional, keywords in its repr."""
    op = OPS[case.op]
    inputs = op.inputs(case)
    module = op.module(case.backend, case.algorithm, case.opts)
    # SRDLoss: no projector (equal widths) and its own running buffers, as the plain call's
    want = op.call(inputs, inputs.tensors, None, case.backend, case.algorithm)
    student, *teachers = inputs.tensors
    got = module(student, teachers if case.op == "fkd" else teachers[0])
    assert got.item() == want.item()
    text = repr(module)
    assert f"backend={case.backend!r}" in text and f"algorithm={case.algorithm!r}" in text
    for name, value in case.options:
        if name != "training":
            assert f"{name}={value}" in text


@pytest.mark.parametrize(
    "op_name,bad",
    [
        pytest.param(name, bad, id=f"{name}-{bad.id}")
        for name, op in OPS.items()
        for bad in op.bad_inputs
    ],
)
def test_bad_input_is_a_clear_error(op_name, bad):
    with pytest.raises(bad.error, match=bad.match):
        bad_call(OPS[op_name], bad.overrides)


def test_the_judgement_is_not_roundoff_relative():
    """A reference that is zero in exact arithmetic (the FKD teacher gradient at B = 1) is roundoff
    whose size depends on the host; the judgement uses the chain-rule terms instead: an error of
    a few ulps of the terms passes, an error of 1e-3 of them fails, whatever the roundoff."""
    op = OPS["fkd"]
    inputs = op.inputs(Case("fkd", "cpu", F64, 1, (5, 3)))
    want = oracle(op, inputs, GRAD_OUT).grads[1]
    _, terms = op.terms(inputs.to64(), GRAD_OUT, F64)
    size = terms[1].max().item()
    assert size > 0 and want.abs().max().item() <= 1e-12 * size
    good = 4 * torch.finfo(F64).eps * terms[1]  # a correct kernel's rounding around 0
    for roundoff in (0.0, 1e-17, 1e-30):  # what the float64 reference returns on some host
        host = torch.full_like(want, roundoff)
        assert_close(good, host, F64, TOL[F64].grad, terms[1])
        with pytest.raises(AssertionError):
            assert_close(1e-3 * terms[1], host, F64, TOL[F64].grad, terms[1])


def test_interpreter_cases_use_cpu_tensors():
    """Triton's interpreter runs on CPU tensors whatever the host has (conftest sets
    TRITON_INTERPRET=1 unless the GPU suite sets 0)."""
    case = Case("fkd", "triton", F32, 3, (2, 2))
    assert OPS["fkd"].inputs(case).tensors[0].device.type == ("cpu" if INTERPRET else "cuda")
