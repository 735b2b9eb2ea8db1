"""The CUDA RKD kernels (csrc/cuda/rkd.cu) on the CPU emulator, against the float64 reference.

``run(exe, case)`` runs what fastkd::rkd_forward, rkd_backward and rkd_forward_backward run (as
rkd_binding.cpp calls them, the inputs converted to the operand dtype first); ``verdicts(case,
outputs)`` compares the loss and both gradients with ``fastkd.reference.rkd_distance_loss`` +
autograd in float64. tests/emulator/test_rkd_emulator.py runs every case as a pytest case; from
the command line::

    python -m tools.cuda_emulator.rkd                # AddressSanitizer + UBSan, all cases
    python -m tools.cuda_emulator.rkd --sanitize thread --quick
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from fastkd import reference, testing
from tools.cuda_emulator import build as emu
from tools.cuda_emulator.cli import Check, main_for

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64


@dataclass(frozen=True)
class Case:
    """One emulator run. splits: ranges of sweep 3 forced (else rkd_splits' for sms
    multiprocessors); dup: duplicate and zero rows (distances on the clamp); same: teacher =
    student (x = 0: zero gradients); nan: one NaN input;
    tol: a looser tolerance where float32 itself loses digits (documented per case)."""

    batch: int
    student_width: int
    teacher_width: int
    student_dtype: torch.dtype
    teacher_dtype: torch.dtype
    teacher_grad: bool = True
    grad: float = 1.0
    splits: int = 0
    sms: int = 132
    dup: bool = False
    same: bool = False
    nan: bool = False
    tol: float = 0.0
    quick: bool = False
    expect_splits: int | None = None  # the split count the launchers must choose

    @property
    def operand(self) -> torch.dtype:
        """float64 when any input is float64, else float32 (rkd_binding.cpp)."""
        return F64 if F64 in (self.student_dtype, self.teacher_dtype) else F32

    @property
    def id(self) -> str:
        dtypes = [str(d).removeprefix("torch.") for d in (self.student_dtype, self.teacher_dtype)]
        flags = [f"g{self.grad:g}"] if self.grad != 1.0 else []
        flags += ["tg"] * self.teacher_grad + ["dup"] * self.dup + ["same"] * self.same
        flags += ["nan"] * self.nan
        flags += [f"splits{self.splits}"] if self.splits else []
        flags += [f"sms{self.sms}"] if self.sms != 132 else []
        shape = [f"B{self.batch}", f"Ds{self.student_width}", f"Dt{self.teacher_width}"]
        return "-".join([*shape, "/".join(dtypes), *flags])


# 64-row tiles: B = 17 one partial tile, 130 three (the last 2 rows), 300 five. B = 2 and `same`
# (x = 0: exactly zero gradients) and the dup cases test the verdict on zero results.
CASES = [
    Case(2, 7, 1, F64, F64, grad=-0.7, quick=True),
    # Width 1, two rows 0.025 apart: q = a^2 + b^2 - 2ab cancels in float32 (the CPU kernel errs
    # 1.1e-5 on this case too).
    Case(3, 1, 7, F32, F32, tol=3e-5, quick=True),
    Case(17, 33, 70, F64, F64, grad=2.5, quick=True),
    Case(17, 7, 33, F16, F16, quick=True),
    Case(130, 70, 7, F32, F32, splits=2, quick=True, expect_splits=2),
    Case(130, 33, 1, BF16, BF16, teacher_grad=False, quick=True),
    Case(130, 7, 33, F16, F64, quick=True),  # mixed: float64 operands
    Case(40, 8, 8, F64, F64, dup=True, quick=True),
    Case(300, 33, 7, F32, F32, expect_splits=5),  # rkd_splits: 5 ranges of one block
    Case(300, 70, 70, F64, F64, splits=2, grad=0.3),  # ranges of 3 and 2
    Case(17, 7, 7, F32, F32, nan=True, quick=True),
    Case(65, 7, 33, F32, BF16, quick=True),  # mixed: float32 operands, bfloat16 teacher gradient
    Case(2, 1, 1, F32, F32, quick=True),  # B = 2, width 1: x = 0, zero gradients
    Case(130, 64, 300, F32, F32, teacher_grad=False, sms=4),
    Case(40, 8, 8, F32, F32, dup=True),
    Case(17, 7, 7, F32, F32, same=True),
]


def make_inputs(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed random inputs of the case, in its dtypes."""
    b, ds, dt = case.batch, case.student_width, case.teacher_width
    gen = torch.Generator().manual_seed(b * 7919 + ds * 31 + dt)
    s = torch.randn(b, ds, generator=gen, dtype=F64)
    t = torch.randn(b, dt, generator=gen, dtype=F64)
    if case.dup:  # q = 0 < 1e-12: d = 1e-6 and no gradient through the clamp
        s[5], t[5] = s[9], t[9]
        s[11] = 0.0
        t[20] = 0.0
        s[b - 1], t[b - 1] = s[0], t[0]  # across tiles of the row sums
    if case.same:
        t = s.clone()
    if case.nan:
        s[b // 2, ds // 2] = float("nan")
    return s.to(case.student_dtype), t.to(case.teacher_dtype)


@dataclass
class Outputs:
    """loss (forward), loss_fb and the gradients of backward (scaled by case.grad, "bwd") and
    forward_backward ("fb"): {"bwd": (student, teacher or None), "fb": (...)}."""

    loss: torch.Tensor
    loss_fb: torch.Tensor
    grads: dict[str, tuple[torch.Tensor, torch.Tensor | None]]
    splits: int
    launches: int


def run(exe: Path, case: Case) -> Outputs:
    student, teacher = make_inputs(case)
    op = case.operand
    b, ds, dt = case.batch, case.student_width, case.teacher_width
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        emu.write(d / "student.bin", student.to(op))  # as rkd_binding.cpp converts them
        emu.write(d / "teacher.bin", teacher.to(op))
        emu.write(d / "grad.bin", torch.tensor([case.grad], dtype=op))
        args = [tmp, emu.CODES[op], emu.CODES[case.student_dtype], emu.CODES[case.teacher_dtype]]
        args += [b, ds, dt, int(case.teacher_grad), case.splits, case.sms]
        result = emu.run_driver(exe, args)
        grads = {}
        for name, suffix in (("bwd", ""), ("fb", "_fb")):
            gs = emu.read(d / f"grad_student{suffix}.bin", case.student_dtype, (b, ds))
            gt = None
            if case.teacher_grad:
                gt = emu.read(d / f"grad_teacher{suffix}.bin", case.teacher_dtype, (b, dt))
            grads[name] = (gs, gt)
        return Outputs(
            loss=emu.read(d / "loss.bin", op, ()),
            loss_fb=emu.read(d / "loss_fb.bin", op, ()),
            grads=grads,
            splits=result.splits,
            launches=result.launches,
        )


def expected(case: Case):
    """Loss and gradients (grad = 1; the teacher's None unless teacher_grad), float64:
    ``fastkd.testing.reference64`` of ``fastkd.reference.rkd_distance_loss``."""
    loss, (gs, gt) = testing.reference64(
        reference.rkd_distance_loss, make_inputs(case), [True, case.teacher_grad]
    )
    return loss, gs, gt


def verdicts(case: Case, out: Outputs, ref=None) -> list[Check]:
    """Every comparison of ``out`` with the reference (``expected(case)`` unless given), judged
    by ``fastkd.testing.error_ratio`` on the terms of ``fastkd.testing.rkd_terms`` in the operand
    dtype, with ``TOL[("rkd", dtype)]`` of each side's dtype (or the case's looser ``tol``)."""
    student, teacher = make_inputs(case)
    ref_loss, ref_gs, ref_gt = expected(case) if ref is None else ref
    if case.nan:  # NaN everywhere, as on the CPU and in the reference
        results = [out.loss, out.loss_fb] + [g for pair in out.grads.values() for g in pair]
        nan = all(bool(x.isnan().all()) for x in results if x is not None)
        return [Check("all_nan", 0.0 if nan else 1.0, 0.0)]
    tols = {d: testing.tolerance(d, "rkd") for d in (case.student_dtype, case.teacher_dtype)}
    loss_tol = max(min(t.value for t in tols.values()), case.tol)
    value_terms = testing.rkd_terms(student, teacher, 1.0, case.operand)[0]
    checks = [
        Check(name, testing.error_ratio(loss, ref_loss, case.operand, loss_tol, value_terms), 1.0)
        for name, loss in (("loss", out.loss), ("loss_fb", out.loss_fb))
    ]
    for name, factor in (("bwd", case.grad), ("fb", 1.0)):
        terms = testing.rkd_terms(student, teacher, factor, case.operand)[1]
        gs, gt = out.grads[name]
        sides = [("student", gs, ref_gs, terms[0], case.student_dtype)]
        if case.teacher_grad:
            sides.append(("teacher", gt, ref_gt, terms[1], case.teacher_dtype))
        for label, got, want, t, dtype in sides:
            tol = max(tols[dtype].grad, case.tol)
            ratio = testing.error_ratio(got, factor * want, case.operand, tol, t)
            checks.append(Check(f"grad_{label}_{name}", ratio, 1.0))
    if case.expect_splits is not None:
        checks.append(Check("splits", float(out.splits != case.expect_splits), 0.0))
    return checks


def main(argv=None) -> int:
    return main_for(__doc__.splitlines()[0], "rkd", CASES, run, verdicts, argv)


if __name__ == "__main__":
    raise SystemExit(main())
