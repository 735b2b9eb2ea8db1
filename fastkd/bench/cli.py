"""``fastkd bench`` options and run: parse, sweep, save after every block, print, plot."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from fastkd.bench.devices import _package_root, cpu_model, measure_peaks
from fastkd.bench.memory import peak_rss_supported
from fastkd.bench.report import (
    _peaks_line,
    environment,
    fill_derived,
    format_table,
    plot_results,
    write_results,
)
from fastkd.bench.specs import (
    DTYPES,
    OP_SPECS,
    Variant,
    default_sizes,
    parse_sizes,
)
from fastkd.bench.timing import Row, Settings, run_sweep


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
    for spec in OP_SPECS.values():  # every op's fixed settings, whichever ops run
        meta.update(spec.meta)
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
