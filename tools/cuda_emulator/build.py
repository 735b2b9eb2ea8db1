"""Building and running the emulator drivers, and the raw buffers they read and write."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CUDA_SRC = ROOT / "csrc" / "cuda"
INCLUDE = ROOT / "csrc" / "include"
BUILD_DIR = ROOT / "build" / "cuda_emulator"
SANITIZERS = {"address": "address,undefined", "thread": "thread"}

# The element-type codes of csrc/cuda/launch.h (enum class DType).
CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


def build(op: str, sanitize: str = "address") -> Path:
    """The g++ build of ``<op>_emulator.cpp`` (which includes ``csrc/cuda/<op>.cu``) under
    ``sanitize`` ("address": AddressSanitizer + UBSan, or "thread"). Rebuilt only when a source
    (the driver, every csrc/cuda and csrc/include header, the .cu, the mock) is newer than the
    binary, so a test session builds each driver at most once."""
    if sanitize not in SANITIZERS:
        raise ValueError(f"sanitize must be one of {sorted(SANITIZERS)}, got {sanitize!r}")
    driver = HERE / f"{op}_emulator.cpp"
    out = BUILD_DIR / f"{op}_emulator_{sanitize}"
    deps = [driver, CUDA_SRC / f"{op}.cu", *CUDA_SRC.glob("*.h"), *INCLUDE.rglob("*.h")]
    deps += list((HERE / "mock").glob("*.h"))
    if out.exists() and all(out.stat().st_mtime > d.stat().st_mtime for d in deps):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["g++", "-std=c++20", "-O1", "-g", "-Wall", "-Wno-unknown-pragmas"]
    # The kernels compare threadIdx (unsigned) with int strides: harmless, nvcc does not warn.
    cmd += ["-Wno-unused-parameter", "-Wno-sign-compare"]
    cmd += [f"-fsanitize={SANITIZERS[sanitize]}", "-fno-sanitize-recover=all"]
    cmd += ["-I", str(HERE / "mock"), "-I", str(INCLUDE), "-I", str(CUDA_SRC)]
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    cmd += [str(driver), "-o", str(tmp), "-pthread"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    tmp.replace(out)  # atomic: a concurrent session never runs a half-written binary
    return out


@dataclass
class Run:
    """What a driver printed: the split count its launchers chose and the kernel launches."""

    splits: int
    launches: int
    stdout: str


def run_driver(exe: Path, args: list, misalign: bool = False) -> Run:
    """Runs a driver; a non-zero exit (a sanitizer report, an emulation error) raises with the
    end of its stderr."""
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0", TSAN_OPTIONS="halt_on_error=1")
    env.pop("EMU_MISALIGN", None)
    if misalign:
        env["EMU_MISALIGN"] = "1"
    proc = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(
            f"{exe.name} {' '.join(map(str, args[1:]))} failed:\n{proc.stderr[-4000:]}"
        )
    fields = dict(item.split("=") for item in proc.stdout.split())
    return Run(int(fields["splits"]), int(fields["launches"]), proc.stdout.strip())


def write(path: Path, x: torch.Tensor) -> None:
    """Raw bytes of ``x`` (row-major), as the drivers read them."""
    x = x.detach().contiguous()
    (x.view(torch.int16) if x.element_size() == 2 else x).numpy().tofile(path)


def read(path: Path, dtype: torch.dtype, shape) -> torch.Tensor:
    """A buffer a driver wrote, as a tensor of ``dtype`` and ``shape``."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.from_numpy(np.fromfile(path, dtype=np.int16)).view(dtype).reshape(shape)
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    return torch.from_numpy(np.fromfile(path, dtype=np_dtype)).reshape(shape)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels' accumulation dtype: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32
