"""``fastkd bench``: speed and peak memory of every fused backend against the reference.

For each op (a row of :data:`OP_SPECS`), dtype and size ``B x D``, every available variant runs
a full training step (forward, then backward) ``N`` times after warm-up, the variants taking
turns step by step (so load from other processes hits them alike):

* fused variants: ``<backend>/<algorithm>`` (``cpu/tiled``, ``cpu/dual``, ``cpu/auto``,
  ``cuda/...``, ``triton/...``; SRD: ``<backend>/fused``; RKD distance: ``<backend>/tiled``),
* ``reference/eager``: :mod:`fastkd.reference` in eager PyTorch,
* ``reference/compiled``: ``torch.compile(reference)`` with default settings (automatic dynamic
  shapes: the first shape is compiled static, later shapes share one dynamic graph).

Reported per variant: median forward, backward and step time; peak extra memory of one step;
speed-up against eager and compiled reference; memory against eager; achieved GFLOP/s (FKD,
RKD: the GEMM flops of the algorithm) or GB/s (SRD: the bytes the fused algorithm reads and writes)
against the device peak measured here (a large ``torch.mm``, a large copy).

Memory measurement:
  CUDA  ``torch.cuda.reset_peak_memory_stats`` then ``max_memory_allocated`` minus the
        allocation before the step (inputs excluded), in-process, after warm-up.
  CPU   peak resident set size: each op and dtype runs in a fresh subprocess with
        ``MALLOC_MMAP_THRESHOLD_=65536`` (every buffer >= 64 KiB is mmap'ed and returned to the
        OS on free, so RSS follows live memory); after a warm-up step at the same size, the
        high-water mark is reset through ``/proc/self/clear_refs`` and the result is
        ``VmHWM`` after the step minus ``VmRSS`` before it. It counts everything the process
        touches (tensors, BLAS and OpenMP buffers), at page granularity.

Outputs go to ``<out>/<device-name>/``: ``bench.csv``, ``bench.json`` (rows plus versions,
device, date, git commit, measured peaks), ``bench.md`` (the table in Markdown) and
``<op>-<dtype>-{time,memory}.png``.

The same table of op specs drives the pytest-benchmark suite in ``benchmarks/``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import fastkd
from fastkd import reference
from fastkd.fkd import choose_algorithm

MiB = 2**20
DTYPES = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp64": torch.float64,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MODES = ("fwd", "bwd", "fwd+bwd")

# FKD settings used throughout: the feature regulariser is on, so every term of SPEC §1 runs.
FKD_KD_WEIGHT = 1.0
FKD_FR_WEIGHT = 0.01
SRD_P = 4.0

# Nominal rates, only for the guard that skips a point predicted to take too long or too much
# memory before anything at that size has been measured (order-of-magnitude estimates).
NOMINAL_RATE = {"cpu": (1e11, 3e9), "cuda": (2e13, 1e12)}  # (flop/s, byte/s)


# ----------------------------------------------------------------------------------------------
# Cases, variants and op specs
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One benchmark point: batch B, student width D and teacher width Dt (default D)."""

    batch: int
    width: int
    teacher_width: int

    @property
    def shape_label(self) -> str:
        d = f"D{self.width}"
        if self.teacher_width != self.width:
            d += f"x{self.teacher_width}"
        return f"B{self.batch}-{d}"


def parse_sizes(text: str) -> list[Case]:
    """``"256x256,4096x512x2048"`` -> cases; each entry ``BxD`` or ``BxDsxDt`` (FKD widths)."""
    cases = []
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        parts = item.lower().split("x")
        if len(parts) not in (2, 3) or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"--sizes entry {item!r} is not BxD or BxDsxDt (positive integers)")
        b, d = int(parts[0]), int(parts[1])
        if b < 2:
            raise ValueError(f"--sizes entry {item!r}: the batch must be at least 2")
        cases.append(Case(b, d, int(parts[2]) if len(parts) == 3 else d))
    if not cases:
        raise ValueError("--sizes is empty")
    return cases


@dataclass(frozen=True)
class Cost:
    """Work of one call: ``flops`` and ``bytes`` per phase, and an estimate of its peak memory."""

    fwd_flops: float = 0.0
    bwd_flops: float = 0.0
    fwd_bytes: float = 0.0
    bwd_bytes: float = 0.0
    peak_bytes: float = 0.0

    @property
    def flops(self) -> float:
        return self.fwd_flops + self.bwd_flops

    @property
    def bytes(self) -> float:
        return self.fwd_bytes + self.bwd_bytes


@dataclass
class Variant:
    """One way of computing an op's loss. ``fn(*inputs)`` returns the 0-dim loss."""

    op: str
    backend: str  # "cpu" | "cuda" | "triton" | "reference"
    impl: str  # "tiled" | "dual" | "auto" | "fused" | "eager" | "compiled"
    fn: Callable[..., torch.Tensor]
    # The algorithm actually run for a case ("auto" resolves to tiled or dual).
    algorithm: Callable[[Case], str] = lambda case: ""

    @property
    def label(self) -> str:
        return f"{self.backend}/{self.impl}"

    @property
    def is_reference(self) -> bool:
        return self.backend == "reference"


@dataclass(frozen=True)
class OpSpec:
    """Everything the harness needs to benchmark one op.

    ``make_inputs(case, dtype, device, seed)`` returns ``(student, teacher)`` with the student
    requiring grad; ``fused(backend, algorithm)`` returns the loss callable of a fused backend;
    ``cost(case, impl, dtype)`` the work of one call; ``throughput`` says which of flops
    ("flops") or bytes ("bytes") is the meaningful rate for the fused algorithm.
    """

    name: str
    make_inputs: Callable[[Case, torch.dtype, torch.device, int], tuple[torch.Tensor, ...]]
    reference: Callable[..., torch.Tensor]
    fused: Callable[[str, str], Callable[..., torch.Tensor]]
    algorithms: tuple[str, ...]
    cost: Callable[[Case, str, torch.dtype], Cost]
    throughput: str
    # device type -> level -> sizes text; levels: "smoke" (the pytest-benchmark default set),
    # "quick" and "default" (fastkd bench), "full" (both, on request)
    sizes: dict[str, dict[str, str]]
    available: Callable[[], bool] = lambda: True
    same_widths: bool = False  # the op needs teacher_width == width


