"""Global-batch losses on a real gloo process group (fastkd.distributed, SPEC §5).

Each world size runs every scenario inside ONE spawned group (tests/distributed_helpers.py):
FKD tiled/dual with one and two teachers, SP, RKD, SRD (function, eval mode, module with
running statistics), float64 and float32, DDP-averaged parameter gradients against one process
on the concatenated batch (1e-10 relative in float64), the autograd-aware collectives and the
errors raised on every rank. Every wait is bounded: the group has a 60 s timeout, the parent
waits a bounded time for the results and kills stragglers.
"""

from __future__ import annotations

import queue as queue_module
import socket
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))  # the spawned workers import the helpers

import distributed_helpers  # noqa: E402

from fastkd import distributed as fd  # noqa: E402

RESULT_TIMEOUT_S = 240  # start-up of W processes on a loaded 2-core machine included


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_group(world: int, sizes: tuple[int, ...]) -> dict:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=distributed_helpers.worker, args=(rank, world, port, sizes, results))
        for rank in range(world)
    ]
    for p in procs:
        p.start()
    out, deadline = {}, time.monotonic() + RESULT_TIMEOUT_S
    try:
        while len(out) < world:
            try:
                rank, failures = results.get(timeout=max(1.0, deadline - time.monotonic()))
            except queue_module.Empty:
                break
            out[rank] = failures
    finally:
        for p in procs:
            p.join(timeout=10)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
    missing = sorted(set(range(world)) - set(out))
    assert not missing, f"ranks {missing} sent no result within {RESULT_TIMEOUT_S} s (hang?)"
    return out


@pytest.mark.parametrize(
    ("world", "sizes"),
    [(2, (1, 6)), (3, (5, 7, 4))],
    ids=["W2-local-batch-1", "W3-uneven"],
)
def test_global_losses_on_gloo(world, sizes):
    results = _run_group(world, sizes)
    report = [
        f"rank {rank} {name}:\n{trace}"
        for rank, failures in sorted(results.items())
        for name, trace in failures
    ]
    assert not report, "\n".join(report)


def test_without_process_group_is_an_error():
    assert not dist.is_initialized()
    x = torch.randn(4, 3)
    calls = [
        lambda: fd.global_fkd_loss(x, x),
        lambda: fd.global_sp_loss(x, x),
        lambda: fd.global_rkd_distance_loss(x, x),
        lambda: fd.global_srd_loss(x, x),
        lambda: fd.GlobalSRDLoss(3, 3)(x, x),
        lambda: fd.explain_global_fkd(x, x),
        lambda: fd.all_gather_with_grad(x),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match="init_process_group"):
            call()


def test_plan_prefers_grams_for_large_batches_and_gather_for_tiny_ones():
    big = fd.plan_global_fkd([4096] * 4, 128, 128)
    assert big.algorithm == "dual", big.reason
    # traffic: the Grams do not grow with B, the gathered features do
    assert big.dual_bytes < big.gather_bytes
    assert fd.plan_global_fkd([8192] * 4, 128, 128).dual_bytes == big.dual_bytes
    small = fd.plan_global_fkd([2, 2], 1024, [1024, 512])
    assert small.algorithm == "tiled", small.reason
    forced = fd.plan_global_fkd([2, 2], 1024, 1024, algorithm="dual")
    assert forced.algorithm == "dual" and "forced" in forced.reason
    assert fd.plan_global_fkd([3, 1], 8, 8).batch == 4
    with pytest.raises(ValueError, match="algorithm"):
        fd.plan_global_fkd([2, 2], 8, 8, algorithm="fast")


def test_plan_bytes_follow_the_ring_model():
    world, b, ds, dt = 4, 100, 16, 8
    plan = fd.plan_global_fkd([b] * world, ds, dt, element_size=4)
    shake = (world - 1) * (5 + 12) * 8
    grams = ds * (ds + 1) // 2 + ds * dt + dt * (dt + 1) // 2 + 1
    assert plan.dual_bytes == 2 * (world - 1) * grams * 8 // world + shake
    assert plan.gather_bytes == (world - 1) * b * (ds + dt) * 4 + shake
