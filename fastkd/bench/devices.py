"""The machine ``fastkd bench`` runs on: device names, free memory, synchronisation, and the
measured peaks (GEMM rate, copy bandwidth) that achieved rates are compared with."""

from __future__ import annotations

import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

import fastkd
from fastkd.bench.specs import DTYPE_NAMES, DTYPES

# Nominal rates, only for the guard that skips a point predicted to take too long or too much
# memory before anything at that size has been measured (order-of-magnitude estimates).
NOMINAL_RATE = {"cpu": (1e11, 3e9), "cuda": (2e13, 1e12)}  # (flop/s, byte/s)


def _package_root() -> str:
    return str(Path(fastkd.__file__).resolve().parent.parent)


def _sanitise(text: str) -> str:
    text = re.sub(r"\((r|tm)\)", "", text.lower())
    text = re.sub(r"\bcpu\b.*$|\bprocessor\b", "", text)
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "unknown"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def device_name(device: torch.device | str) -> str:
    """Directory name of a device's results: ``cpu-<model>-<n>c`` or ``cuda-<gpu name>``."""
    device = torch.device(device)
    if device.type == "cuda":
        return "cuda-" + _sanitise(torch.cuda.get_device_name(device))
    return f"cpu-{_sanitise(cpu_model())}-{cpu_count()}c"


def free_memory(device: torch.device) -> int:
    """Bytes a benchmark may still allocate: free GPU memory, or the kernel's MemAvailable."""
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + cached
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def synchronizer(device: torch.device) -> Callable[[], None]:
    """A function that waits for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _median_time(fn: Callable[[], object], sync, reps: int) -> float:
    fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_peaks(device: torch.device, dtypes: Sequence[torch.dtype], quick: bool) -> dict:
    """Peak GEMM rate per dtype (a large ``torch.mm``) and copy bandwidth (a large ``copy_``).

    Returns ``{"mm_flops": {dtype name: flop/s}, "copy_bytes_per_s": byte/s, "mm_size": n}``;
    fp32 is measured with TF32 off (IEEE fp32); on CUDA "tf32" is measured too.
    """
    sync = synchronizer(device)
    cuda = device.type == "cuda"
    n = (8192 if not quick else 4096) if cuda else (2048 if not quick else 1024)
    reps = 10 if cuda else 3
    names = {DTYPE_NAMES[d] for d in dtypes} | {"fp32", "fp64"}
    result: dict = {"mm_size": n, "mm_flops": {}}
    for name in sorted(names):
        dtype = DTYPES[name]
        if not cuda and dtype in (torch.float16, torch.bfloat16):
            continue  # CPU kernels compute in fp32 whatever the input dtype
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        t = _median_time(lambda a=a, b=b: torch.mm(a, b), sync, reps)
        result["mm_flops"][name] = 2 * n**3 / t
        del a, b
    if cuda:
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            a = torch.randn(n, n, device=device)
            t = _median_time(lambda a=a: torch.mm(a, a), sync, reps)
            result["mm_flops"]["tf32"] = 2 * n**3 / t
            del a
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old
    numel = (2**28 if not quick else 2**26) if cuda else (2**26 if not quick else 2**24)
    src = torch.empty(numel, device=device).uniform_()
    dst = torch.empty_like(src)
    t = _median_time(lambda src=src, dst=dst: dst.copy_(src), sync, reps)
    result["copy_bytes_per_s"] = 2 * src.numel() * src.element_size() / t
    result["copy_size_bytes"] = src.numel() * src.element_size()
    del src, dst
    return result
