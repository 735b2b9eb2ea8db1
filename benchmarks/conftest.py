"""pytest-benchmark suite: every available fused backend against the eager and compiled reference.

Cases come from the op specs of :mod:`fastkd.bench` (``OP_SPECS``): each test module names its
op (``OP = "fkd"``) and gets one test per (size, dtype, variant, mode), mode being ``fwd``,
``bwd`` (backward only, after an untimed forward) or ``fwd+bwd`` (a full step). Tests of one
comparison share a benchmark group, e.g. ``fkd-fwd+bwd-B4096-D256-fp32``.

Options (or environment variables):
  --bench-full        (FASTKD_BENCH_FULL=1) the big sweep; default: a small set that runs in
                      well under a minute on a 2-core CPU with --benchmark-disable
  --bench-device      (FASTKD_BENCH_DEVICE) cpu | cuda; default cuda when available
  --bench-dtypes      (FASTKD_BENCH_DTYPES) e.g. fp32,bf16; default fp32 (CPU), fp32,bf16,fp16
  FASTKD_BENCH_BUDGET       seconds of timed rounds per test (default 1 on CPU, 0.3 on CUDA)
  FASTKD_BENCH_MAX_SECONDS  skip a test whose step is predicted to take longer (default 5 on
                            CPU, 10 on CUDA): the eager reference at B = 16384 on a CPU
Points whose predicted memory exceeds 60% of the free memory are skipped too. CUDA tests record
the peak extra allocator memory of a step in ``extra_info["peak_step_mib"]``.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import pytest
import torch

from fastkd import bench


def pytest_addoption(parser):
    group = parser.getgroup("fastkd benchmarks")
    group.addoption("--bench-full", action="store_true", default=False, help="the big sweep")
    group.addoption("--bench-device", default=None, help="cpu | cuda (default: cuda if present)")
    group.addoption("--bench-dtypes", default=None, help="comma list of fp32,fp16,bf16,fp64")


@dataclass(frozen=True)
class BenchCase:
    spec: bench.OpSpec
    case: bench.Case
    dtype: torch.dtype
    variant: bench.Variant
    mode: str
    device: torch.device

    @property
    def id(self) -> str:
        return (
            f"{self.case.shape_label}-{bench.DTYPE_NAMES[self.dtype]}-"
            f"{self.variant.label}-{self.mode}"
        )


def _option(config, name: str, env: str):
    value = config.getoption(name)
    return value if value not in (None, False) else os.environ.get(env) or None


def _settings(config):
    flag = os.environ.get("FASTKD_BENCH_FULL", "0")
    full = config.getoption("--bench-full") or flag not in ("", "0")
    device = torch.device(
        _option(config, "--bench-device", "FASTKD_BENCH_DEVICE")
        or ("cuda" if torch.cuda.is_available() else "cpu")
    )
    dtypes = _option(config, "--bench-dtypes", "FASTKD_BENCH_DTYPES")
    dtypes = dtypes or ("fp32,bf16,fp16" if device.type == "cuda" else "fp32")
    return full, device, [bench.DTYPES[d.strip()] for d in dtypes.split(",") if d.strip()]


_VARIANTS: dict[tuple, list] = {}


def _variants(spec, device):
    # one torch.compile per op and session: its graphs are reused across tests
    key = (spec.name, device.type)
    if key not in _VARIANTS:
        _VARIANTS[key] = bench.build_variants(spec, device)
    return _VARIANTS[key]


def _max_seconds(device) -> float:
    default = "10" if device.type == "cuda" else "5"
    return float(os.environ.get("FASTKD_BENCH_MAX_SECONDS", default))


def pytest_generate_tests(metafunc):
    if "bench_case" not in metafunc.fixturenames:
        return
    op = metafunc.module.OP
    spec = bench.OP_SPECS[op]
    if not spec.available():
        metafunc.parametrize(
            "bench_case", [pytest.param(None, marks=pytest.mark.skip(f"no {op} in this build"))]
        )
        return
    full, device, dtypes = _settings(metafunc.config)
    if device.type == "cuda" and not torch.cuda.is_available():
        metafunc.parametrize(
            "bench_case", [pytest.param(None, marks=pytest.mark.skip("no CUDA device"))]
        )
        return
    level = "full" if full else "smoke"
    cases = bench.default_sizes(spec, device, level)
    settings = bench.Settings(max_seconds=_max_seconds(device))
    params = []
    for dtype in dtypes:
        for i, case in enumerate(cases):
            for variant in _variants(spec, device):
                reason = bench.skip_reason(spec, variant, case, dtype, device, settings, {})
                # compiling costs ~15 s a shape on a small CPU: once in the default set
                if variant.impl == "compiled" and device.type == "cpu" and not full and i > 0:
                    reason = reason or "compiled reference: first size only (--bench-full: all)"
                for mode in bench.MODES:
                    bc = BenchCase(spec, case, dtype, variant, mode, device)
                    marks = [pytest.mark.skip(reason)] if reason else []
                    params.append(pytest.param(bc, id=bc.id, marks=marks))
    metafunc.parametrize("bench_case", params)


def _budget(device) -> float:
    return float(os.environ.get("FASTKD_BENCH_BUDGET", "0.3" if device.type == "cuda" else "1"))


@pytest.fixture
def run_bench_case():
    """``run(benchmark, bench_case)``: time one mode of one variant with pytest-benchmark."""

    def run(benchmark, bc: BenchCase):
        spec, case, dtype, variant, device = bc.spec, bc.case, bc.dtype, bc.variant, bc.device
        benchmark.group = bench.group_name(spec.name, bc.mode, case, dtype)
        benchmark.extra_info.update(
            op=spec.name,
            variant=variant.label,
            algorithm=variant.algorithm(case),
            batch=case.batch,
            width=case.width,
            teacher_width=case.teacher_width,
            dtype=bench.DTYPE_NAMES[dtype],
            mode=bc.mode,
            device=bench.device_name(device),
        )
        inputs = spec.make_inputs(case, dtype, device, 0)
        sync = bench.synchronizer(device)
        fn = variant.fn

        def clear():
            bench.zero_grads(inputs)
            sync()

        def forward():
            loss = fn(*inputs)
            sync()
            return loss

        def backward(loss):
            loss.backward()
            sync()

        def step():
            backward(forward())

        def setup_backward():
            clear()
            return (forward(),), {}

        rounds = 1
        if benchmark.enabled:
            # warm-up (the compiled reference compiles on its first call), then enough rounds
            # to fill the budget
            for _ in range(2 if variant.impl == "compiled" else 1):
                clear()
                step()
            clear()
            t0 = time.perf_counter()
            step()
            seconds = time.perf_counter() - t0
            rounds = max(3, min(100, math.ceil(_budget(device) / max(seconds, 1e-6))))
        if bc.mode == "fwd":
            benchmark.pedantic(forward, setup=clear, rounds=rounds)
        elif bc.mode == "bwd":
            benchmark.pedantic(backward, setup=setup_backward, rounds=rounds)
        else:
            benchmark.pedantic(step, setup=clear, rounds=rounds)
        if device.type == "cuda" and bc.mode == "fwd+bwd":
            peak_fwd, peak_step = bench.measure_step_memory(fn, inputs, device)
            benchmark.extra_info.update(
                peak_fwd_mib=peak_fwd / bench.MiB, peak_step_mib=peak_step / bench.MiB
            )

    return run
