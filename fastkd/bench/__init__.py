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

# Layout: specs (cases, variants, one OpSpec per op with its cost model), devices (names, free
# memory, measured peaks), memory (CUDA and CPU peak measurement, the CPU worker run as
# ``python -m fastkd.bench --memory-worker``), timing (timed steps and the sweep), report
# (ratios, tables, files, plots), cli (options and run).

from fastkd.bench.cli import add_arguments, run
from fastkd.bench.devices import (
    NOMINAL_RATE,
    cpu_count,
    cpu_model,
    device_name,
    free_memory,
    measure_peaks,
    synchronizer,
)
from fastkd.bench.memory import (
    MiB,
    cpu_memory_points,
    measure_step_memory,
    peak_rss_supported,
)
from fastkd.bench.report import (
    TABLE_HEADERS,
    environment,
    fill_derived,
    format_table,
    markdown_table,
    plot_results,
    write_results,
)
from fastkd.bench.specs import (
    DTYPE_NAMES,
    DTYPES,
    FKD_FR_WEIGHT,
    FKD_KD_WEIGHT,
    MODES,
    OP_SPECS,
    SRD_P,
    Case,
    Cost,
    OpSpec,
    Variant,
    build_variants,
    default_sizes,
    device_type,
    fused_backends,
    group_name,
    parse_sizes,
    zero_grads,
)
from fastkd.bench.timing import (
    Row,
    Settings,
    run_sweep,
    skip_reason,
    time_variants,
    timed_step,
)

__all__ = [
    "DTYPES",
    "DTYPE_NAMES",
    "FKD_FR_WEIGHT",
    "FKD_KD_WEIGHT",
    "MODES",
    "MiB",
    "NOMINAL_RATE",
    "OP_SPECS",
    "SRD_P",
    "TABLE_HEADERS",
    "Case",
    "Cost",
    "OpSpec",
    "Row",
    "Settings",
    "Variant",
    "add_arguments",
    "build_variants",
    "cpu_count",
    "cpu_memory_points",
    "cpu_model",
    "default_sizes",
    "device_name",
    "device_type",
    "environment",
    "fill_derived",
    "format_table",
    "free_memory",
    "fused_backends",
    "group_name",
    "markdown_table",
    "measure_peaks",
    "measure_step_memory",
    "parse_sizes",
    "peak_rss_supported",
    "plot_results",
    "run",
    "run_sweep",
    "skip_reason",
    "synchronizer",
    "time_variants",
    "timed_step",
    "write_results",
    "zero_grads",
]
