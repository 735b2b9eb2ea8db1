"""Precision of the dual (feature-space) FKD algorithm near agreement, on the CPU.

The fp32 sum-difference form of :mod:`fastkd.losses.fkd_dual` is forced on the CPU
(``COMPUTE_DTYPE = torch.float32``) and compared with the float64 reference (values and
gradients) when the teacher's kernel is close to the student's: teacher = student + relative
noise 1e-3 / 1e-5 / 1e-7, also rotated, wider or narrower than the student, and ensembles. The
naive fp32 three-Gram form is run on the same inputs to show that the comparison can fail.
Also: the device-based choice of the Gram dtype with fake device properties.

``python tests/test_fkd_dual_precision.py`` prints the accuracy table of docs/dual.md.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import fastkd
from fastkd import reference, testing
from fastkd.losses import fkd_dual

LEVELS = (1e-3, 1e-5, 1e-7)
KINDS = ("noisy", "rotated", "wider", "narrower", "ensemble")


def _orthogonal(d, gen):
    q, r = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=gen))
    return q * torch.sign(torch.diagonal(r))


def _noisy(x, level, gen):
    """x + noise of relative size ``level`` per row (float64)."""
    scale = level * x.norm(dim=1, keepdim=True) / math.sqrt(x.shape[1])
    return x + scale * torch.randn(x.shape, dtype=x.dtype, generator=gen)


def make_case(kind, b, d, level, seed):
    """float32 (student (B, Ds), [teachers]) whose kernels agree to ~``level``.

    noisy: teacher = student + noise (same columns). rotated: the teacher is also turned by a
    random orthogonal matrix (same kernel, other basis). wider / narrower: the teacher has 5
    more / 3 fewer columns, the extra ones of size ``level``, then a rotation. ensemble: two
    teachers of widths d and d + 4, each a noisy rotated copy of the student. Features have an
    uneven spectrum (column scales 1 .. 0.05), like real ones."""
    gen = torch.Generator().manual_seed(seed)
    spectrum = torch.logspace(0, math.log10(0.05), d, dtype=torch.float64)
    base = torch.randn(b, d, dtype=torch.float64, generator=gen) * spectrum
    if kind == "noisy":
        return base.float(), [_noisy(base, level, gen).float()]
    if kind == "rotated":
        return base.float(), [(_noisy(base, level, gen) @ _orthogonal(d, gen)).float()]
    if kind in ("wider", "narrower"):
        extra = 5 if kind == "wider" else 3
        tail = level * torch.randn(b, extra, dtype=torch.float64, generator=gen)
        wide = torch.cat((_noisy(base, level, gen), tail), dim=1) @ _orthogonal(d + extra, gen)
        if kind == "wider":
            return base.float(), [wide.float()]
        return wide.float(), [base.float()]  # the student is the wider one
    if kind == "ensemble":
        teachers = []
        for extra in (0, 4):
            tail = level * torch.randn(b, extra, dtype=torch.float64, generator=gen)
            copy = torch.cat((_noisy(base, level, gen), tail), dim=1)
            teachers.append((copy @ _orthogonal(d + extra, gen)).float())
        return base.float(), teachers
    raise ValueError(kind)


def fkd_reference(student, teachers, kd_weight=1.0, fr_weight=0.0):
    """Value and gradients (student, then each teacher): fastkd.testing.reference64 of
    fastkd.reference.fkd_loss."""
    return testing.reference64(
        lambda s, *ts: reference.fkd_loss(s, list(ts), kd_weight, fr_weight), [student, *teachers]
    )


MODES = {  # mode: (Gram dtype, ALIGN); see dual()
    "float64": (torch.float64, None),
    "float64-aligned": (torch.float64, True),
    "float32": (torch.float32, None),
    "float32-unaligned": (torch.float32, False),
}


def dual(student, teachers, kd_weight=1.0, fr_weight=0.0, mode="float32"):
    """Value and gradients of fkd_loss(algorithm="dual") with the Grams of ``mode``: a key of
    MODES (the sum-difference form: "float32" is what slow-fp64 GPUs run, "float64" the CPU),
    or "three64" / "three32" (the cancelling three-Gram form in that dtype, with the same
    float64 normalisations, so that only the Gram formula differs)."""
    s = student.detach().clone().requires_grad_()
    ts = [t.detach().clone().requires_grad_() for t in teachers]
    if mode.startswith("three"):
        dtype = torch.float64 if mode == "three64" else torch.float32
        loss = _ThreeGrams.apply(dtype, kd_weight, fr_weight, s, *ts)
    else:
        old = fkd_dual.COMPUTE_DTYPE, fkd_dual.ALIGN
        fkd_dual.COMPUTE_DTYPE, fkd_dual.ALIGN = MODES[mode]
        try:
            loss = fastkd.fkd_loss(s, ts, kd_weight, fr_weight, backend="cpu", algorithm="dual")
        finally:
            fkd_dual.COMPUTE_DTYPE, fkd_dual.ALIGN = old
    return loss.detach(), list(torch.autograd.grad(loss, [s, *ts]))


class _ThreeGrams(torch.autograd.Function):
    """||A^T A||^2 - 2 ||A^T T||^2 + ||T^T T||^2 with Grams in ``dtype`` (the cancelling form):
    :func:`fastkd.losses.fkd_dual.three_grams` between the module's own normalisations."""

    @staticmethod
    def forward(ctx, dtype, kd_weight, fr_weight, student, *teachers):
        b, ds = student.shape
        a, inv_s, sq = fkd_dual.normalize_rows(student, torch.float64)
        t, inv_t = fkd_dual._teacher_matrix(teachers, torch.float64)
        root = math.sqrt(len(teachers))
        scale = kd_weight / (b * b)
        total, grad_a, grad_t = fkd_dual.three_grams(
            a.to(dtype), t.to(dtype), scale, scale / root, True, True
        )
        ctx.grads = [
            fkd_dual.normalize_backward_(
                grad_a.double(), a, inv_s, torch.empty_like(student), 1.0, fr_weight * 2 / (b * ds)
            )
        ]
        col = 0
        for e, te in enumerate(teachers):
            cols = slice(col, col + te.shape[1])
            ctx.grads.append(
                fkd_dual.normalize_backward_(
                    grad_t[:, cols].double(), t[:, cols], inv_t[e], torch.empty_like(te), 1 / root
                )
            )
            col += te.shape[1]
        return (kd_weight * total.double() / (b * b) + fr_weight * sq / (b * ds)).float()

    @staticmethod
    def backward(ctx, grad):
        return None, None, None, *[g * grad for g in ctx.grads]


