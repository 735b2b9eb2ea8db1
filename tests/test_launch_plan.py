"""The FKD backward launch planner (csrc/include/fastkd/launch_plan.h), without a GPU: the C++
unit test tests/cpp/test_launch_plan.cpp compiled with g++ checks its properties and prints the
grid of every shape; here the grids are checked again, independently, against the work they
split and the 2-blocks-per-SM target on a 132-SM (H100) and a 108-SM (A100) device."""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "tests" / "cpp" / "test_launch_plan.cpp"
HEADER = ROOT / "csrc" / "include" / "fastkd" / "launch_plan.h"

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")


@pytest.fixture(scope="module")
def grids(tmp_path_factory) -> dict[tuple[int, int, int, int], tuple[int, int, int]]:
    exe = tmp_path_factory.mktemp("plan") / "test_launch_plan"
    cmd = ["g++", "-std=c++17", "-O1", "-Wall", "-Werror", "-I", str(ROOT / "csrc" / "include")]
    subprocess.run([*cmd, str(SOURCE), "-o", str(exe)], check=True, capture_output=True)
    proc = subprocess.run([str(exe)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = [tuple(map(int, line.split())) for line in proc.stdout.splitlines()]
    return {r[:4]: r[4:] for r in rows}


def work(batch: int, width: int, size: int) -> tuple[int, int, int]:
    """Row blocks, most J splits (groups of 4 / 2 / 1 tiles, at most 8), most column slices."""
    nb = math.ceil(batch / 64)
    group = {2: 4, 4: 2, 8: 1}[size]
    return nb, min(math.ceil(nb / group), 8), math.ceil(width / 64)


def test_every_shape_is_planned(grids):
    assert len(grids) == 2 * 3 * 9 * 7


@pytest.mark.parametrize("sms", [132, 108])
@pytest.mark.parametrize("size", [2, 4, 8])
@pytest.mark.parametrize("batch", [256, 512, 1024, 4096, 16384])
@pytest.mark.parametrize("width", [64, 128, 512, 2048])
def test_grid_fills_the_device_or_takes_all_the_work(grids, sms, size, batch, width):
    rows, j, c = grids[(sms, size, batch, width)]
    nb, max_j, max_c = work(batch, width, size)
    assert rows == nb
    assert 1 <= j <= max_j and 1 <= c <= max_c  # never more splits than the work holds
    blocks = rows * j * c
    if nb * max_j * max_c >= 2 * sms:
        assert blocks >= 2 * sms
    else:
        assert (j, c) == (max_j, max_c)


@pytest.mark.parametrize("sms", [132, 108])
@pytest.mark.parametrize("size", [2, 4, 8])
@pytest.mark.parametrize("batch", [1, 63, 64, 65, 256, 512, 1024, 4096, 16384])
def test_j_splits_are_the_previous_backward_splits(grids, sms, size, batch):
    """fkd.cu takes the plan's J splits (column limit 1): the split count, and so the results,
    of every shape are those of fkd_cuda.h backward_splits before the planner."""
    nb, max_j, _ = work(batch, 512, size)
    old = max(1, min(math.ceil(2 * sms / nb), max_j))
    assert grids[(sms, size, batch, 512)][1] == old


def test_large_batches_fill_132_sms_with_j_splits_alone(grids):
    """From B = 4096 (64 row blocks) J splits reach 2 blocks per SM without column slices."""
    for size in (2, 4, 8):
        for batch in (4096, 16384):
            rows, j, c = grids[(132, size, batch, 512)]
            assert rows * j >= 264 and c == 1
