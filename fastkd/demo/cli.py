"""``fastkd demo`` options and run: grid search on validation, chosen configs on test,
loss timing, then results.{json,md,png}. The description is the package docstring."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

import fastkd
from fastkd.demo.data import few_label_mask, load_data
from fastkd.demo.models import ENSEMBLE_WIDTHS, MLP, STUDENT_WIDTHS, describe
from fastkd.demo.report import _config_text, _mean_std, format_tables, plot
from fastkd.demo.timing import time_losses, timing_clock
from fastkd.demo.train import FR_WEIGHT, LEARNING_RATE, METHODS, train_student, train_teachers

DEFAULT_EPOCHS = 60
DEFAULT_SEEDS = 5
DEFAULT_LABELS_PER_CLASS = 10
QUICK_EPOCHS = 2


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _batch_size(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(
            f"must be >= 2 (relational losses need pairs), got {value}"
        )
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``fastkd demo`` (every one has help text); the description is the package's."""
    from fastkd import demo

    parser.description = demo.__doc__.replace("``", "")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run in well under a minute: {QUICK_EPOCHS} epochs, 1 seed, short timings "
        "(the numbers are meaningless, the pipeline is the same)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="base seed (default 0): data split, few-label subset, teachers, grid search; the "
        "student seeds are SEED, SEED+1, ...",
    )
    parser.add_argument(
        "--seeds",
        type=_positive_int,
        default=None,
        help=f"number of student seeds for the chosen configs (default {DEFAULT_SEEDS}, "
        "1 with --quick)",
    )
    parser.add_argument(
        "--epochs",
        type=_positive_int,
        default=None,
        help=f"training epochs of every teacher and student (default {DEFAULT_EPOCHS}, "
        f"{QUICK_EPOCHS} with --quick)",
    )
    parser.add_argument(
        "--batch-size", type=_batch_size, default=64, help="training batch size, >= 2 (default 64)"
    )
    parser.add_argument(
        "--labels-per-class",
        type=_non_negative_int,
        default=DEFAULT_LABELS_PER_CLASS,
        help="labels per class the student sees in the few-label regime "
        f"(default {DEFAULT_LABELS_PER_CLASS}; 0 skips that regime)",
    )
    parser.add_argument(
        "--backend",
        default="auto",
        choices=("auto", "cpu", "triton", "reference"),
        help="fastkd backend of the distillation losses during training and in the timing "
        "(default auto: the compiled CPU kernels when built, else the reference). The demo runs "
        "on CPU tensors, so triton needs TRITON_INTERPRET=1 (slow)",
    )
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="torch CPU threads (default 1: the models are tiny, more threads mostly add "
        "synchronisation overhead)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("fastkd_demo_results"),
        help="folder for results.json, results.md and results.png (default ./fastkd_demo_results)",
    )
    parser.add_argument("--no-plot", action="store_true", help="do not write results.png")
    parser.add_argument(
        "--no-progress", action="store_true", help="hide the progress bars (the table is kept)"
    )


def run(args: argparse.Namespace) -> int:
    """Run the demo; prints the tables and writes results.{json,md,png} to ``args.out``.

    Returns the exit status: 0, or 2 when the demo extras are missing or ``--backend`` cannot
    run here. The torch thread count is restored afterwards (the demo may run in-process).
    """
    try:
        import matplotlib  # noqa: F401
        import sklearn  # noqa: F401
        import tqdm  # noqa: F401
    except ImportError as exc:
        print(f"fastkd demo needs the demo extras: pip install 'fastkd[demo]' ({exc})")
        return 2
    try:
        fastkd.resolve_backend("fkd", args.backend, torch.device("cpu"))
    except (fastkd.BackendUnavailableError, ValueError) as exc:
        print(f"fastkd demo: --backend {args.backend}: {exc}")
        return 2
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        result = _run(args)
    finally:
        torch.set_num_threads(threads)
    return 0 if result else 1


