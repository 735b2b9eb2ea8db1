"""Global-batch losses on a real gloo process group (fastkd.distributed, SPEC §5).

Each world size runs every scenario inside ONE spawned group (tests/distributed_helpers.py),
mostly through the public losses with ``global_batch=True`` (fastkd.fkd_loss / FKDLoss, sp_loss
/ SPLoss, rkd_distance_loss / RKDDistanceLoss, srd_loss / SRDLoss) and partly through
fastkd.distributed directly: FKD tiled/dual with one and two teachers, SP, RKD, SRD (function,
eval mode, module with running statistics), float64 and float32, DDP-averaged parameter
gradients against one process on the concatenated batch (1e-10 relative in float64), the
autograd-aware collectives, torch.compile around the global losses (W = 2), a process_group
that is a subgroup (W = 3) and the errors raised on every rank. Every wait is bounded: the
group has a 60 s timeout, the parent waits a bounded time for the results and kills stragglers.
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

import fastkd  # noqa: E402
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


PUBLIC_GLOBAL = [
    lambda x, **kw: fastkd.fkd_loss(x, x, **kw),
    lambda x, **kw: fastkd.FKDLoss(0.5, 0.5, **kw)(x, x),
    lambda x, **kw: fastkd.sp_loss(x, x, **kw),
    lambda x, **kw: fastkd.SPLoss(**kw)(x, x),
    lambda x, **kw: fastkd.rkd_distance_loss(x, x, **kw),
    lambda x, **kw: fastkd.RKDDistanceLoss(**kw)(x, x),
    lambda x, **kw: fastkd.srd_loss(x, x, **kw),
    lambda x, **kw: fastkd.SRDLoss(3, 3, **kw)(x, x),
]
PUBLIC_IDS = ["fkd", "FKDLoss", "sp", "SPLoss", "rkd", "RKDLoss", "srd", "SRDLoss"]


@pytest.mark.parametrize("call", PUBLIC_GLOBAL, ids=PUBLIC_IDS)
def test_public_losses_with_global_batch_need_a_process_group(call):
    """global_batch=True never falls back to the local loss; the flag is a bool; a group
    without global_batch=True is an error too; global_batch=False is the local loss."""
    assert not dist.is_initialized()
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="init_process_group"):
        call(x, global_batch=True)
    with pytest.raises(TypeError, match="global_batch must be a bool"):
        call(x, global_batch=1)
    with pytest.raises(ValueError, match="process_group is only used with global_batch=True"):
        call(x, process_group=object())
    assert torch.isfinite(call(x, global_batch=False))


def test_modules_show_global_batch_and_the_alias_is_global():
    for module in (
        fastkd.FKDLoss(global_batch=True),
        fastkd.SPLoss(global_batch=True),
        fastkd.RKDDistanceLoss(global_batch=True),
        fastkd.SRDLoss(3, 4, global_batch=True),
        fd.GlobalSRDLoss(3, 4),
    ):
        assert "global_batch=True" in repr(module), repr(module)
        assert module.process_group is None
    assert "global_batch=False" in repr(fastkd.FKDLoss())
    assert isinstance(fd.GlobalSRDLoss(3, 3), fastkd.SRDLoss)
    with pytest.raises(TypeError, match="always global"):
        fd.GlobalSRDLoss(3, 3, global_batch=False)


def test_fullgraph_compile_of_a_global_loss_says_it_runs_eagerly():
    """The shape handshake cannot be traced: fullgraph=True raises at trace time (before any
    collective, so without a process group too) with the documented reason."""
    x = torch.randn(4, 3)
    compiled = torch.compile(
        lambda a: fastkd.fkd_loss(a, a, global_batch=True), fullgraph=True, backend="eager"
    )
    with pytest.raises(Exception, match="global_batch=True.*run eagerly"):
        compiled(x)


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