def _features(case: Case, dtype, device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(case.batch, case.width, generator=gen)
    teacher = torch.randn(case.batch, case.teacher_width, generator=gen)
    student = student.to(device=device, dtype=dtype).requires_grad_(True)
    return student, teacher.to(device=device, dtype=dtype)


def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# FKD (SPEC §1). Flop counts are those of the algorithms as specified:
#   tiled  forward: upper-triangle tiles of both kernels, B^2 (Ds + Dt);
#          backward: both kernels' tiles again, 2 B^2 (Ds + Dt), and (rho_S - rho_T) A, 2 B^2 Ds.
#   dual   forward: A^T A, A^T T, T^T T, 2 B (Ds^2 + Ds Dt + Dt^2) (float64);
#          backward: A^T T, A^T A, A (A^T A), T (T^T A), 4 B Ds (Ds + Dt) (float64).
#   eager  forward: both B x B kernels in full, 2 B^2 (Ds + Dt); backward 4 B^2 Ds; it also
#          streams ~18 B x B fp32 matrices through memory and keeps ~5 of them alive.
def _fkd_cost(case: Case, impl: str, dtype: torch.dtype) -> Cost:
    b, ds, dt = case.batch, case.width, case.teacher_width
    acc = 8 if dtype == torch.float64 else 4
    if impl == "auto":
        impl = choose_algorithm("auto", b, ds, dt)
    # The student requires grad in every benchmark, so the fused backends take their
    # forward-backward path: the forward pass does all the work and backward only scales.
    if impl == "tiled":
        # Upper-triangle tiles of both kernels (B^2 (Ds + Dt)) + the two half-size gradient
        # GEMMs D_IJ A_J and D_IJ^T A_I (2 B^2 Ds).
        return Cost(
            fwd_flops=b * b * (3 * ds + dt),
            bwd_flops=0,
            fwd_bytes=b * (ds + dt) * (_elem(dtype) + acc),
            bwd_bytes=b * (ds + dt) * (_elem(dtype) + acc) + 3 * b * ds * acc,
            peak_bytes=8 * b * (ds + dt) * acc,
        )
    if impl == "dual":
        # Three Grams, then G = A (A^T A) - T (T^T A) from them.
        return Cost(
            fwd_flops=2 * b * (ds * ds + ds * dt + dt * dt) + 2 * b * ds * (ds + dt),
            bwd_flops=0,
            fwd_bytes=b * (ds + dt) * (_elem(dtype) + 8),
            bwd_bytes=4 * b * (ds + dt) * 8,
            peak_bytes=8 * b * (ds + dt) * 8 + 3 * (ds + dt) ** 2 * 8,
        )
    # eager or compiled reference
    return Cost(
        fwd_flops=2 * b * b * (ds + dt),
        bwd_flops=4 * b * b * ds,
        fwd_bytes=8 * b * b * acc,
        bwd_bytes=10 * b * b * acc,
        peak_bytes=6 * b * b * acc + 8 * b * (ds + dt) * acc,
    )


def _fkd_fused(backend: str, algorithm: str) -> Callable[..., torch.Tensor]:
    def fn(student, teacher):
        return fastkd.fkd_loss(
            student, teacher, FKD_KD_WEIGHT, FKD_FR_WEIGHT, backend=backend, algorithm=algorithm
        )

    return fn


def _fkd_reference(student, teacher):
    return reference.fkd_loss(student, teacher, FKD_KD_WEIGHT, FKD_FR_WEIGHT)


# SRD (SPEC §3). The fused algorithm reads both inputs in pass 1 (statistics) and pass 2 (loss
# and column sums), and again in the backward pass, which writes the student gradient.
def _srd_cost(case: Case, impl: str, dtype: torch.dtype) -> Cost:
    n, e = case.batch * case.width, _elem(dtype)
    if impl in ("eager", "compiled"):
        return Cost(
            fwd_flops=20 * n,
            bwd_flops=30 * n,
            fwd_bytes=24 * n * 4,
            bwd_bytes=30 * n * 4,
            peak_bytes=16 * n * 4,
        )
    return Cost(
        fwd_flops=12 * n,
        bwd_flops=12 * n,
        fwd_bytes=4 * n * e,
        bwd_bytes=3 * n * e,
        peak_bytes=n * e + 8 * case.width * 4,
    )


def _srd_fused(backend: str, algorithm: str) -> Callable[..., torch.Tensor]:
    def fn(student, teacher):
        return fastkd.srd_loss(student, teacher, p=SRD_P, backend=backend)

    return fn


def _srd_reference(student, teacher):
    return reference.srd_loss(student, teacher, SRD_P)


# RKD distance (SPEC §2). The CPU kernel sweeps the upper triangle three times (means; loss;
# gradient), each sweep forming both sides' dot-product tiles (B^2 (Ds + Dt)), and the last one
# also W_IJ F_J and W_IJ^T F_I for the student (2 B^2 Ds); the GPU kernels' gradient sweep
# visits every tile, twice that sweep's flops, but the model counts the CPU algorithm's. The
# eager reference forms both B x B dot-product matrices (2 B^2 (Ds + Dt)), back-propagates the
# student's (4 B^2 Ds) and streams ~30 B x B matrices through memory, keeping ~12 alive.
def _rkd_cost(case: Case, impl: str, dtype: torch.dtype) -> Cost:
    b, ds, dt = case.batch, case.width, case.teacher_width
    acc = 8 if dtype == torch.float64 else 4
    if impl == "tiled":
        return Cost(
            fwd_flops=3 * b * b * (ds + dt) + 2 * b * b * ds,
            fwd_bytes=4 * b * (ds + dt) * (_elem(dtype) + acc),
            peak_bytes=4 * b * (ds + dt) * acc,
        )
    return Cost(
        fwd_flops=2 * b * b * (ds + dt),
        bwd_flops=4 * b * b * ds,
        fwd_bytes=14 * b * b * acc,
        bwd_bytes=16 * b * b * acc,
        peak_bytes=12 * b * b * acc + 4 * b * (ds + dt) * acc,
    )


def _rkd_fused(backend: str, algorithm: str) -> Callable[..., torch.Tensor]:
    def fn(student, teacher):
        return fastkd.rkd_distance_loss(student, teacher, backend=backend)

    return fn


OP_SPECS: dict[str, OpSpec] = {
    "fkd": OpSpec(
        name="fkd",
        make_inputs=_features,
        reference=_fkd_reference,
        fused=_fkd_fused,
        algorithms=("tiled", "dual", "auto"),
        cost=_fkd_cost,
        throughput="flops",
        sizes={
            "cpu": {
                "smoke": "130x64,1024x256",
                "quick": "256x256,1024x256,4096x256",
                "default": "256x256,1024x256,4096x256,16384x128",
                "full": "64x64,256x256,1024x256,1024x2048,2048x512,4096x64,4096x256,"
                "4096x512x2048,8192x256,16384x128",
            },
            "cuda": {
                "smoke": "1024x256,4096x256,16384x256,4096x512x2048",
                "quick": "1024x256,4096x256,16384x256",
                "default": "256x256,1024x256,4096x256,16384x128,16384x256,4096x2048,"
                "16384x2048,4096x512x2048",
                "full": "64x64,64x256,256x256,256x2048,1024x64,1024x256,1024x512,1024x2048,"
                "4096x64,4096x256,4096x512,4096x2048,4096x512x2048,16384x64,16384x128,"
                "16384x256,16384x512,16384x2048,16384x512x2048",
            },
        },
    ),
    "srd": OpSpec(
        name="srd",
        make_inputs=_features,
        reference=_srd_reference,
        fused=_srd_fused,
        algorithms=("fused",),
        cost=_srd_cost,
        throughput="bytes",
        available=lambda: hasattr(fastkd, "srd_loss"),
        same_widths=True,
        sizes={
            "cpu": {
                "smoke": "130x512,1024x2048",
                "quick": "256x2048,1024x512",
                "default": "256x2048,1024x2048,4096x512,4096x2048",
                "full": "64x512,256x512,256x2048,1024x2048,4096x512,4096x2048,16384x512",
            },
            "cuda": {
                "smoke": "1024x2048,16384x2048",
                "quick": "1024x2048,16384x2048",
                "default": "256x2048,1024x2048,4096x2048,16384x512,16384x2048,65536x2048",
                "full": "64x512,256x512,256x2048,1024x512,1024x2048,4096x512,4096x2048,"
                "16384x512,16384x2048,65536x512,65536x2048",
            },
        },
    ),
    "rkd": OpSpec(
        name="rkd",
        make_inputs=_features,
        reference=reference.rkd_distance_loss,
        fused=_rkd_fused,
        algorithms=("tiled",),
        cost=_rkd_cost,
        throughput="flops",
        sizes={
            "cpu": {
                "smoke": "130x64,1024x128",
                "quick": "256x128,1024x128",
                "default": "256x128,1024x128,4096x128",
                "full": "64x64,256x128,1024x128,1024x512,4096x128,4096x512,8192x64",
            },
            "cuda": {
                "smoke": "1024x128",
                "quick": "1024x128",
                "default": "1024x128,4096x128",
                "full": "1024x128,4096x128,16384x128",
            },
        },
    ),
}


def device_type(device: torch.device | str) -> str:
    return torch.device(device).type


def default_sizes(spec: OpSpec, device: torch.device | str, level: str) -> list[Case]:
    return parse_sizes(spec.sizes[device_type(device)][level])


def _compiled(fn: Callable) -> Callable:
    """``torch.compile(fn)``, never silently falling back to eager on too many recompiles."""
    import torch._dynamo

    torch._dynamo.config.fail_on_recompile_limit_hit = True
    return torch.compile(fn)


def fused_backends(op: str, device: torch.device | str) -> list[str]:
    """Fused backends that run ``op`` on tensors of ``device`` here, fastest first.

    Triton's CPU interpreter (``TRITON_INTERPRET=1``) is a test tool, never benchmarked.
    """
    dev = device_type(device)
    report = fastkd.available_backends()
    wanted = ("cpu",) if dev == "cpu" else ("cuda", "triton")
    names = []
    for name in wanted:
        info = report.get(name, {})
        if not info.get("available") or op not in info.get("ops", ()):
            continue
        if name == "triton":
            from fastkd.triton import interpreter_enabled

            if interpreter_enabled():
                continue
        names.append(name)
    return names


def build_variants(
    spec: OpSpec, device: torch.device | str, *, compiled: bool = True
) -> list[Variant]:
    """Fused variants of every available backend, then the eager and compiled references.

    FKD's dual algorithm is plain torch GEMMs whatever the backend, so it is listed once.
    """
    variants = []
    for i, backend in enumerate(fused_backends(spec.name, device)):
        for algo in spec.algorithms:
            if algo == "dual" and i > 0:
                continue
            if spec.name == "fkd":

                def resolved(case, algo=algo):
                    return choose_algorithm(algo, case.batch, case.width, case.teacher_width)

            else:

                def resolved(case, algo=algo):
                    return algo

            variants.append(Variant(spec.name, backend, algo, spec.fused(backend, algo), resolved))
    variants.append(Variant(spec.name, "reference", "eager", spec.reference, lambda c: "eager"))
    if compiled:
        variants.append(
            Variant(
                spec.name, "reference", "compiled", _compiled(spec.reference), lambda c: "compiled"
            )
        )
    return variants


def group_name(op: str, mode: str, case: Case, dtype: torch.dtype) -> str:
    """pytest-benchmark group, e.g. ``fkd-fwd+bwd-B4096-D256-fp32``: one comparison per group."""
    return f"{op}-{mode}-{case.shape_label}-{DTYPE_NAMES[dtype]}"


# ----------------------------------------------------------------------------------------------
# Devices: names, free memory, measured peaks
# ----------------------------------------------------------------------------------------------


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


def _peak_key(spec: OpSpec, algorithm: str, dtype: torch.dtype, device: torch.device) -> str:
    """Which measured peak a fused variant is compared with: its GEMMs' dtype."""
    if algorithm == "dual" or dtype == torch.float64:
        return "fp64"
    if device.type == "cpu":
        return "fp32"  # the CPU kernels upcast to fp32 before their GEMMs
    return DTYPE_NAMES[dtype]


# ----------------------------------------------------------------------------------------------
# Measuring one point
# ----------------------------------------------------------------------------------------------


@dataclass
class Settings:
    repeats: int = 20  # most timed steps per point
    min_repeats: int = 3
    warmup: int = 1  # warm-up steps (compiled variants get one more: the first one compiles)
    budget: float = 2.0  # seconds of timed steps per point, within [min_repeats, repeats]
    max_seconds: float = 60.0  # skip a point predicted to take longer per step
    memory: bool = True
    seed: int = 0


@dataclass
class Row:
    """One measured (or skipped) point; the CSV columns, in order."""

    op: str
    dtype: str
    batch: int
    width: int
    teacher_width: int
    variant: str
    backend: str
    impl: str
    algorithm: str
    status: str = "ok"  # "ok" | "skipped" | "error"
    reason: str = ""
    repeats: int = 0
    fwd_ms: float | None = None
    bwd_ms: float | None = None
    step_ms: float | None = None
    step_ms_min: float | None = None
    peak_fwd_mib: float | None = None
    peak_step_mib: float | None = None
    speedup_vs_eager: float | None = None
    speedup_vs_compiled: float | None = None
    memory_vs_eager: float | None = None
    flops: float | None = None
    bytes: float | None = None
    gflops_per_s: float | None = None
    gbytes_per_s: float | None = None
    pct_of_peak: float | None = None
    peak_kind: str = ""

    @property
    def case(self) -> Case:
        return Case(self.batch, self.width, self.teacher_width)


def zero_grads(tensors):
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            t.grad = None


def timed_step(fn: Callable, inputs: tuple, sync: Callable[[], None]) -> tuple[float, float]:
    """One training step: clear grads, [sync] forward [sync] backward [sync]; (fwd, bwd) s."""
    zero_grads(inputs)
    sync()
    t0 = time.perf_counter()
    loss = fn(*inputs)
    sync()
    t1 = time.perf_counter()
    loss.backward()
    sync()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def time_variants(
    fns: dict[str, Callable],
    inputs: tuple,
    device: torch.device,
    settings: Settings,
    extra_warmup: dict[str, int] | None = None,
) -> dict[str, tuple[list[float], list[float]] | Exception]:
    """Forward and backward seconds of timed steps of several variants on the same inputs.

    After warm-up, the variants take turns, one step each per round, so that a burst of load
    from other processes hits them all alike and the ratios stay fair on a shared machine. Each
    variant gets as many steps as fill ``settings.budget`` seconds, clamped to
    [min_repeats, repeats]. A variant that raises is dropped; its exception is returned.
    """
    sync = synchronizer(device)
    extra_warmup = extra_warmup or {}
    results: dict = {}
    reps: dict[str, int] = {}
    for label, fn in fns.items():
        try:
            last = 0.0
            for _ in range(max(1, settings.warmup + extra_warmup.get(label, 0))):
                last = sum(timed_step(fn, inputs, sync))
        except Exception as exc:  # an OOM or a kernel error ends this variant only
            results[label] = exc
            continue
        n = math.ceil(settings.budget / max(last, 1e-9))
        reps[label] = max(settings.min_repeats, min(settings.repeats, n))
        results[label] = ([], [])
    for round_ in range(max(reps.values(), default=0)):
        for label, n in reps.items():
            if round_ >= n or isinstance(results[label], Exception):
                continue
            try:
                f, b = timed_step(fns[label], inputs, sync)
            except Exception as exc:
                results[label] = exc
                continue
            results[label][0].append(f)
            results[label][1].append(b)
    return results


def _read_status_kib(keys: Sequence[str]) -> dict[str, int]:
    with open("/proc/self/status") as f:
        text = f.read()
    return {k: int(re.search(rf"^{k}:\s+(\d+)", text, re.M).group(1)) * 1024 for k in keys}


def _reset_peak_rss() -> None:
    # "5" resets VmHWM to the current RSS (Linux >= 4.0, see proc(5)).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_supported() -> bool:
    try:
        _reset_peak_rss()
        _read_status_kib(("VmRSS", "VmHWM"))
        return True
    except (OSError, AttributeError):
        return False


def measure_step_memory(fn: Callable, inputs: tuple, device: torch.device) -> tuple[int, int]:
    """Peak extra bytes of one (forward, forward+backward) step above the memory before it.

    Call after a warm-up step at the same size. CUDA: allocator peak; CPU: peak RSS (the
    caller arranges ``MALLOC_MMAP_THRESHOLD_``, see the module docstring).
    """
    zero_grads(inputs)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        loss = fn(*inputs)
        torch.cuda.synchronize(device)
        peak_fwd = torch.cuda.max_memory_allocated(device) - base
        loss.backward()
        torch.cuda.synchronize(device)
        peak_step = torch.cuda.max_memory_allocated(device) - base
    else:
        _reset_peak_rss()
        base = _read_status_kib(("VmRSS",))["VmRSS"]
        loss = fn(*inputs)
        peak_fwd = max(_read_status_kib(("VmHWM",))["VmHWM"] - base, 0)
        loss.backward()
        # The kernel's RSS counters are per-CPU approximations (a few pages off), so a
        # later VmHWM can read below an earlier one; the step includes its forward.
        peak_step = max(_read_status_kib(("VmHWM",))["VmHWM"] - base, peak_fwd)
    del loss
    zero_grads(inputs)
    return peak_fwd, peak_step


def skip_reason(
    spec: OpSpec,
    variant: Variant,
    case: Case,
    dtype: torch.dtype,
    device: torch.device,
    settings: Settings,
    history: dict,
) -> str:
    """Why this point is skipped ("" to run it): predicted memory or time out of bounds."""
    if spec.same_widths and case.teacher_width != case.width:
        return f"{spec.name} needs equal student and teacher widths"
    cost = spec.cost(case, _cost_impl(variant, case), dtype)
    free = free_memory(device)
    if cost.peak_bytes > 0.6 * free:
        return f"needs ~{cost.peak_bytes / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
    rate, bandwidth = NOMINAL_RATE[device.type]
    predicted = cost.flops / rate + cost.bytes / bandwidth
    if variant.label in history:  # scale the last measured time by the work ratio
        seconds, last_cost = history[variant.label]
        work = lambda c: c.flops / rate + c.bytes / bandwidth  # noqa: E731
        predicted = seconds * work(cost) / max(work(last_cost), 1e-12)
    if predicted > settings.max_seconds:
        return f"predicted {predicted:.0f} s per step > --max-seconds {settings.max_seconds:g}"
    return ""


def _inputs(spec: OpSpec, case: Case, dtype, device, seed: int) -> tuple:
    return spec.make_inputs(case, dtype, device, seed)


# ----------------------------------------------------------------------------------------------
# CPU memory worker (fresh subprocess per variant)
# ----------------------------------------------------------------------------------------------


def _memory_worker(payload: dict) -> int:
    """Subprocess entry: peak RSS of each (variant, case) point, one JSON line per point."""
    device = torch.device("cpu")
    spec = OP_SPECS[payload["op"]]
    dtype = DTYPES[payload["dtype"]]
    labels = {label for label, *_ in payload["points"]}
    compiled = any(label.endswith("/compiled") for label in labels)
    variants = {v.label: v for v in build_variants(spec, device, compiled=compiled)}
    for label, b, d, dt in payload["points"]:
        variant = variants[label]
        out = {"point": [label, b, d, dt]}
        try:
            inputs = _inputs(spec, Case(b, d, dt), dtype, device, payload["seed"])
            for _ in range(2 if variant.impl == "compiled" else 1):  # the first one compiles
                zero_grads(inputs)
                variant.fn(*inputs).backward()
            out["peak_fwd"], out["peak_step"] = measure_step_memory(variant.fn, inputs, device)
            del inputs
        except Exception as exc:  # reported; the parent records it in the row
            out["error"] = f"{type(exc).__name__}: {exc}"
        print("RESULT " + json.dumps(out), flush=True)
    return 0


def _package_root() -> str:
    return str(Path(fastkd.__file__).resolve().parent.parent)


def cpu_memory_points(spec: OpSpec, dtype_name: str, points: list[tuple[str, Case]], seed: int):
    """Peak RSS of ``(variant label, case)`` points, measured in one fresh subprocess.

    Yields ``(label, case, peak_fwd_bytes, peak_step_bytes, error)`` as the worker reports them.
    """
    env = dict(os.environ)
    # Buffers >= 64 KiB are mmap'ed and unmapped on free, so RSS follows live memory instead
    # of glibc's heap reusing freed pages invisibly.
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    env["MALLOC_TRIM_THRESHOLD_"] = "131072"
    env["PYTHONPATH"] = _package_root() + os.pathsep + env.get("PYTHONPATH", "")
    payload = {
        "op": spec.name,
        "dtype": dtype_name,
        "points": [[label, c.batch, c.width, c.teacher_width] for label, c in points],
        "seed": seed,
    }
    cmd = [sys.executable, "-m", "fastkd.bench", "--memory-worker", json.dumps(payload)]
    seen = 0
    with tempfile.TemporaryFile("w+") as errors:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errors, text=True, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            if not line.startswith("RESULT "):
                continue
            out = json.loads(line[len("RESULT ") :])
            label, b, d, dt = out["point"]
            seen += 1
            yield label, Case(b, d, dt), out.get("peak_fwd"), out.get("peak_step"), out.get("error")
        code = proc.wait()
        errors.seek(0)
        tail = errors.read().strip().splitlines()[-1:] or [f"exit code {code}"]
    for label, case in points[seen:]:
        yield label, case, None, None, f"memory worker died: {tail[0]}"


# ----------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------


def _ms(seconds: Sequence[float]) -> float:
    return 1e3 * statistics.median(seconds)


def run_sweep(
    specs: Sequence[OpSpec],
    device: torch.device,
    dtypes: Sequence[torch.dtype],
    sizes: dict[str, list[Case]],
    settings: Settings,
    *,
    compiled: bool = True,
    variant_filter: Callable[[Variant], bool] = lambda v: True,
    progress: bool = True,
    rows: list[Row] | None = None,
    on_block: Callable[[list[Row]], None] | None = None,
) -> list[Row]:
    """Measure every (op, dtype, size, variant) point, one (op, dtype) block at a time.

    Rows are appended to ``rows`` as they are measured (so an interrupted sweep keeps what it
    has) and ``on_block(rows)`` runs after each block. Ratios and rates are filled in by
    :func:`fill_derived`.
    """
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is an optional dependency: no progress bar then
        progress = False

        def tqdm(*args, **kwargs):
            return _NoBar()

    rows = [] if rows is None else rows
    variants = {
        spec.name: [v for v in build_variants(spec, device, compiled=compiled) if variant_filter(v)]
        for spec in specs
    }
    cpu_memory = settings.memory and device.type == "cpu"
    total = sum(len(variants[s.name]) * len(sizes[s.name]) for s in specs) * len(dtypes)
    bar = tqdm(
        total=total * (2 if cpu_memory else 1),
        desc="fastkd bench",
        unit="pt",
        disable=not progress,
        leave=False,
    )
    try:
        for spec in specs:
            for dtype in dtypes:
                block = _time_block(
                    spec, dtype, sizes[spec.name], variants[spec.name], device, settings, bar, rows
                )
                if cpu_memory:
                    _cpu_memory_block(spec, dtype, block, settings, bar)
                if on_block is not None:
                    on_block(rows)
    finally:
        bar.close()
    return rows


def _time_block(spec, dtype, cases, variants, device, settings, bar, rows) -> list[Row]:
    """Time every (case, variant) of one op and dtype; CUDA memory is measured here too."""
    cpu_memory = settings.memory and device.type == "cpu"
    history: dict = {}
    block = []
    name = DTYPE_NAMES[dtype]
    for case in cases:
        bar.set_postfix_str(f"{spec.name} {name} {case.shape_label}")
        runnable, by_label = {}, {}
        for variant in variants:
            row = Row(
                op=spec.name,
                dtype=name,
                batch=case.batch,
                width=case.width,
                teacher_width=case.teacher_width,
                variant=variant.label,
                backend=variant.backend,
                impl=variant.impl,
                algorithm=variant.algorithm(case),
                status="running",
            )
            rows.append(row)
            block.append(row)
            by_label[variant.label] = (variant, row)
            reason = skip_reason(spec, variant, case, dtype, device, settings, history)
            if reason:
                row.status, row.reason = "skipped", reason
                bar.total -= 1 if cpu_memory else 0
                bar.update(1)
            else:
                runnable[variant.label] = variant.fn
        if not runnable:
            continue
        inputs = _inputs(spec, case, dtype, device, settings.seed)
        extra = {label: 1 for label in runnable if label.endswith("/compiled")}
        timings = time_variants(runnable, inputs, device, settings, extra_warmup=extra)
        for label, result in timings.items():
            variant, row = by_label[label]
            if isinstance(result, Exception):
                row.status = "error"
                row.reason = f"{type(result).__name__}: {str(result)[:200]}"
                bar.total -= 1 if cpu_memory else 0
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                bar.update(1)
                continue
            fwd, bwd = result
            steps = [f + b for f, b in zip(fwd, bwd, strict=True)]
            row.repeats = len(steps)
            row.fwd_ms, row.bwd_ms, row.step_ms = _ms(fwd), _ms(bwd), _ms(steps)
            row.step_ms_min = 1e3 * min(steps)
            # the fastest step predicts the next size best: load bursts only slow steps down
            cost = spec.cost(case, _cost_impl(variant, case), dtype)
            history[label] = (row.step_ms_min / 1e3, cost)
            row.status = "ok"
            if settings.memory and device.type == "cuda":
                try:
                    pf, ps = measure_step_memory(variant.fn, inputs, device)
                    row.peak_fwd_mib, row.peak_step_mib = pf / MiB, ps / MiB
                except Exception as exc:
                    row.reason = f"memory: {type(exc).__name__}: {str(exc)[:200]}"
            bar.update(1)
        del inputs
    return block


def _cpu_memory_block(spec, dtype, block, settings, bar) -> None:
    """Peak RSS of the block's measured points, in one fresh subprocess."""
    name = DTYPE_NAMES[dtype]
    todo = {(r.variant, r.case): r for r in block if r.status == "ok"}
    if not todo:
        return
    bar.set_postfix_str(f"peak RSS {spec.name} {name}")
    for label, case, pf, ps, err in cpu_memory_points(spec, name, list(todo), settings.seed):
        row = todo[(label, case)]
        if err:
            row.reason = f"memory: {err[:200]}"
        else:
            row.peak_fwd_mib, row.peak_step_mib = pf / MiB, ps / MiB
        bar.set_postfix_str(f"peak RSS {spec.name} {name} {case.shape_label} {label}")
        bar.update(1)


class _NoBar:
    total = 0

    def update(self, n=1):
        pass

    def set_postfix_str(self, text):
        pass

    def close(self):
        pass


def _cost_impl(variant: Variant, case: Case) -> str:
    if variant.impl == "compiled":
        return "eager"
    return variant.algorithm(case) or variant.impl


def fill_derived(rows: list[Row], specs_by_name: dict, device: torch.device, peaks: dict | None):
    """Ratios against the references of the same point, and achieved rates of fused variants."""
    for r in rows:
        if r.status == "running":  # the sweep was interrupted at this point
            r.status, r.reason = "skipped", "interrupted"
    by_point: dict[tuple, dict[str, Row]] = {}
    for r in rows:
        by_point.setdefault((r.op, r.dtype, r.case), {})[
            r.impl if r.backend == "reference" else r.variant
        ] = r
    for r in rows:
        if r.status != "ok":
            continue
        refs = by_point[(r.op, r.dtype, r.case)]
        eager, comp = refs.get("eager"), refs.get("compiled")
        if eager is not None and eager.status == "ok" and r.step_ms:
            r.speedup_vs_eager = eager.step_ms / r.step_ms
            # below 1 MiB the eager peak is page-granularity noise, not a baseline
            if (eager.peak_step_mib or 0) >= 1 and r.peak_step_mib is not None:
                r.memory_vs_eager = r.peak_step_mib / eager.peak_step_mib
        if comp is not None and comp.status == "ok" and r.step_ms:
            r.speedup_vs_compiled = comp.step_ms / r.step_ms
        if r.backend == "reference":
            continue
        spec = specs_by_name[r.op]
        cost = spec.cost(r.case, r.algorithm or r.impl, DTYPES[r.dtype])
        seconds = r.step_ms / 1e3
        r.flops, r.bytes = cost.flops, cost.bytes
        if spec.throughput == "flops":
            r.gflops_per_s = cost.flops / seconds / 1e9
            r.peak_kind = "mm-" + _peak_key(spec, r.algorithm, DTYPES[r.dtype], device)
            peak = (peaks or {}).get("mm_flops", {}).get(r.peak_kind[3:])
            if peak:
                r.pct_of_peak = 100.0 * cost.flops / seconds / peak
        else:
            r.gbytes_per_s = cost.bytes / seconds / 1e9
            r.peak_kind = "copy"
            peak = (peaks or {}).get("copy_bytes_per_s")
            if peak:
                r.pct_of_peak = 100.0 * cost.bytes / seconds / peak


# ----------------------------------------------------------------------------------------------
# Output: table, CSV, JSON, plots
# ----------------------------------------------------------------------------------------------


def _fmt(value, spec: str = ".1f", missing: str = "-") -> str:
    if value is None:
        return missing
    return format(value, spec)


def _fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "-"
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.0f}"