def errors(got, want):
    """(relative error of the value, worst relative error of a gradient), each gradient judged
    against its own largest entry (the true gradient's scale, not a roundoff one)."""
    (loss, grads), (ref_loss, ref_grads) = got, want
    value = abs(loss.double().item() - ref_loss.item()) / abs(ref_loss.item())
    grad = max(
        ((g.double() - r).abs().max() / r.abs().max()).item()
        for g, r in zip(grads, ref_grads, strict=True)
    )
    return value, grad


# Features that agree column by column ("noisy"): ~u (unit roundoff 6e-8) up to a small factor
# (measured worst 7e-6 value, 1e-6 gradients, at B = 2), at every agreement level.
VALUE_RTOL = 3e-5
GRAD_RTOL = 1e-5
# Agreement in another basis: the fp32 rotation keeps the kernel only to ~u, so the errors grow
# like u / level (measured worst: 5e-4 / 4e-4 at 1e-3; 4e-3 / 4e-2 at 1e-5 from B = 17; at
# B = 2 and 1e-5 the value is off by 0.3). Tolerances (value, gradients) per level:
OTHER_BASIS_RTOL = {1e-3: (3e-3, 2e-3), 1e-5: (2e-2, 2e-1)}


def _cases():
    for kind in KINDS:
        for level in LEVELS:
            for b in (2, 3, 17, 513):
                if kind == "noisy" or level == 1e-3 or (level == 1e-5 and b >= 17):
                    yield kind, level, b


@pytest.mark.parametrize("kind,level,b", list(_cases()))
def test_fp32_form_matches_float64_reference_near_agreement(kind, level, b):
    student, teachers = make_case(kind, b, 6, level, seed=b)
    want = fkd_reference(student, teachers)
    value_err, grad_err = errors(dual(student, teachers), want)
    if kind == "noisy":
        assert value_err < VALUE_RTOL and grad_err < GRAD_RTOL, (value_err, grad_err)
        return
    value_tol, grad_tol = OTHER_BASIS_RTOL[level]
    assert value_err < value_tol and grad_err < grad_tol, (value_err, grad_err)
    # ... and the value is far better than the three fp32 Grams' (measured >= 100x).
    naive_value, _ = errors(dual(student, teachers, mode="three32"), want)
    assert value_err < naive_value / 20, (value_err, naive_value)


@pytest.mark.parametrize("level", LEVELS)
def test_naive_fp32_fails_where_the_sum_difference_form_passes(level):
    # Same inputs, same normalisations: only the Gram formula differs. The naive error grows
    # like 1e-7 / level^2 (already ~1e-2 at level 1e-3), the sum-difference one stays ~1e-7.
    student, teachers = make_case("noisy", 513, 16, level, seed=7)
    want = fkd_reference(student, teachers)
    naive_value, naive_grad = errors(dual(student, teachers, mode="three32"), want)
    ours_value, ours_grad = errors(dual(student, teachers), want)
    assert naive_value > 100 * VALUE_RTOL and naive_grad > 10 * GRAD_RTOL
    assert ours_value < VALUE_RTOL and ours_grad < GRAD_RTOL


