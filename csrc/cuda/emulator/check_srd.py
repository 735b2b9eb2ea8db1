"""Check the CUDA SRD kernels without a GPU: run csrc/cuda/srd.cu on the CPU model in mock/.

Builds ``srd_emulator.cpp`` (which includes ``../srd.cu`` unchanged) with g++ and a sanitizer,
runs forward_stats (training), forward_sums and backward on each case as srd_binding.cpp calls
them, and compares the loss, the batch statistics and the gradients with
``fastkd.reference.srd_loss`` + autograd in float64, with the tolerances of tests/test_srd.py.

    python csrc/cuda/emulator/check_srd.py                # AddressSanitizer + UBSan, all cases
    python csrc/cuda/emulator/check_srd.py --sanitize thread --quick
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
sys.path.insert(0, str(ROOT / "tests"))

from check import CODES, _read, _write, cli, compile_emulator  # noqa: E402
from srd_helpers import (  # noqa: E402
    TOL,
    make_buffers,
    make_inputs,
    rel_err,
    run,
    train_grad_scales,
)

from fastkd import reference  # noqa: E402

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
EPS = 1e-4

# (B, D, dtype, options). rows: rows per split (else make_plan's for sms multiprocessors);
# train: batch statistics (else the running ones); tg: teacher gradient; same: teacher = student.
# B = 2 is the ill-conditioned batch (every column normalises to +-1, see tests/srd_helpers.py).
CASES = [
    (2, 7, F64, {"p": 4.0, "train": True, "tg": True}),
    (3, 1, F32, {"p": 4.5, "train": True, "tg": True, "grad": -0.7}),
    (17, 64, F64, {"p": 4.5, "train": False, "tg": True}),
    (17, 7, F32, {"p": 4.0, "train": True, "tg": False, "rows": 5}),  # 4 splits, last 2 rows
    (130, 64, F32, {"p": 4.0, "train": True, "tg": True, "offset": 3.0}),  # make_plan: 2 splits
    (130, 1, F64, {"p": 4.0, "train": False, "tg": True, "rows": 64}),  # 3 splits
    (17, 7, F32, {"p": 4.0, "train": True, "tg": True, "same": True}),
    (33, 20, F16, {"p": 4.0, "train": True, "tg": True}),
    (33, 20, BF16, {"p": 4.5, "train": False, "tg": True}),
    (130, 7, F64, {"p": 1.0, "train": True, "tg": True, "rows": 13}),  # 10 splits
    (2, 64, F32, {"p": 4.5, "train": True, "tg": True}),
    (3, 64, F64, {"p": 6.0, "train": False, "tg": False}),
    (300, 33, F32, {"p": 3.0, "train": True, "tg": True}),  # make_plan: 4 splits
    (600, 70, F64, {"p": 2.0, "train": True, "tg": True, "offset": 3.0, "sms": 4}),
    (130, 64, F64, {"p": 4.5, "train": False, "tg": True, "same": True}),
]
QUICK = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 14]


def build(sanitize: str) -> Path:
    sources = [HERE / "srd_emulator.cpp", HERE.parent / "srd.cu", HERE.parent / "srd_cuda.h"]
    sources += [ROOT / "csrc/include/fastkd/srd_math.h", ROOT / "csrc/include/fastkd/common.h"]
    # srd.cu compares threadIdx.x (unsigned) with int strides: harmless, nvcc does not warn.
    return compile_emulator("srd_emulator", sources, sanitize, flags=("-Wno-sign-compare",))


def run_case(exe, b, d, dtype, opts) -> bool:
    p, training, tg = opts["p"], opts["train"], opts["tg"]
    grad = opts.get("grad", 1.0)
    student, teacher = make_inputs(b, d, dtype, seed=b * 7919 + d, offset=opts.get("offset", 0.0))
    buffers = make_buffers(d)
    if opts.get("same"):
        teacher = student.clone()
        buffers[2:] = buffers[:2]
    acc = F64 if dtype == F64 else F32
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        _write(t / "student.bin", student)
        _write(t / "teacher.bin", teacher)
        _write(t / "grad.bin", torch.tensor([grad], dtype=acc))
        if not training:  # as srd::stats_from_running builds them, in the accumulation dtype
            for name, z, mean, var in (("s", student, *buffers[:2]), ("t", teacher, *buffers[2:])):
                m, v = mean.to(acc), var.to(acc)
                stats = torch.stack([m, v, m - z[0].to(acc), (v + EPS).rsqrt()])
                _write(t / f"stats_{name}.bin", stats)
        cmd = [str(exe), tmp, str(CODES[dtype]), str(b), str(d), repr(p), repr(EPS)]
        cmd += [str(int(training)), str(int(tg)), str(opts.get("rows", 0))]
        cmd += [str(opts.get("sms", 132))]
        env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0", TSAN_OPTIONS="halt_on_error=1")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            print(f"FAILED to run B={b} D={d} {dtype} {opts}:\n{proc.stderr[-4000:]}")
            return False
        loss = _read(t / "loss.bin", acc, ())
        stats = [_read(t / f"stats_{n}.bin", acc, (4, d)) for n in "st"] if training else None
        gs = _read(t / "grad_student.bin", dtype, (b, d))
        gt = _read(t / "grad_teacher.bin", dtype, (b, d)) if tg else None
    rloss, rgs, rgt, _ = run("reference64", student, teacher, p, training, buffers, tg, EPS)
    scales = train_grad_scales(student, teacher, p, EPS) if training else (0.0, 0.0)
    # Loss and statistics: float32 arithmetic on the same half-precision values (tests/test_srd.py);
    # the gradients are also rounded to the features dtype.
    tol, acc_tol = TOL[dtype], min(TOL[dtype], 1e-5)
    errs = {"loss": (rel_err(loss, rloss), acc_tol)}
    errs["grad_s"] = (rel_err(gs, grad * rgs, abs(grad) * scales[0]), tol)
    if tg:
        errs["grad_t"] = (rel_err(gt, grad * rgt, abs(grad) * scales[1]), tol)
    if training:
        for name, z, st in (("s", student, stats[0]), ("t", teacher, stats[1])):
            mean, var = reference.batch_norm_statistics(z.double())
            errs[f"mean_{name}"] = (rel_err(st[0], mean, var.sqrt().max().item()), acc_tol)
            errs[f"var_{name}"] = (rel_err(st[1], var), acc_tol)
    if opts.get("same"):  # log(tiny) and exactly zero gradients
        wrong = loss.item() != torch.tensor(reference.SRD_TINY, dtype=acc).log().item()
        wrong |= gs.abs().max().item() != 0 or bool(tg and gt.abs().max().item() != 0)
        errs["same"] = (float(wrong), 0.0)
    good = all(e <= t for e, t in errs.values())
    print(
        f"{'ok ' if good else 'BAD'} B={b} D={d} {str(dtype)[6:]} {opts} "
        + " ".join(f"{k}={e:.1e}" for k, (e, _) in errs.items())
        + f" {proc.stdout.strip()}",
        flush=True,
    )
    return good


def main() -> int:
    return cli(__doc__.splitlines()[0], build, run_case, CASES, QUICK)


if __name__ == "__main__":
    sys.exit(main())