def _fmt_x(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    return f"{ratio:.2f}x" if ratio < 10 else f"{ratio:.0f}x"


def _render(cells: Sequence[str], widths: Sequence[int]) -> str:
    out = []
    for i, c in enumerate(cells):
        if len(cells) != len(widths) and i == len(cells) - 1:
            out.append(c)  # a skip/error message runs to the end of the line
        else:
            out.append(c.ljust(widths[i]) if i == 2 else c.rjust(widths[i]))
    return "  ".join(out).rstrip()


TABLE_HEADERS = (
    "B",
    "D",
    "variant",
    "fwd ms",
    "bwd ms",
    "step ms",
    "vs eager",
    "vs compiled",
    "peak MiB",
    "mem/eager",
    "rate",
    "% peak",
)


def _rate(r: Row) -> str:
    if r.gflops_per_s is not None:
        g = r.gflops_per_s
        return f"{g / 1e3:.1f} TFLOP/s" if g >= 1e3 else f"{g:.1f} GFLOP/s"
    if r.gbytes_per_s is not None:
        return f"{r.gbytes_per_s:.1f} GB/s"
    return "-"


def _table_blocks(rows: Sequence[Row]):
    """``(title, lines)`` per (op, dtype); a line is the cells of TABLE_HEADERS, or
    (B, D, variant, message) for a skipped or failed point."""
    for op, dtype in dict.fromkeys((r.op, r.dtype) for r in rows):
        lines = []
        for r in rows:
            if (r.op, r.dtype) != (op, dtype):
                continue
            width = str(r.width) if r.width == r.teacher_width else f"{r.width}x{r.teacher_width}"
            label = r.variant
            if r.impl == "auto" and r.algorithm:
                label += f"({r.algorithm})"
            if r.status != "ok":
                lines.append([str(r.batch), width, label, f"{r.status}: {r.reason}"])
                continue
            mem_ratio = None if r.memory_vs_eager is None else 100 * r.memory_vs_eager
            lines.append(
                [
                    str(r.batch),
                    width,
                    label,
                    _fmt_ms(r.fwd_ms),
                    _fmt_ms(r.bwd_ms),
                    _fmt_ms(r.step_ms),
                    _fmt_x(r.speedup_vs_eager),
                    _fmt_x(r.speedup_vs_compiled),
                    _fmt(r.peak_step_mib, ".1f"),
                    _fmt(mem_ratio, ".1f") + ("%" if mem_ratio is not None else ""),
                    _rate(r),
                    _fmt(r.pct_of_peak, ".0f") + ("%" if r.pct_of_peak is not None else ""),
                ]
            )
        yield f"{op.upper()} {dtype}", lines


def format_table(rows: Sequence[Row]) -> str:
    """Plain-text table, one block per (op, dtype)."""
    blocks = []
    for title, lines in _table_blocks(rows):
        widths = [len(h) for h in TABLE_HEADERS]
        for line in lines:
            if len(line) == len(TABLE_HEADERS):
                widths = [max(w, len(c)) for w, c in zip(widths, line, strict=True)]
        rule = ["-" * w for w in widths]
        body = [_render(x, widths) for x in lines]
        blocks.append(
            "\n".join([title, _render(TABLE_HEADERS, widths), _render(rule, widths)] + body)
        )
    return "\n\n".join(blocks)


def markdown_table(rows: Sequence[Row]) -> str:
    """The same table in Markdown, one block per (op, dtype)."""
    blocks = []
    for title, lines in _table_blocks(rows):
        out = [f"**{title}**", "", "| " + " | ".join(TABLE_HEADERS) + " |"]
        out.append(
            "|" + "|".join("---" if i == 2 else "---:" for i in range(len(TABLE_HEADERS))) + "|"
        )
        for line in lines:
            if len(line) != len(TABLE_HEADERS):
                line = line[:3] + [line[3]] + [""] * (len(TABLE_HEADERS) - 4)
            out.append("| " + " | ".join(line) + " |")
        blocks.append("\n".join(out))
    return "\n\n".join(blocks)


def _git_commit() -> dict:
    root = _package_root()
    try:
        commit = subprocess.run(
            ["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    if commit.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def environment(device: torch.device) -> dict:
    """Versions, device and date recorded with every result file."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # triton is optional
        triton_version = None
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": device_name(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "fastkd": fastkd.__version__,
        "git": _git_commit(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "backends": {k: v["available"] for k, v in fastkd.available_backends().items()},
        "timing": "median of N training steps (forward then backward) after warm-up, variants "
        "taking turns step by step; perf_counter around each phase, with "
        "torch.cuda.synchronize on CUDA",
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["memory_method"] = (
            "torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus "
            "memory_allocated before the step (inputs excluded), after warm-up"
        )
    else:
        env["memory_method"] = (
            "peak RSS in a fresh subprocess per op and dtype with MALLOC_MMAP_THRESHOLD_=65536: "
            "VmHWM after the step minus VmRSS before it, the high-water mark reset through "
            "/proc/self/clear_refs after a warm-up step at the same size"
        )
    try:
        load = os.getloadavg()
        env["load_average"] = [round(x, 2) for x in load]
    except OSError:
        pass
    return env


def _csv_value(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    return value


def write_results(rows: Sequence[Row], meta: dict, out_dir: Path) -> list[Path]:
    """``bench.csv``, ``bench.json`` and ``bench.md`` in ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [f for f in Row.__dataclass_fields__]
    csv_path = out_dir / "bench.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: _csv_value(v) for k, v in asdict(r).items()})
    md_path = out_dir / "bench.md"
    md_path.write_text(markdown_table(rows) + "\n")
    json_path = out_dir / "bench.json"
    with open(json_path, "w") as f:
        json.dump({"meta": meta, "rows": [asdict(r) for r in rows]}, f, indent=1)
        f.write("\n")
    return [csv_path, json_path, md_path]


def plot_results(rows: Sequence[Row], out_dir: Path) -> list[Path]:
    """Time and memory against B (log-log), one panel per width, per (op, dtype)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for op, dtype in dict.fromkeys((r.op, r.dtype) for r in rows):
        mine = [r for r in rows if (r.op, r.dtype) == (op, dtype) and r.status == "ok"]
        widths = sorted({(r.width, r.teacher_width) for r in mine})
        if not widths:
            continue
        for metric, ylabel, fname in (
            ("step_ms", "fwd+bwd time (ms, median)", "time"),
            ("peak_step_mib", "peak extra memory per step (MiB)", "memory"),
        ):
            fig, axes = plt.subplots(
                1, len(widths), figsize=(4.2 * len(widths), 3.6), squeeze=False
            )
            for ax, (d, dt) in zip(axes[0], widths, strict=True):
                for k, label in enumerate(dict.fromkeys(r.variant for r in mine)):
                    pts = sorted(
                        (r.batch, getattr(r, metric))
                        for r in mine
                        if r.variant == label
                        and (r.width, r.teacher_width) == (d, dt)
                        and getattr(r, metric) is not None
                        and getattr(r, metric) > 0
                    )
                    if pts:
                        style = "--" if label.startswith("reference") else "-"
                        ax.plot(
                            *zip(*pts, strict=True), style, marker="o", color=f"C{k}", label=label
                        )
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("batch B")
                ax.set_title(f"{op} {dtype} D={d}" + (f"x{dt}" if dt != d else ""))
                ax.grid(True, which="both", alpha=0.3)
            axes[0][0].set_ylabel(ylabel)
            for ax in axes[0]:
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize=7)
            fig.tight_layout()
            path = out_dir / f"{op}-{dtype}-{fname}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def _default_out() -> str:
    root = Path(_package_root())
    if (root / "benchmarks").is_dir():
        return str(root / "benchmarks" / "results")
    return os.path.join("benchmarks", "results")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--op", choices=(*OP_SPECS, "all"), default="all", help="op(s) to run")
    parser.add_argument(
        "--quick", action="store_true", help="small sizes, fewer repeats (about a minute on a CPU)"
    )
    parser.add_argument(
        "--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)"
    )
    parser.add_argument(
        "--dtype",
        default=None,
        help="comma list of fp32,fp16,bf16,fp64 (default: fp32 on CPU, fp32,bf16,fp16 on CUDA)",
    )
    parser.add_argument(
        "--sizes",
        default=None,
        help="comma list of BxD or BxDsxDt (FKD teacher width), e.g. 1024x256,4096x512x2048; "
        "default: per op and device",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="results root; files go to <out>/<device-name>/ (default: benchmarks/results)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="most timed steps per point")
    parser.add_argument(
        "--budget", type=float, default=None, help="seconds of timed steps per point"
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="skip a point predicted to take longer per step (default 60, quick 20)",
    )
    parser.add_argument(
        "--variants",
        default=None,
        help="comma list of variant labels or backends to keep, e.g. cpu/tiled,reference",
    )
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    parser.add_argument("--no-memory", action="store_true", help="skip memory measurement")
    parser.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--seed", type=int, default=0)


def _parse_dtypes(text: str | None, device: torch.device) -> list[torch.dtype]:
    if text is None:
        text = "fp32,bf16,fp16" if device.type == "cuda" else "fp32"
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in DTYPES]
    if bad or not names:
        raise ValueError(f"--dtype must be a comma list of {', '.join(DTYPES)}, got {text!r}")
    return [DTYPES[n] for n in names]


def _resolve_device(text: str | None) -> torch.device:
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(text)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda[:N], got {text!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def run(args: argparse.Namespace) -> int:
    device = _resolve_device(args.device)
    dtypes = _parse_dtypes(args.dtype, device)
    level = "quick" if args.quick else "default"
    names = list(OP_SPECS) if args.op == "all" else [args.op]
    specs = []
    for name in names:
        spec = OP_SPECS[name]
        if spec.available():
            specs.append(spec)
        elif args.op != "all":
            raise SystemExit(f"fastkd bench: op {name!r} is not available in this fastkd build")
        else:
            print(f"note: {name} skipped (not in this fastkd build)", file=sys.stderr)
    sizes = {}
    for spec in specs:
        sizes[spec.name] = (
            parse_sizes(args.sizes) if args.sizes else default_sizes(spec, device, level)
        )
    settings = Settings(
        repeats=args.repeats or (5 if args.quick else 20),
        min_repeats=2 if args.quick else 3,
        budget=args.budget if args.budget is not None else (0.5 if args.quick else 2.0),
        max_seconds=args.max_seconds or (20.0 if args.quick else 60.0),
        memory=not args.no_memory,
        seed=args.seed,
    )
    if settings.memory and device.type == "cpu" and not peak_rss_supported():
        print(
            "note: /proc/self/clear_refs is not writable here: CPU memory is not measured",
            file=sys.stderr,
        )
        settings.memory = False
    keep = None if not args.variants else {v.strip() for v in args.variants.split(",")}

    def variant_filter(v: Variant) -> bool:
        return keep is None or v.label in keep or v.backend in keep

    meta = environment(device)
    meta["args"] = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool))}
    meta["settings"] = asdict(settings)
    meta["level"] = "custom" if args.sizes else level
    meta["fkd_weights"] = {"kd_weight": FKD_KD_WEIGHT, "fr_weight": FKD_FR_WEIGHT}
    meta["srd_p"] = SRD_P
    meta["peaks"] = peaks = measure_peaks(device, dtypes, quick=args.quick)
    out_dir = Path(args.out or _default_out()) / meta["device_name"]
    specs_by_name = {s.name: s for s in specs}

    def save(rows: list[Row]) -> list[Path]:
        # after every (op, dtype) block, so a sweep cut short still leaves its results
        fill_derived(rows, specs_by_name, device, peaks)
        return write_results(rows, meta, out_dir)

    rows: list[Row] = []
    try:
        run_sweep(
            specs,
            device,
            dtypes,
            sizes,
            settings,
            compiled=not args.no_compile,
            variant_filter=variant_filter,
            progress=not args.no_progress,
            rows=rows,
            on_block=save,
        )
    except KeyboardInterrupt:
        meta["interrupted"] = True
        print("interrupted: keeping the points measured so far", file=sys.stderr)
    try:
        meta["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    paths = save(rows)
    model = cpu_model() if device.type == "cpu" else meta["gpu"]
    print(
        f"fastkd bench on {meta['device_name']} ({model}), torch {torch.__version__}, "
        f"{meta['torch_threads']} threads, load average {meta.get('load_average')} at the "
        f"start, {meta.get('load_average_end')} at the end"
    )
    print(f"time: {meta['timing']}")
    print(f"memory: {meta['memory_method'] if settings.memory else 'not measured'}")
    print(_peaks_line(peaks))
    print()
    print(format_table(rows))
    print()
    if not args.no_plots:
        paths += plot_results(rows, out_dir)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _peaks_line(peaks: dict) -> str:
    mm = ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in sorted(peaks["mm_flops"].items()))
    copy = peaks["copy_bytes_per_s"] / 1e9
    return f"measured peaks: torch.mm {peaks['mm_size']}^3: {mm}; copy: {copy:.1f} GB/s"


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--memory-worker":
        sys.exit(_memory_worker(json.loads(sys.argv[2])))
    sys.exit("usage: fastkd bench [...] (this module is run by the fastkd command)")