@pytest.mark.parametrize("kind", ["noisy", "ensemble"])
def test_float64_grams_use_the_same_form_and_beat_three_grams(kind):
    # The CPU path (float64 Grams): the three float64 Grams cancel too at agreement 1e-7; the
    # sum-difference form stays at the float32 output's rounding (aligned for the ensemble).
    student, teachers = make_case(kind, 513, 16, 1e-7, seed=15)
    want = fkd_reference(student, teachers)
    mode = "float64" if kind == "noisy" else "float64-aligned"
    ours = errors(dual(student, teachers, mode=mode), want)
    three = errors(dual(student, teachers, mode="three64"), want)
    assert ours[0] < 1e-6 and ours[1] < 1e-6, ours
    assert three[0] > 1e-3, three


def test_alignment_is_what_makes_another_basis_accurate():
    # A rotated teacher has the same kernel; without the Procrustes turn, Q = A - T is O(1) and
    # the sum-difference form cancels as badly as the naive one.
    student, teachers = make_case("rotated", 513, 16, 1e-4, seed=8)
    want = fkd_reference(student, teachers)
    unaligned = errors(dual(student, teachers, mode="float32-unaligned"), want)
    aligned = errors(dual(student, teachers), want)
    assert unaligned[0] > 1e-1
    assert aligned[0] < unaligned[0] / 100 and aligned[0] < 1e-3


@pytest.mark.parametrize("b", [3, 130])
@pytest.mark.parametrize("ds,dts", [(5, [5]), (3, [8]), (9, [2]), (4, [3, 7]), (6, [6, 6])])
def test_fp32_form_on_unrelated_features_with_weights(b, ds, dts):
    # Far from agreement (independent features), with both weights and teachers requiring grad.
    gen = torch.Generator().manual_seed(b * ds)
    student = torch.randn(b, ds, generator=gen)
    teachers = [torch.randn(b, d, generator=gen) for d in dts]
    got = dual(student, teachers, 0.8, 0.3)
    value_err, grad_err = errors(got, fkd_reference(student, teachers, 0.8, 0.3))
    assert value_err < VALUE_RTOL and grad_err < GRAD_RTOL
    assert got[0].dtype == torch.float32 and all(g.dtype == torch.float32 for g in got[1])


@pytest.mark.parametrize("mode", ["float32", "float32-unaligned", "float64"])
def test_identical_inputs_give_zero(mode):
    gen = torch.Generator().manual_seed(9)
    student = torch.randn(65, 12, generator=gen)
    loss, grads = dual(student, [student.clone()], mode=mode)
    assert loss.item() >= 0.0 and loss.item() < 1e-12
    if mode != "float64":  # P = 2A and Q = 0 exactly; the rotation is not taken
        assert loss.item() == 0.0 and all(torch.count_nonzero(g) == 0 for g in grads)


def test_identical_ensemble_is_non_negative_and_tiny():
    # Two copies of the student as teachers: T = [A, A] / sqrt(2) agrees only after a rotation.
    gen = torch.Generator().manual_seed(10)
    student = torch.randn(300, 10, generator=gen)
    loss, grads = dual(student, [student.clone(), student.clone()])
    assert 0.0 <= loss.item() < 1e-12
    # dL/dfs is O(sqrt(loss)) here; judge it against a unit-scale gradient of unrelated inputs.
    assert max(g.abs().max().item() for g in grads) < 1e-6


def test_float16_and_bfloat16_inputs():
    student, teachers = make_case("rotated", 97, 8, 1e-2, seed=11)
    for dtype, tol in ((torch.float16, 2e-3), (torch.bfloat16, 1e-2)):
        s, ts = student.to(dtype), [t.to(dtype) for t in teachers]
        loss, grads = dual(s, ts)
        assert loss.dtype == torch.float32 and grads[0].dtype == dtype
        value_err, grad_err = errors((loss, grads), fkd_reference(s, ts))
        assert value_err < 1e-4 and grad_err < tol


def test_nan_propagates_without_crashing():
    student, teachers = make_case("rotated", 20, 4, 1e-3, seed=12)
    student[3, 1] = float("nan")
    loss, _ = dual(student, teachers)
    assert torch.isnan(loss)


def test_compute_dtype_override_and_float64_inputs(monkeypatch):
    x32, x64 = torch.randn(4, 3), torch.randn(4, 3, dtype=torch.float64)
    assert fkd_dual.compute_dtype(x32, x32) == torch.float64  # CPU: fast fp64
    monkeypatch.setattr(fkd_dual, "COMPUTE_DTYPE", torch.float32)
    assert fkd_dual.compute_dtype(x32, x32) == torch.float32
    assert fkd_dual.compute_dtype(x32, x64) == torch.float64  # float64 inputs: float64 always


