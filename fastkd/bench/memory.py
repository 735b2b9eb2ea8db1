"""Peak memory of one training step: the CUDA allocator's peak in-process, or the peak
resident set size on the CPU, measured in a fresh subprocess per op and dtype.

The CPU worker is started as ``python -m fastkd.bench --memory-worker PAYLOAD`` (see
``__main__.py``) with ``MALLOC_MMAP_THRESHOLD_=65536``, so RSS follows live memory.
"""

from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence

import torch

from fastkd.bench.devices import _package_root
from fastkd.bench.specs import DTYPES, OP_SPECS, Case, OpSpec, _inputs, build_variants, zero_grads

MiB = 2**20


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
