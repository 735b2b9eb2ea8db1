"""Output of ``fastkd bench``: derived ratios and rates, the text and Markdown tables, CSV,
JSON with the environment, and the PNG plots (matplotlib imported only to plot)."""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import subprocess
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

import fastkd
from fastkd.bench.devices import _package_root, cpu_count, cpu_model, device_name
from fastkd.bench.specs import DTYPE_NAMES, DTYPES, OpSpec
from fastkd.bench.timing import Row


def _peak_key(spec: OpSpec, algorithm: str, dtype: torch.dtype, device: torch.device) -> str:
    """Which measured peak a fused variant is compared with: its GEMMs' dtype."""
    if algorithm in spec.float64_algorithms or dtype == torch.float64:
        return "fp64"
    if device.type == "cpu":
        return "fp32"  # the CPU kernels upcast to fp32 before their GEMMs
    return DTYPE_NAMES[dtype]


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


def _peaks_line(peaks: dict) -> str:
    mm = ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in sorted(peaks["mm_flops"].items()))
    copy = peaks["copy_bytes_per_s"] / 1e9
    return f"measured peaks: torch.mm {peaks['mm_size']}^3: {mm}; copy: {copy:.1f} GB/s"