def test_float64_inputs_ignore_the_fp32_override(monkeypatch):
    monkeypatch.setattr(fkd_dual, "COMPUTE_DTYPE", torch.float32)
    gen = torch.Generator().manual_seed(13)
    s = torch.randn(40, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    t = s.detach() + 1e-6 * torch.randn(40, 5, dtype=torch.float64, generator=gen)
    loss = fastkd.fkd_loss(s, t, backend="cpu", algorithm="dual")
    torch.testing.assert_close(loss, reference.fkd_loss(s, t), rtol=1e-9, atol=0.0)


def _props(major, minor, name, arch=""):
    return SimpleNamespace(major=major, minor=minor, name=name, gcnArchName=arch)


@pytest.mark.parametrize(
    "props,dtype",
    [
        (_props(8, 9, "NVIDIA L4"), torch.float32),
        (_props(8, 9, "NVIDIA GeForce RTX 4090"), torch.float32),
        (_props(8, 9, "NVIDIA L40S"), torch.float32),
        (_props(8, 6, "NVIDIA A10"), torch.float32),
        (_props(7, 5, "Tesla T4"), torch.float32),
        (_props(12, 0, "NVIDIA GeForce RTX 5090"), torch.float32),
        (_props(8, 0, "NVIDIA A100-SXM4-80GB"), torch.float64),
        (_props(9, 0, "NVIDIA H100 80GB HBM3"), torch.float64),
        (_props(9, 0, "NVIDIA H200"), torch.float64),
        (_props(9, 0, "NVIDIA H20"), torch.float32),  # fp64 cut to ~1 TFLOP/s
        (_props(7, 0, "Tesla V100-SXM2-16GB"), torch.float64),
        (_props(6, 0, "Tesla P100-PCIE-16GB"), torch.float64),
        (_props(6, 1, "Tesla P40"), torch.float32),
        (_props(9, 4, "AMD Instinct MI300X", "gfx942:sramecc+:xnack-"), torch.float64),
        (_props(11, 0, "AMD Radeon RX 7900 XTX", "gfx1100"), torch.float32),
    ],
)
def test_dual_compute_dtype_from_device_properties(props, dtype):
    assert fkd_dual.dual_compute_dtype("cuda:0", props) == dtype
    assert fkd_dual.dual_compute_dtype(torch.device("cuda", 1), props) == dtype


def test_dual_compute_dtype_off_cuda():
    assert fkd_dual.dual_compute_dtype("cpu") == torch.float64
    assert fkd_dual.dual_compute_dtype(torch.device("cpu")) == torch.float64
    assert fkd_dual.dual_compute_dtype("mps") == torch.float32  # MPS has no float64


def test_ieee_context_sets_and_restores_the_cublas_precision():
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    with fkd_dual.ieee_fp32_matmul(torch.device("cpu")):
        assert matmul.fp32_precision == before  # nothing to do off CUDA
    # The flag is plain state: it can be set without a GPU.
    with fkd_dual.ieee_fp32_matmul(torch.device("cuda", 0)):
        assert matmul.fp32_precision == "ieee"
    assert matmul.fp32_precision == before
    with pytest.raises(RuntimeError, match="inside"):
        with fkd_dual.ieee_fp32_matmul(torch.device("cuda", 0)):
            raise RuntimeError("inside")
    assert matmul.fp32_precision == before


def test_compiled_fp32_dual_matches_eager(monkeypatch):
    monkeypatch.setattr(fkd_dual, "COMPUTE_DTYPE", torch.float32)
    student, teachers = make_case("rotated", 40, 6, 1e-3, seed=14)
    s = student.clone().requires_grad_()

    def step(x, ts):
        return fastkd.fkd_loss(x, ts, 1.0, 0.1, backend="cpu", algorithm="dual")

    eager = step(s, teachers)
    (eager_grad,) = torch.autograd.grad(eager, s)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(s, teachers)
    (compiled_grad,) = torch.autograd.grad(compiled, s)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(compiled_grad, eager_grad)


def accuracy_table(b=2048, d=64, seed=0):
    """Markdown rows: worst relative error (value, gradients) vs float64 per kind and level."""
    modes = ("three64", "three32", "float64", "float64-aligned", "float32-unaligned", "float32")
    rows = ["| case | level | " + " | ".join(modes) + " |", "|---|---|" + "---|" * len(modes)]
    for kind in KINDS:
        for level in LEVELS:
            student, teachers = make_case(kind, b, d, level, seed)
            want = fkd_reference(student, teachers)
            cells = []
            for mode in modes:
                value, grad = errors(dual(student, teachers, mode=mode), want)
                cells.append(f"{value:.0e} / {grad:.0e}")
            rows.append(f"| {kind} | {level:.0e} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(accuracy_table())
