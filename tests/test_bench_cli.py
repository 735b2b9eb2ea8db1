"""Smoke test of ``fastkd bench``: a tiny CPU sweep, then the table, CSV, JSON and plots."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re

import pytest
import torch

from fastkd import _extension, bench, cli

SIZES = "64x32,130x17,512x32"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One tiny FKD sweep on the CPU: (exit status, stdout, results folder)."""
    if not bench.peak_rss_supported():
        pytest.skip("needs /proc/self/clear_refs (Linux) for the CPU memory measurement")
    out = tmp_path_factory.mktemp("bench")
    argv = ["bench", "--quick", "--op", "fkd", "--device", "cpu", "--sizes", SIZES]
    argv += ["--no-compile", "--no-progress", "--repeats", "2", "--budget", "0", "--out", str(out)]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = cli.main(argv)
    return status, stdout.getvalue(), out / bench.device_name("cpu")


def test_quick_sweep_writes_table_csv_json_and_plots(quick_run):
    status, stdout, out_dir = quick_run
    assert status == 0
    variants = [v.label for v in bench.build_variants(bench.OP_SPECS["fkd"], "cpu", compiled=False)]
    # the compiled CPU kernels give three fused variants (dual once); the reference is last
    fused = ["cpu/tiled", "cpu/dual", "cpu/auto"] if _extension.loaded() else []
    assert variants == fused + ["reference/eager"]
    cases = bench.parse_sizes(SIZES)

    # table: a header, then one row per (size, variant), every row with a time
    assert "FKD fp32" in stdout
    header = next(line for line in stdout.splitlines() if line.lstrip().startswith("B "))
    for column in ("variant", "step ms", "vs eager", "vs compiled", "peak MiB", "mem/eager"):
        assert column in header
    rows = [line.split() for line in stdout.splitlines() if re.match(r"\s*\d+\s+\d+\s+\S+/", line)]
    assert len(rows) == len(cases) * len(variants)
    assert all(float(r[5]) > 0 for r in rows), rows  # step ms

    # CSV and JSON hold the same rows
    assert re.fullmatch(r"cpu-[a-z0-9-]+-\d+c", out_dir.name)
    with open(out_dir / "bench.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["variant"] for r in table] == variants * len(cases)
    assert {(int(r["batch"]), int(r["width"])) for r in table} == {
        (c.batch, c.width) for c in cases
    }
    for r in table:
        assert r["status"] == "ok", r
        assert float(r["fwd_ms"]) > 0 and float(r["bwd_ms"]) > 0
        assert float(r["step_ms"]) >= float(r["step_ms_min"]) > 0
        assert int(r["repeats"]) >= 2
        assert float(r["peak_step_mib"]) >= float(r["peak_fwd_mib"]) >= 0
        assert r["speedup_vs_compiled"] == ""  # --no-compile
        if r["variant"] == "reference/eager":
            assert float(r["speedup_vs_eager"]) == 1.0
        else:
            assert float(r["gflops_per_s"]) > 0 and r["peak_kind"].startswith("mm-")
    doc = json.loads((out_dir / "bench.json").read_text())
    assert len(doc["rows"]) == len(table)
    meta = doc["meta"]
    assert meta["torch"] == torch.__version__ and meta["device_name"] == out_dir.name
    for key in ("date", "python", "triton", "git", "memory_method", "peaks", "settings"):
        assert key in meta
    assert meta["peaks"]["mm_flops"]["fp32"] > 0 and meta["peaks"]["copy_bytes_per_s"] > 0

    for name in ("fkd-fp32-time.png", "fkd-fp32-memory.png"):
        assert (out_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tiled_kernel_needs_less_memory_than_the_reference(quick_run):
    """The O(B^2) reference needs more memory than the O(B D) tiled kernel at B = 512."""
    if not _extension.loaded():
        pytest.skip("needs the compiled CPU kernels (fastkd._C): no cpu/tiled variant")
    *_, out_dir = quick_run
    with open(out_dir / "bench.csv", newline="") as f:
        at_512 = {
            r["variant"]: float(r["peak_step_mib"])
            for r in csv.DictReader(f)
            if r["batch"] == "512"
        }
    assert {"cpu/tiled", "reference/eager"} <= set(at_512), at_512
    assert at_512["reference/eager"] > 2 * at_512["cpu/tiled"], at_512


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sizes", "64"], "--sizes"),
        (["--sizes", "1x64"], "--sizes"),
        (["--dtype", "fp8"], "--dtype"),
    ],
)
def test_bad_arguments_name_the_option(argv, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        cli.main(["bench", "--device", "cpu", "--out", str(tmp_path), *argv])


def test_parse_sizes_and_group_names():
    cases = bench.parse_sizes("4096x256, 130x17x33")
    assert cases == [bench.Case(4096, 256, 256), bench.Case(130, 17, 33)]
    assert bench.group_name("fkd", "fwd+bwd", cases[0], torch.float32) == (
        "fkd-fwd+bwd-B4096-D256-fp32"
    )
    assert bench.group_name("fkd", "bwd", cases[1], torch.bfloat16) == "fkd-bwd-B130-D17x33-bf16"
