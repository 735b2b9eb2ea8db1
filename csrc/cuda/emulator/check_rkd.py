"""Check the CUDA RKD kernels without a GPU: run csrc/cuda/rkd.cu on the CPU model in mock/.

Builds ``rkd_emulator.cpp`` (which includes ``../rkd.cu`` unchanged) with g++ and a sanitizer,
runs what fastkd::rkd_forward, rkd_backward and rkd_forward_backward run (as rkd_binding.cpp
calls them, inputs converted to the operand dtype first) on each case, and compares the loss and
both gradients with ``fastkd.reference.rkd_distance_loss`` + autograd in float64, with the
tolerances of tests/test_rkd.py.

    python csrc/cuda/emulator/check_rkd.py                # AddressSanitizer + UBSan, all cases
    python csrc/cuda/emulator/check_rkd.py --sanitize thread --quick
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT))

from check import CODES, _read, _write, cli, compile_emulator  # noqa: E402

from fastkd import reference  # noqa: E402

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
# As tests/test_rkd.py: loss and gradients (relative to the largest reference gradient); half
# gradients are also rounded to their dtype. The loss of half inputs is float32 arithmetic on
# the same half values.
LOSS_TOL = {F64: 1e-10, F32: 1e-5, F16: 1e-5, BF16: 1e-5}
GRAD_TOL = {F64: 1e-10, F32: 1e-5, F16: 1e-2, BF16: 1e-2}

# (B, Ds, Dt, student dtype, teacher dtype, options). tg: teacher gradient; grad: upstream
# gradient of the backward op; splits: ranges of sweep 3 (else make_plan's for sms
# multiprocessors); dup: duplicate and zero rows (distances on the clamp); nan: one NaN input.
# 64-row tiles: B = 17 one partial tile, 130 three (the last 2 rows), 300 five.
CASES = [
    (2, 7, 1, F64, F64, {"tg": True, "grad": -0.7}),
    # Width 1, two rows 0.025 apart: q = a^2 + b^2 - 2ab cancels in float32 (the CPU kernel errs
    # 1.1e-5 on this case too).
    (3, 1, 7, F32, F32, {"tg": True, "tol": 3e-5}),
    (17, 33, 70, F64, F64, {"tg": True, "grad": 2.5}),
    (17, 7, 33, F16, F16, {"tg": True}),
    (130, 70, 7, F32, F32, {"tg": True, "splits": 2}),
    (130, 33, 1, BF16, BF16, {"tg": False}),
    (130, 7, 33, F16, F64, {"tg": True}),  # mixed: float64 operands
    (40, 8, 8, F64, F64, {"tg": True, "dup": True}),
    (300, 33, 7, F32, F32, {"tg": True}),  # make_plan: 5 ranges of one block
    (300, 70, 70, F64, F64, {"tg": True, "splits": 2, "grad": 0.3}),  # ranges of 3 and 2
    (17, 7, 7, F32, F32, {"tg": True, "nan": True}),
    (65, 7, 33, F32, BF16, {"tg": True}),  # mixed: float32 operands, bfloat16 teacher gradient
    (2, 1, 1, F32, F32, {"tg": True}),  # B = 2, width 1: x = 0, zero gradients
    (130, 64, 300, F32, F32, {"tg": False, "sms": 4}),
    (40, 8, 8, F32, F32, {"tg": True, "dup": True}),
]
QUICK = [0, 1, 2, 3, 4, 5, 6, 7, 10, 11, 12]


def build(sanitize: str) -> Path:
    sources = [HERE / "rkd_emulator.cpp", HERE.parent / "rkd.cu", HERE.parent / "rkd_cuda.h"]
    sources += [ROOT / "csrc/include/fastkd/rkd_math.h", ROOT / "csrc/include/fastkd/common.h"]
    return compile_emulator("rkd_emulator", sources, sanitize, flags=("-Wno-sign-compare",))


def make_inputs(b, ds, dt, dtype_s, dtype_t, opts):
    gen = torch.Generator().manual_seed(b * 7919 + ds * 31 + dt)
    s = torch.randn(b, ds, generator=gen, dtype=F64)
    t = torch.randn(b, dt, generator=gen, dtype=F64)
    if opts.get("dup"):  # q = 0 < 1e-12: d = 1e-6 and no gradient through the clamp
        s[5], t[5] = s[9], t[9]
        s[11] = 0.0
        t[20] = 0.0
        s[b - 1], t[b - 1] = s[0], t[0]  # across tiles of the row sums
    if opts.get("nan"):
        s[b // 2, ds // 2] = float("nan")
    return s.to(dtype_s), t.to(dtype_t)


def reference64(student, teacher, tg):
    s = student.double().requires_grad_()
    t = teacher.double().requires_grad_(tg)
    loss = reference.rkd_distance_loss(s, t)
    grads = torch.autograd.grad(loss, [s, t] if tg else [s])
    return loss.detach(), [g.detach() for g in grads]


def rel(got: torch.Tensor, want: torch.Tensor, scale: float | None = None) -> float:
    if not torch.isfinite(got).all():
        return float("inf")
    scale = want.abs().max().item() if scale is None else scale
    return (got.double() - want).abs().max().item() / (scale or 1.0)


def run_case(exe, b, ds, dt, dtype_s, dtype_t, opts) -> bool:
    tg, grad = opts.get("tg", False), opts.get("grad", 1.0)
    student, teacher = make_inputs(b, ds, dt, dtype_s, dtype_t, opts)
    op = F64 if F64 in (dtype_s, dtype_t) else F32
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        _write(d / "student.bin", student.to(op))  # as rkd_binding.cpp converts them
        _write(d / "teacher.bin", teacher.to(op))
        _write(d / "grad.bin", torch.tensor([grad], dtype=op))
        cmd = [str(exe), tmp, str(int(op == F64)), str(CODES[dtype_s]), str(CODES[dtype_t])]
        cmd += [str(b), str(ds), str(dt), str(int(tg)), str(opts.get("splits", 0))]
        cmd += [str(opts.get("sms", 132))]
        env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0", TSAN_OPTIONS="halt_on_error=1")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            print(f"FAILED to run B={b} Ds={ds} Dt={dt} {dtype_s}/{dtype_t} {opts}:")
            print(proc.stderr[-4000:])
            return False
        loss = _read(d / "loss.bin", op, ())
        loss_fb = _read(d / "loss_fb.bin", op, ())
        runs = []
        for suffix, factor in (("", grad), ("_fb", 1.0)):
            gs = _read(d / f"grad_student{suffix}.bin", dtype_s, (b, ds))
            gt = _read(d / f"grad_teacher{suffix}.bin", dtype_t, (b, dt)) if tg else None
            runs.append((suffix or "bwd", factor, gs, gt))
    ref_loss, ref_grads = reference64(student, teacher, tg)
    errs: dict[str, tuple[float, float]] = {}
    if opts.get("nan"):  # NaN everywhere, as on the CPU and in the reference
        nan = all(bool(x.isnan().all()) for x in (loss, loss_fb, *[r[2] for r in runs]))
        nan &= all(bool(r[3].isnan().all()) for r in runs) if tg else True
        errs["nan"] = (0.0 if nan else 1.0, 0.0)
    else:
        loss_tol = min(LOSS_TOL[dtype_s], LOSS_TOL[dtype_t])
        errs["loss"] = (rel(loss, ref_loss), loss_tol)
        errs["loss_fb"] = (rel(loss_fb, ref_loss), loss_tol)
        for name, factor, gs, gt in runs:
            errs[f"gs_{name}"] = (rel(gs, factor * ref_grads[0]), GRAD_TOL[dtype_s])
            if tg:
                errs[f"gt_{name}"] = (rel(gt, factor * ref_grads[1]), GRAD_TOL[dtype_t])
    good = all(e <= max(t, opts.get("tol", 0.0)) for e, t in errs.values())
    print(
        f"{'ok ' if good else 'BAD'} B={b} Ds={ds} Dt={dt} {str(dtype_s)[6:]}/{str(dtype_t)[6:]} "
        f"{opts} "
        + " ".join(f"{k}={e:.1e}" for k, (e, _) in errs.items())
        + f" {proc.stdout.strip()}",
        flush=True,
    )
    return good


def main() -> int:
    return cli(__doc__.splitlines()[0], build, run_case, CASES, QUICK)


if __name__ == "__main__":
    sys.exit(main())
