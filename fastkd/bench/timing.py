"""The sweep of ``fastkd bench``: timed training steps, variants taking turns, skip guards,
and the loop over (op, dtype, size, variant) that fills :class:`Row` records."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fastkd.bench.devices import NOMINAL_RATE, free_memory, synchronizer
from fastkd.bench.memory import MiB, cpu_memory_points, measure_step_memory
from fastkd.bench.specs import (
    DTYPE_NAMES,
    Case,
    OpSpec,
    Variant,
    _inputs,
    build_variants,
    zero_grads,
)


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


def _cost_impl(variant: Variant, case: Case) -> str:
    if variant.impl == "compiled":
        return "eager"
    return variant.algorithm(case) or variant.impl


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
