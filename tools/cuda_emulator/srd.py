"""The CUDA SRD kernels (csrc/cuda/srd.cu) on the CPU emulator, against the float64 reference.

``run(exe, case)`` runs srd_forward and srd_backward as srd_binding.cpp calls them (eval mode:
with the statistics it builds from the running buffers); ``verdicts(case, outputs)`` compares
the loss, the batch statistics and both gradients with ``fastkd.reference.srd_loss`` + autograd
in float64. tests/emulator/test_srd_emulator.py runs every case as a pytest case; from the
command line::

    python -m tools.cuda_emulator.srd                # AddressSanitizer + UBSan, all cases
    python -m tools.cuda_emulator.srd --sanitize thread --quick
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
EPS = 1e-4


@dataclass(frozen=True)
class Case:
    """One emulator run. training: batch statistics (else the running ones); same: teacher =
    student (log(tiny) and exactly zero gradients); offset: features around a large offset;
    splits: row splits forced (else srd_splits' for sms multiprocessors); misalign: features and
    gradients one element off 16-byte alignment (element loads); vector: whether the backward
    must take the 16-byte path (D a multiple of 16 bytes of the dtype, aligned buffers)."""

    batch: int
    width: int
    dtype: torch.dtype
    p: float
    training: bool
    teacher_grad: bool = True
    grad: float = 1.0
    offset: float = 0.0
    same: bool = False
    splits: int = 0
    sms: int = 132
    quick: bool = False
    expect_splits: int | None = None  # the split count the launchers must choose
    misalign: bool = False

    @property
    def vector(self) -> bool:
        per_16_bytes = 16 // torch.empty((), dtype=self.dtype).element_size()
        return not self.misalign and self.width % per_16_bytes == 0

    @property
    def id(self) -> str:
        flags = ["train" if self.training else "eval", f"p{self.p:g}"]
        flags += [f"g{self.grad:g}"] if self.grad != 1.0 else []
        flags += ["tg"] * self.teacher_grad + ["same"] * self.same
        flags += [f"offset{self.offset:g}"] if self.offset else []
        flags += [f"splits{self.splits}"] if self.splits else []
        flags += [f"sms{self.sms}"] if self.sms != 132 else []
        flags += ["misalign"] if self.misalign else []
        dtype = str(self.dtype).removeprefix("torch.")
        return "-".join([f"B{self.batch}", f"D{self.width}", dtype, *flags])


# B = 2 is the ill-conditioned batch (every column normalises to +-1: judged on the gradient's
# terms, fastkd.testing.srd_terms); B = 3, D = 1 and `same` test the verdict on (near-)zero results.
CASES = [
    Case(2, 7, F64, 4.0, True, quick=True),
    Case(3, 1, F32, 4.5, True, grad=-0.7, quick=True),
    Case(17, 64, F64, 4.5, False, quick=True),
    Case(17, 7, F32, 4.0, True, teacher_grad=False, splits=4, quick=True),  # last split 2 rows
    Case(130, 64, F32, 4.0, True, offset=3.0, quick=True, expect_splits=2),
    Case(130, 1, F64, 4.0, False, splits=3, quick=True),
    Case(17, 7, F32, 4.0, True, same=True, quick=True),
    Case(33, 20, F16, 4.0, True, quick=True),
    Case(33, 20, BF16, 4.5, False, quick=True),
    Case(130, 7, F64, 1.0, True, splits=10, quick=True),
    Case(2, 64, F32, 4.5, True, quick=True),
    Case(3, 64, F64, 6.0, False, teacher_grad=False, quick=True),
    Case(300, 33, F32, 3.0, True, expect_splits=4),
    Case(600, 70, F64, 2.0, True, offset=3.0, sms=4),
    Case(130, 64, F64, 4.5, False, same=True, quick=True),
    # 16-byte loads: widths that are and are not a multiple of 16 bytes, several column blocks
    # (16-bit: 256 columns per block), rows not a multiple of the unroll, and misaligned buffers.
    Case(77, 264, F16, 4.0, True, quick=True),
    Case(77, 520, BF16, 4.5, True, splits=3),
    Case(45, 132, F32, 4.0, False, quick=True),
    Case(45, 132, F32, 4.0, True, misalign=True, quick=True),
    Case(45, 264, F16, 3.0, True, misalign=True),
    Case(70, 34, F64, 4.0, True, misalign=True, quick=True),
    Case(70, 34, F64, 4.0, True, grad=0.5, splits=2, quick=True),
]


def make_inputs(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed random features of the case (student around `offset`, teacher around -1)."""
    gen = torch.Generator().manual_seed(case.batch * 7919 + case.width)
    student = torch.randn(case.batch, case.width, generator=gen, dtype=F64) * 2.0 + case.offset
    teacher = torch.randn(case.batch, case.width, generator=gen, dtype=F64) * 0.5 - 1.0
    student, teacher = student.to(case.dtype), teacher.to(case.dtype)
    return student, (student.clone() if case.same else teacher)


def make_buffers(case: Case) -> list[torch.Tensor]:
    """Running (mean_s, var_s, mean_t, var_t) in float32, as nn.BatchNorm1d keeps them."""
    gen = torch.Generator().manual_seed(1)
    mean_s, mean_t = torch.randn(2, case.width, generator=gen)
    var_s, var_t = torch.rand(2, case.width, generator=gen) * 2.0 + 0.25
    return [mean_s, var_s, mean_s, var_s] if case.same else [mean_s, var_s, mean_t, var_t]


@dataclass
class Outputs:
    loss: torch.Tensor
    stats: list[torch.Tensor] | None  # training: (4, D) statistics of student, teacher
    grad_student: torch.Tensor
    grad_teacher: torch.Tensor | None
    splits: int
    launches: int
    vector: bool  # the backward took the 16-byte path


def run(exe: Path, case: Case) -> Outputs:
    student, teacher = make_inputs(case)
    buffers = make_buffers(case)
    acc, d = emu.acc_dtype(case.dtype), case.width
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        emu.write(t / "student.bin", student)
        emu.write(t / "teacher.bin", teacher)
        emu.write(t / "grad.bin", torch.tensor([case.grad], dtype=acc))
        if not case.training:  # as srd::stats_from_running builds them
            for name, z, mean, var in (("s", student, *buffers[:2]), ("t", teacher, *buffers[2:])):
                m, v = mean.to(acc), var.to(acc)
                emu.write(
                    t / f"stats_{name}.bin",
                    torch.stack([m, v, m - z[0].to(acc), (v + EPS).rsqrt()]),
                )
        args = [tmp, emu.CODES[case.dtype], case.batch, d, repr(case.p), repr(EPS)]
        args += [int(case.training), int(case.teacher_grad), case.splits, case.sms]
        result = emu.run_driver(exe, args, misalign=case.misalign)
        return Outputs(
            loss=emu.read(t / "loss.bin", acc, ()),
            stats=[emu.read(t / f"stats_{n}.bin", acc, (4, d)) for n in "st"]
            if case.training
            else None,
            grad_student=emu.read(t / "grad_student.bin", case.dtype, (case.batch, d)),
            grad_teacher=emu.read(t / "grad_teacher.bin", case.dtype, (case.batch, d))
            if case.teacher_grad
            else None,
            splits=result.splits,
            launches=result.launches,
            vector="vector=1" in result.stdout,
        )


def expected(case: Case):
    """Loss and gradients (grad = 1; the teacher's None unless teacher_grad), float64:
    ``fastkd.testing.reference64`` of ``fastkd.reference.srd_loss`` on the case's inputs and
    buffers."""
    bufs = [b.clone() for b in make_buffers(case)]
    loss, (gs, gt) = testing.reference64(
        lambda s, t: reference.srd_loss(s, t, case.p, EPS, case.training, *bufs),
        make_inputs(case),
        [True, case.teacher_grad],
    )
    return loss, gs, gt


def verdicts(case: Case, out: Outputs, ref=None) -> list[Check]:
    """Every comparison of ``out`` with the reference (``expected(case)`` unless given), judged
    by ``fastkd.testing.error_ratio`` on the terms of ``fastkd.testing.srd_terms`` with
    ``TOL[("srd", dtype)]``; the batch statistics on the terms they are summed from."""
    student, teacher = make_inputs(case)
    ref_loss, ref_gs, ref_gt = expected(case) if ref is None else ref
    tol = testing.tolerance(case.dtype, "srd")
    running = None if case.training else make_buffers(case)
    args = (student, teacher, case.p, EPS, case.training, running)
    value_terms = testing.srd_terms(*args)[0]
    ratio = testing.error_ratio(out.loss, ref_loss, case.dtype, tol.value, value_terms)
    checks = [Check("loss", ratio, 1.0)]
    terms = testing.srd_terms(*args, grad_out=case.grad)[1]
    sides = [("grad_student", out.grad_student, ref_gs, terms[0])]
    if case.teacher_grad:
        sides.append(("grad_teacher", out.grad_teacher, ref_gt, terms[1]))
    for name, got, want, t in sides:
        ratio = testing.error_ratio(got, case.grad * want, case.dtype, tol.grad, t)
        checks.append(Check(name, ratio, 1.0))
    if case.training:
        for name, z, st in (("s", student, out.stats[0]), ("t", teacher, out.stats[1])):
            z = z.double()
            mean, var = reference.batch_norm_statistics(z)
            # the terms each statistic is summed from: |z| for the mean, (z - mean)^2 for var
            mean_terms, var_terms = z.abs().mean(0), var
            for what, got, want, t in (
                ("mean", st[0], mean, mean_terms),
                ("var", st[1], var, var_terms),
            ):
                ratio = testing.error_ratio(got, want, case.dtype, tol.value, t)
                checks.append(Check(f"{what}_{name}", ratio, 1.0))
    if case.same:  # log(tiny) and exactly zero gradients
        log_tiny = torch.tensor(reference.SRD_TINY, dtype=out.loss.dtype).log()
        exact = out.loss.item() == log_tiny.item() and bool((out.grad_student == 0).all())
        exact &= out.grad_teacher is None or bool((out.grad_teacher == 0).all())
        checks.append(Check("same_exact", 0.0 if exact else 1.0, 0.0))
    checks.append(Check("vector_path", float(out.vector != case.vector), 0.0))
    if case.expect_splits is not None:
        checks.append(Check("splits", float(out.splits != case.expect_splits), 0.0))
    return checks


def main(argv=None) -> int:
    return main_for(__doc__.splitlines()[0], "srd", CASES, run, verdicts, argv)


if __name__ == "__main__":
    raise SystemExit(main())
