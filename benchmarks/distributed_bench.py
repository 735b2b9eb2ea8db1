"""Global-batch FKD on CPU processes (gloo): all-reduced Grams ("dual") vs gathered features
("tiled"), step time and bytes communicated, and what ``auto`` picks.

    python benchmarks/distributed_bench.py                 # default grid, a few minutes
    python benchmarks/distributed_bench.py --full          # B_local 256..4096, D 128..1024
    python benchmarks/distributed_bench.py --worlds 2 --b-local 256,1024 --widths 128

For each world size W, W processes (one thread each) join one gloo group on 127.0.0.1 and time
a training step (forward + backward of ``global_fkd_loss`` w.r.t. the student, teacher under
no_grad) for both algorithms at every (B_local, D) point, Ds = Dt = D, float32, the fused
``cpu`` backend on the tiled path. A step's time is the median over repeats of the slowest
rank. Bytes are what one rank receives per step under the ring model (all_reduce: 2 (W-1)/W x
buffer; all_gather: the other ranks' blocks), computed from the buffers actually handed to
the collectives (counted by wrapping torch.distributed), handshake included; they match
:func:`fastkd.distributed.plan_global_fkd`. Points whose estimated step exceeds
``--max-seconds`` are skipped (shown as "skip"). Results: a Markdown table (default
``benchmarks/results/distributed-cpu.md``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import queue as queue_module
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastkd import distributed as fd

ROOT = Path(__file__).resolve().parent


class ByteCounter:
    """Wraps dist.all_gather / all_reduce and adds up what one rank receives (ring model)."""

    def __init__(self):
        self.received = 0
        self._gather, self._reduce = dist.all_gather, dist.all_reduce

    def __enter__(self):
        def all_gather(parts, tensor, group=None, async_op=False):
            self.received += (len(parts) - 1) * tensor.numel() * tensor.element_size()
            return self._gather(parts, tensor, group=group, async_op=async_op)

        def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
            w = dist.get_world_size(group)
            self.received += 2 * (w - 1) * tensor.numel() * tensor.element_size() // w
            return self._reduce(tensor, op=op, group=group, async_op=async_op)

        dist.all_gather, dist.all_reduce = all_gather, all_reduce
        return self

    def __exit__(self, *exc):
        dist.all_gather, dist.all_reduce = self._gather, self._reduce


def time_step(algorithm: str, b_local: int, width: int, repeats: int, seed: int):
    """(median seconds of the slowest rank, bytes received per step) for one point."""
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(seed + rank)
    student = torch.randn(b_local, width, generator=gen).requires_grad_()
    teacher = torch.randn(b_local, width, generator=gen)

    def step():
        loss = fd.global_fkd_loss(student, teacher, algorithm=algorithm, backend="cpu")
        loss.backward()
        student.grad = None

    with ByteCounter() as counter:
        step()  # warm-up, and the byte count of one step
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        step()
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        times.append(elapsed.item())
    return statistics.median(times), counter.received


def worker(rank, world, port, grid, repeats, max_seconds, results):
    torch.set_num_threads(1)
    rows = []
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=300),
        )
        for b_local, width in grid:
            plan = fd.plan_global_fkd([b_local] * world, width, width, element_size=4)
            row = {"W": world, "B_local": b_local, "D": width, "auto": plan.algorithm}
            for algo, estimate in (("dual", plan.dual_seconds), ("tiled", plan.tiled_seconds)):
                if estimate > max_seconds:
                    row[algo] = None
                    row[f"{algo}_bytes"] = plan.dual_bytes if algo == "dual" else plan.gather_bytes
                    continue
                seconds, received = time_step(algo, b_local, width, repeats, seed=b_local + width)
                row[algo], row[f"{algo}_bytes"] = seconds, received
            rows.append(row)
            if rank == 0:
                print(_line(row), flush=True)
        dist.barrier()
        dist.destroy_process_group()
    except Exception as exc:  # reported by the parent
        rows.append({"error": f"rank {rank}: {type(exc).__name__}: {exc}"})
    if rank == 0 or rows and "error" in rows[-1]:
        results.put((rank, rows))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world, grid, repeats, max_seconds, timeout):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    args = (world, port, grid, repeats, max_seconds, results)
    procs = [ctx.Process(target=worker, args=(rank, *args)) for rank in range(world)]
    for p in procs:
        p.start()
    try:
        rank, rows = results.get(timeout=timeout)
    except queue_module.Empty:
        rows = [{"error": f"no result within {timeout} s"}]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return rows


def _ms(seconds):
    return "skip" if seconds is None else f"{seconds * 1e3:.2f}"


def _mib(n):
    return f"{n / 2**20:.3f}"


def _line(row):
    return (
        f"W={row['W']} B_local={row['B_local']} D={row['D']}: dual {_ms(row['dual'])} ms "
        f"({_mib(row['dual_bytes'])} MiB), tiled {_ms(row['tiled'])} ms "
        f"({_mib(row['tiled_bytes'])} MiB), auto -> {row['auto']}"
    )


def table(rows) -> str:
    head = (
        "| W | B_local | D (= Ds = Dt) | dual step (ms) | gather+tiled step (ms) | "
        "dual MiB received | gather MiB received | measured faster | auto picks |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---|---|\n"
    )
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"| error: {r['error']} ||||||||")
            continue
        if r["dual"] is not None and r["tiled"] is not None:
            faster = "dual" if r["dual"] <= r["tiled"] else "tiled"
        else:
            faster = "dual" if r["tiled"] is None else "tiled"
            faster += " (other skipped)"
        lines.append(
            f"| {r['W']} | {r['B_local']} | {r['D']} | {_ms(r['dual'])} | {_ms(r['tiled'])} | "
            f"{_mib(r['dual_bytes'])} | {_mib(r['tiled_bytes'])} | {faster} | {r['auto']} |"
        )
    return head + "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worlds", default="2,4")
    parser.add_argument("--b-local", default="256,1024,4096")
    parser.add_argument("--widths", default="128,256")
    parser.add_argument("--full", action="store_true", help="B_local 256..4096 x D 128..1024")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-seconds", type=float, default=2.0, help="skip slower points")
    parser.add_argument("--timeout", type=float, default=1800.0, help="per world size")
    parser.add_argument("--out", default=str(ROOT / "results" / "distributed-cpu.md"))
    args = parser.parse_args(argv)
    if args.full:
        args.b_local, args.widths = "256,512,1024,2048,4096", "128,256,512,1024"
    grid = [(b, d) for d in _ints(args.widths) for b in _ints(args.b_local)]
    rows = []
    started = time.time()
    for world in _ints(args.worlds):
        rows += run_world(world, grid, args.repeats, args.max_seconds, args.timeout)
    cpus = os.cpu_count()
    command = " ".join(sys.argv[1:] if argv is None else argv)
    text = (
        "# Global-batch FKD on CPU processes: all-reduced Grams vs gathered features\n\n"
        f"`python benchmarks/distributed_bench.py {command}`"
        f" on {platform.machine()} with {cpus} CPU cores ({platform.processor() or 'cpu'}), "
        f"torch {torch.__version__}, gloo over 127.0.0.1, one thread per process, float32, "
        f"Ds = Dt = D; {time.time() - started:.0f} s in all. Step = forward + backward of "
        "`global_fkd_loss` (student gradient), median of the slowest rank; bytes = received "
        "per rank per step (ring model, from the buffers handed to the collectives); 'skip' = "
        f"estimated over {args.max_seconds} s. With more processes than cores the ranks "
        "time-share the cores, so absolute times are pessimistic; the comparison between the "
        "two paths is what matters.\n\n" + table(rows)
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


if __name__ == "__main__":
    main()