def _run(args: argparse.Namespace) -> dict:
    import sklearn
    from tqdm import tqdm

    started, cpu_started = time.perf_counter(), time.process_time()
    epochs = args.epochs or (QUICK_EPOCHS if args.quick else DEFAULT_EPOCHS)
    seeds = args.seeds or (1 if args.quick else DEFAULT_SEEDS)
    data = load_data(args.seed)
    n_train = len(data.y_train)
    regimes = {"all": {"label": "all labels", "mask": torch.ones(n_train, dtype=torch.bool)}}
    if args.labels_per_class:
        mask = few_label_mask(data.y_train, args.labels_per_class, args.seed)
        regimes["few"] = {"label": f"{args.labels_per_class} labels/class", "mask": mask}

    hide = args.no_progress
    with tqdm(total=len(ENSEMBLE_WIDTHS) + 1, desc="teachers", unit="model", disable=hide) as bar:
        teachers = train_teachers(data, args.seed, epochs, args.batch_size, bar)

    cache: dict[tuple, tuple[float, float]] = {}  # the grid's seed is reused by the final runs

    def run_one(regime: str, method: str, config: dict, seed: int) -> tuple[float, float]:
        key = (regime, method, json.dumps(config, sort_keys=True), seed)
        if key not in cache:
            mask = regimes[regime]["mask"]
            cache[key] = train_student(
                data, teachers, method, config, seed, mask, epochs, args.batch_size, args.backend
            )
        return cache[key]

    grid: dict = {r: {m.key: [] for m in METHODS} for r in regimes}
    grid_runs = [(r, m.key, c) for r in regimes for m in METHODS for c in m.grid]
    with tqdm(grid_runs, desc="grid search (validation)", unit="run", disable=hide) as bar:
        for regime, method, config in bar:
            bar.set_postfix_str(f"{regime}: {method} {_config_text(config)}")
            val, _ = run_one(regime, method, config, args.seed)
            grid[regime][method].append({"config": config, "val_acc": val})

    # Best validation accuracy; max() gives ties to the earlier grid entry.
    results: dict = {
        r: {
            m: {
                "config": max(runs, key=lambda g: g["val_acc"])["config"],
                "val_acc": [],
                "test_acc": [],
            }
            for m, runs in grid[r].items()
        }
        for r in regimes
    }
    seed_list = [args.seed + i for i in range(seeds)]
    final_runs = [(r, m.key, s) for r in regimes for m in METHODS for s in seed_list]
    with tqdm(final_runs, desc="chosen configs (test)", unit="run", disable=hide) as bar:
        for regime, method, seed in bar:
            bar.set_postfix_str(f"{regime}: {method} seed {seed}")
            entry = results[regime][method]
            val, test = run_one(regime, method, entry["config"], seed)
            entry["val_acc"].append(val)
            entry["test_acc"].append(test)
    for per_method in results.values():
        for entry in per_method.values():
            entry["seeds"] = seed_list
            entry["test_mean"], entry["test_std"] = _mean_std(entry["test_acc"])

    with tqdm(total=1, desc="loss timing", unit="table", disable=hide) as bar:
        timing = time_losses(data, teachers, args.batch_size, args.backend, args.quick, args.seed)
        bar.update()

    result = {
        "settings": {
            "seed": args.seed,
            "seeds": seeds,
            "epochs": epochs,
            "batch_size": args.batch_size,
            "learning_rate": LEARNING_RATE,
            "fr_weight": FR_WEIGHT,
            "labels_per_class": args.labels_per_class,
            "backend": args.backend,
            "fkd_backend": fastkd.resolve_backend("fkd", args.backend, torch.device("cpu")),
            "threads": args.threads,
            "quick": args.quick,
        },
        "versions": {
            "fastkd": fastkd.__version__,
            "torch": torch.__version__,
            "sklearn": sklearn.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
        },
        "data": {
            "dataset": "sklearn.datasets.load_digits",
            "train": n_train,
            "val": len(data.y_val),
            "test": len(data.y_test),
        },
        "student": describe(MLP(STUDENT_WIDTHS)),
        "teachers": teachers.report,
        "methods": [{"key": m.key, "label": m.label, "grid": list(m.grid)} for m in METHODS],
        "regimes": {
            k: {"label": v["label"], "labelled": int(v["mask"].sum())} for k, v in regimes.items()
        },
        "grid": grid,
        "results": results,
        "timing": timing,
        "timing_clock": timing_clock()[1],
    }

    args.out.mkdir(parents=True, exist_ok=True)
    tables = format_tables(result)
    written = [args.out / "results.json", args.out / "results.md"]
    written[1].write_text(tables + "\n")
    if not args.no_plot:
        written.append(args.out / "results.png")
        plot(result, written[2])
    result["runtime_s"] = time.perf_counter() - started
    result["cpu_time_s"] = time.process_time() - cpu_started
    written[0].write_text(json.dumps(result, indent=2) + "\n")
    print("\n" + tables + "\n")
    print(
        f"Finished in {result['runtime_s']:.0f} s (CPU time {result['cpu_time_s']:.0f} s). "
        f"Wrote {', '.join(map(str, written))}."
    )
    return result
