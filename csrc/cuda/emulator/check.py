"""Check the CUDA FKD kernels without a GPU: run csrc/cuda/fkd.cu on the CPU model in mock/.

Builds ``emulator.cpp`` (which includes ``../fkd.cu`` unchanged) with g++ and a sanitizer, runs
fkd_forward, fkd_backward and fkd_forward_backward on each case and compares them with
``fastkd.reference`` in float64, with the tolerances of tests/test_fkd_cuda.py.

    python csrc/cuda/emulator/check.py                # AddressSanitizer + UBSan, all cases
    python csrc/cuda/emulator/check.py --sanitize thread --quick

Slow by design (one OS thread per CUDA thread): a few minutes on two cores.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT))

from fastkd import reference  # noqa: E402

CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
LOSS_RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}
GRAD_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64

# (B, Ds, teacher widths, dtype, options): odd sizes around the 64-row tiles, widths that do and
# do not allow 16-byte loads, ensembles, several splits of the backward J loop (sms).
CASES = [
    (1, 5, [3], F64, {"tg": True}),
    (2, 1, [7], F32, {"tg": True, "grad": 0.37}),
    (3, 7, [64], F16, {}),
    (17, 64, [300], BF16, {"tg": True, "grad": -1.5}),
    (19, 8, [5], F64, {"tg": True, "fr": 0.5, "zero_rows": True}),
    (19, 8, [5], F32, {"tg": True, "fr": 0.5, "zero_rows": True}),
    (65, 65, [63], F64, {"tg": True}),
    (70, 64, [40], F16, {"tg": True, "misalign": True}),
    (70, 64, [40], F32, {"tg": True, "misalign": True}),
    (130, 64, [40], F16, {"tg": True}),
    (130, 7, [1, 64, 9], F16, {"tg": True}),
    (130, 300, [7], F16, {"sms": 1}),
    (100, 300, [64], F32, {"tg": True}),
    (257, 33, [8, 8, 30, 2], F32, {"tg": True, "sms": 4}),
    (300, 10, [6, 19], F64, {"tg": True, "kd": 0.9, "fr": 0.1}),
    (513, 17, [9], BF16, {"tg": True}),
    (513, 16, [9], F64, {"tg": True}),  # 8 splits
    (600, 24, [40], F32, {"tg": True}),
]
QUICK = [0, 3, 6, 7, 9, 13]


def compile_emulator(name: str, sources: list[Path], sanitize: str, flags=()) -> Path:
    """g++ build of the driver ``sources[0]`` with a sanitizer, redone only when any of
    ``sources`` (or the mock headers) is newer than the binary."""
    out = ROOT / "build" / "cuda_emulator" / f"{name}_{sanitize}"
    deps = list(sources) + list((HERE / "mock").glob("*.h"))
    if out.exists() and all(out.stat().st_mtime > s.stat().st_mtime for s in deps):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    sanitizers = {"address": "address,undefined", "thread": "thread"}[sanitize]
    cmd = ["g++", "-std=c++20", "-O1", "-g", "-Wall", "-Wno-unknown-pragmas", *flags]
    cmd += ["-Wno-unused-parameter", f"-fsanitize={sanitizers}", "-fno-sanitize-recover=all"]
    cmd += ["-I", str(HERE / "mock"), "-I", str(ROOT / "csrc/include"), "-I", str(HERE.parent)]
    cmd += [str(sources[0]), "-o", str(out), "-pthread"]
    print("building:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return out


def build(sanitize: str) -> Path:
    sources = [HERE / "emulator.cpp", HERE.parent / "fkd.cu", HERE.parent / "fkd_cuda.h"]
    return compile_emulator(
        "emulator", sources + [ROOT / "csrc/include/fastkd/fkd_math.h"], sanitize
    )


def _reference64(student, teachers, kd, fr, tg):
    s = student.double().requires_grad_()
    ts = [t.double().requires_grad_(tg) for t in teachers]
    loss = reference.fkd_loss(s, ts, kd, fr)
    grads = torch.autograd.grad(loss, [s] + (ts if tg else []))
    return loss.detach(), [g.detach() for g in grads]


def _write(path: Path, x: torch.Tensor) -> None:
    x = x.contiguous()
    (x.view(torch.int16) if x.element_size() == 2 else x).numpy().tofile(path)


def _read(path: Path, dtype: torch.dtype, shape) -> torch.Tensor:
    if dtype in (F16, BF16):
        return torch.from_numpy(np.fromfile(path, dtype=np.int16)).view(dtype).reshape(shape)
    np_dtype = np.float32 if dtype == F32 else np.float64
    return torch.from_numpy(np.fromfile(path, dtype=np_dtype)).reshape(shape)


def _grad_scale(ref_grad, x, student, teachers, kd):
    """As in tests/test_fkd_cuda.py: width-1 gradients are judged against the chain rule input."""
    scale = ref_grad.abs().max().item()
    if x.shape[1] > 1:
        return scale
    share = 1.0 if x is student else 1.0 / len(teachers)
    diff = reference.correlation_kernel(student.double()) - reference.teacher_kernel(
        [t.double() for t in teachers]
    )
    xd = x.double()
    g = 4.0 / xd.shape[0] ** 2 * (diff @ torch.nn.functional.normalize(xd, dim=1))
    g = share * kd * g / xd.norm(dim=1, keepdim=True).clamp_min(reference.NORM_EPS)
    return max(scale, g.abs().max().item())


def run_case(exe, b, ds, dts, dtype, opts) -> bool:
    kd, fr, grad = opts.get("kd", 0.8), opts.get("fr", 0.05), opts.get("grad", 1.0)
    tg, sms = opts.get("tg", False), opts.get("sms", 132)
    gen = torch.Generator().manual_seed(b * 7919 + ds)
    student, *teachers = [torch.randn(b, w, generator=gen, dtype=F64).to(dtype) for w in [ds, *dts]]
    if opts.get("zero_rows"):
        student[[0, b // 2]] = 0
        teachers[0][[b // 2, b - 1]] = 0
    acc = F64 if dtype == F64 else F32
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        _write(d / "student.bin", student)
        for e, t in enumerate(teachers):
            _write(d / f"teacher{e}.bin", t)
        _write(d / "grad.bin", torch.tensor([grad], dtype=acc))
        cmd = [str(exe), tmp, str(CODES[dtype]), str(b), str(ds), str(len(dts))]
        cmd += [str(w) for w in dts] + [str(int(tg)), repr(kd), repr(fr), str(sms)]
        env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0", TSAN_OPTIONS="halt_on_error=1")
        if opts.get("misalign"):
            env["EMU_MISALIGN"] = "1"
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            print(f"FAILED to run b={b} ds={ds} dts={dts} {dtype}:\n{proc.stderr[-4000:]}")
            return False
        results = []
        for suffix, factor in (("", grad), ("_fb", 1.0)):
            loss = _read(d / f"loss{suffix}.bin", acc, ())
            grads = [_read(d / f"grad_student{suffix}.bin", dtype, student.shape)]
            if tg:
                grads += [
                    _read(d / f"grad_teacher{e}{suffix}.bin", dtype, t.shape)
                    for e, t in enumerate(teachers)
                ]
            results.append((suffix or "bwd", factor, loss, grads))
    ref_loss, ref_grads = _reference64(student, teachers, kd, fr, tg)
    ok = True
    for name, factor, loss, grads in results:
        loss_err = abs(loss.double().item() - ref_loss.item()) / abs(ref_loss.item())
        excess = []
        for x, g, r in zip([student, *teachers], grads, ref_grads, strict=False):
            r = r * factor
            scale = _grad_scale(r, x, student, teachers, kd * abs(factor))
            unavoidable = (r.to(dtype).double() - r).abs().max().item()
            err = (g.double() - r).abs().max().item() if torch.isfinite(g).all() else float("inf")
            excess.append(max(0.0, err - 2 * unavoidable) / (scale or 1.0))
        good = loss_err <= LOSS_RTOL[dtype] and all(e <= GRAD_TOL[dtype] for e in excess)
        ok &= good
        print(
            f"{'ok ' if good else 'BAD'} {name:4s} B={b} Ds={ds} Dt={dts} {str(dtype)[6:]} "
            f"{opts} loss_err={loss_err:.1e} grad_excess={[f'{e:.1e}' for e in excess]} "
            f"{proc.stdout.strip()}",
            flush=True,
        )
    return ok


def cli(description: str, build_fn, run_case, cases, quick) -> int:
    """The command line both checkers share: pick cases, build, run, summarise."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--sanitize", choices=["address", "thread"], default="address")
    parser.add_argument("--quick", action="store_true", help="a few representative cases")
    parser.add_argument("--cases", help="comma-separated indices into CASES")
    args = parser.parse_args()
    exe = build_fn(args.sanitize)
    chosen = [int(i) for i in args.cases.split(",")] if args.cases else None
    chosen = quick if args.quick and chosen is None else chosen
    picked = cases if chosen is None else [cases[i] for i in chosen]
    ok = all([run_case(exe, *case) for case in picked])
    print("all cases match the reference" if ok else "MISMATCHES")
    return 0 if ok else 1


def main() -> int:
    return cli(__doc__.splitlines()[0], build, run_case, CASES, QUICK)


if __name__ == "__main__":
    sys.exit(main())
