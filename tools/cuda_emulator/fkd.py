"""The CUDA FKD kernels (csrc/cuda/fkd.cu) on the CPU emulator, against the float64 reference.

``run(exe, case)`` runs fkd_forward, fkd_backward (scaled by the case's upstream gradient) and
fkd_forward_backward as fkd_binding.cpp calls them; ``verdicts(case, outputs)`` compares the loss
and every gradient with ``fastkd.reference.fkd_loss`` + autograd in float64, judged by
``fastkd.testing`` (tolerances ``TOL[("fkd", dtype)]``). tests/emulator/test_fkd_emulator.py runs
every case as a pytest case; from the command line (a few minutes for all cases on two cores; one
OS thread per CUDA thread)::

    python -m tools.cuda_emulator.fkd                # AddressSanitizer + UBSan, all cases
    python -m tools.cuda_emulator.fkd --sanitize thread --quick
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastkd import reference, testing
from tools.cuda_emulator import build as emu
from tools.cuda_emulator.cli import Check, main_for

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
# float32 on TF32 tensor cores (FkdArgs::precision, SPEC §6), by the code of the driver's
# PRECISION argument. tf32x3 keeps the float32 tolerances of fastkd.testing (measured: loss
# <= 5e-8, gradients <= 7e-7). tf32 rounds every operand to 10 mantissa bits (2^-11 ~ 4.9e-4
# relative each; measured: loss <= 2.3e-5, gradients <= 1.6e-3), and its roundoff slack counts in
# that unit.
PRECISIONS = {"ieee": 0, "tf32": 1, "tf32x3": 2}
TF32_LOSS_TOL = {"tf32": 1e-4}
TF32_GRAD_TOL = {"tf32": 5e-3}
TF32_EPS = 2.0**-11  # unit roundoff of a TF32 operand (10 stored mantissa bits)


@dataclass(frozen=True)
class Case:
    """One emulator run. sms: the SM count the backward's split count is chosen for;
    zero_rows: all-zero student and teacher rows; same: the teacher is the student (rho_S =
    rho_T: the distillation gradients are zero); misalign: inputs off 16-byte alignment."""

    batch: int
    student_width: int
    teacher_widths: tuple[int, ...]
    dtype: torch.dtype
    teachers_grad: bool = False
    grad: float = 1.0
    kd: float = 0.8
    fr: float = 0.05
    sms: int = 132
    zero_rows: bool = False
    same: bool = False
    misalign: bool = False
    quick: bool = False
    expect_splits: int | None = None  # the split count the launchers must choose
    precision: str = "ieee"  # float32 operands: "ieee", "tf32" or "tf32x3"

    def __post_init__(self):
        if self.precision != "ieee" and self.dtype != F32:
            raise ValueError("precision applies to float32 cases only")

    @property
    def loss_tol(self) -> float:
        return TF32_LOSS_TOL.get(self.precision, testing.tolerance(self.dtype, "fkd").value)

    @property
    def grad_tol(self) -> float:
        return TF32_GRAD_TOL.get(self.precision, testing.tolerance(self.dtype, "fkd").grad)

    @property
    def id(self) -> str:
        widths = "+".join(map(str, self.teacher_widths))
        flags = [f"g{self.grad:g}"] if self.grad != 1.0 else []
        flags += ["tg"] * self.teachers_grad + ["zero"] * self.zero_rows + ["same"] * self.same
        flags += ["misalign"] * self.misalign + ([f"sms{self.sms}"] if self.sms != 132 else [])
        flags += [f"kd{self.kd:g}-fr{self.fr:g}"] if (self.kd, self.fr) != (0.8, 0.05) else []
        flags += [self.precision] if self.precision != "ieee" else []
        dtype = str(self.dtype).removeprefix("torch.")
        return "-".join([f"B{self.batch}", f"Ds{self.student_width}", f"Dt{widths}", dtype, *flags])


# Odd sizes around the 64-row tiles, widths that do and do not allow 16-byte loads, ensembles,
# several splits of the backward J loop (sms), zero rows. B = 1 (exactly zero teacher gradient),
# width-1 inputs (exactly zero gradient through normalize) and `same` test the verdict itself.
CASES = [
    Case(1, 5, (3,), F64, teachers_grad=True, quick=True),
    Case(2, 1, (7,), F32, teachers_grad=True, grad=0.37),
    Case(3, 7, (64,), F16),
    Case(17, 64, (300,), BF16, teachers_grad=True, grad=-1.5, quick=True),
    Case(19, 8, (5,), F64, teachers_grad=True, fr=0.5, zero_rows=True),
    Case(19, 8, (5,), F32, teachers_grad=True, fr=0.5, zero_rows=True),
    Case(65, 65, (63,), F64, teachers_grad=True, quick=True, expect_splits=2),
    Case(70, 64, (40,), F16, teachers_grad=True, misalign=True, quick=True),
    Case(70, 64, (40,), F32, teachers_grad=True, misalign=True),
    Case(130, 64, (40,), F16, teachers_grad=True, quick=True),
    Case(130, 7, (1, 64, 9), F16, teachers_grad=True),
    Case(130, 300, (7,), F16, sms=1),
    Case(100, 300, (64,), F32, teachers_grad=True),
    Case(257, 33, (8, 8, 30, 2), F32, teachers_grad=True, sms=4, quick=True, expect_splits=2),
    Case(300, 10, (6, 19), F64, teachers_grad=True, kd=0.9, fr=0.1),
    Case(513, 17, (9,), BF16, teachers_grad=True),
    Case(513, 16, (9,), F64, teachers_grad=True, expect_splits=8),
    Case(600, 24, (40,), F32, teachers_grad=True),
    Case(33, 16, (16,), F32, teachers_grad=True, same=True),
    # float32 on TF32 tensor cores: one product and the split product, odd shapes, ensembles,
    # teacher gradients, unaligned inputs, several splits, zero rows, identical inputs.
    Case(3, 7, (64,), F32, teachers_grad=True, precision="tf32", quick=True),
    Case(3, 7, (64,), F32, teachers_grad=True, precision="tf32x3", quick=True),
    Case(70, 64, (40,), F32, teachers_grad=True, misalign=True, precision="tf32x3", quick=True),
    Case(130, 33, (1, 64, 9), F32, teachers_grad=True, grad=-1.5, precision="tf32"),
    Case(130, 33, (1, 64, 9), F32, teachers_grad=True, grad=-1.5, precision="tf32x3"),
    Case(100, 300, (64,), F32, teachers_grad=True, precision="tf32"),
    Case(100, 300, (64,), F32, teachers_grad=True, precision="tf32x3"),
    Case(257, 33, (8, 30), F32, teachers_grad=True, sms=4, precision="tf32x3", expect_splits=2),
    Case(19, 8, (5,), F32, teachers_grad=True, fr=0.5, zero_rows=True, precision="tf32x3"),
    Case(33, 16, (16,), F32, teachers_grad=True, same=True, precision="tf32x3"),
    Case(33, 16, (16,), F32, teachers_grad=True, same=True, precision="tf32"),
]


def make_inputs(case: Case) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Fixed random inputs of the case (a seed from its shape), in its dtype."""
    gen = torch.Generator().manual_seed(case.batch * 7919 + case.student_width)
    widths = [case.student_width, *case.teacher_widths]
    student, *teachers = [
        torch.randn(case.batch, w, generator=gen, dtype=F64).to(case.dtype) for w in widths
    ]
    if case.zero_rows:
        student[[0, case.batch // 2]] = 0
        teachers[0][[case.batch // 2, case.batch - 1]] = 0
    if case.same:
        teachers = [student.clone()]
    return student, teachers


@dataclass
class Outputs:
    """The three ops' results: loss (forward), grads (backward, scaled by case.grad), and
    loss_fb, grads_fb (forward_backward); grads list the student, then each teacher."""

    loss: torch.Tensor
    grads: list[torch.Tensor]
    loss_fb: torch.Tensor
    grads_fb: list[torch.Tensor]
    splits: int
    launches: int = field(default=0)


def run(exe: Path, case: Case) -> Outputs:
    student, teachers = make_inputs(case)
    acc = emu.acc_dtype(case.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        emu.write(d / "student.bin", student)
        for e, t in enumerate(teachers):
            emu.write(d / f"teacher{e}.bin", t)
        emu.write(d / "grad.bin", torch.tensor([case.grad], dtype=acc))
        args = [tmp, emu.CODES[case.dtype], case.batch, case.student_width, len(teachers)]
        args += [*case.teacher_widths, int(case.teachers_grad), repr(case.kd), repr(case.fr)]
        args += [case.sms, PRECISIONS[case.precision]]
        result = emu.run_driver(exe, args, misalign=case.misalign)

        def grads(suffix):
            out = [emu.read(d / f"grad_student{suffix}.bin", case.dtype, student.shape)]
            if case.teachers_grad:
                out += [
                    emu.read(d / f"grad_teacher{e}{suffix}.bin", case.dtype, t.shape)
                    for e, t in enumerate(teachers)
                ]
            return out

        return Outputs(
            loss=emu.read(d / "loss.bin", acc, ()),
            grads=grads(""),
            loss_fb=emu.read(d / "loss_fb.bin", acc, ()),
            grads_fb=grads("_fb"),
            splits=result.splits,
            launches=result.launches,
        )


def expected(case: Case) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Loss and gradients (grad = 1; the teachers' only if teachers_grad) of the case's inputs:
    ``fastkd.testing.reference64`` of ``fastkd.reference.fkd_loss``."""
    student, teachers = make_inputs(case)
    flags = [True] + [case.teachers_grad] * len(teachers)
    loss, grads = testing.reference64(
        lambda s, *ts: reference.fkd_loss(s, list(ts), case.kd, case.fr),
        [student, *teachers],
        flags,
    )
    return loss, [g for g in grads if g is not None]


def verdicts(case: Case, out: Outputs, ref=None) -> list[Check]:
    """Every comparison of ``out`` with the reference (``expected(case)`` unless given), judged
    by ``fastkd.testing.error_ratio`` on the terms of ``fastkd.testing.fkd_terms``."""
    student, teachers = make_inputs(case)
    ref_loss, ref_grads = expected(case) if ref is None else ref
    value_terms = testing.fkd_terms(student, teachers, case.kd, case.fr)[0]
    # tf32: operands rounded to TF32, so roundoff slack counts in TF32 units, not float32 ones
    unit = TF32_EPS / testing.accumulation_eps(case.dtype) if case.precision == "tf32" else 1.0
    checks = [
        Check(
            name,
            testing.error_ratio(loss, ref_loss, case.dtype, case.loss_tol, value_terms * unit),
            1.0,
        )
        for name, loss in (("loss", out.loss), ("loss_fb", out.loss_fb))
    ]
    labels = ["student"] + [f"teacher{e}" for e in range(len(teachers))]
    for name, grads, factor in (("bwd", out.grads, case.grad), ("fb", out.grads_fb, 1.0)):
        terms = testing.fkd_terms(student, teachers, case.kd, case.fr, factor)[1]
        for label, got, want, t in zip(labels, grads, ref_grads, terms, strict=False):
            ratio = testing.error_ratio(got, factor * want, case.dtype, case.grad_tol, t * unit)
            checks.append(Check(f"grad_{label}_{name}", ratio, 1.0))
    if case.expect_splits is not None:
        checks.append(Check("splits", float(out.splits != case.expect_splits), 0.0))
    return checks


def main(argv=None) -> int:
    return main_for(__doc__.splitlines()[0], "fkd", CASES, run, verdicts, argv)


if __name__ == "__main__":
    raise SystemExit(main())
