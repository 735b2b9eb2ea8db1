"""The ``auto`` choice of the global FKD algorithm: all-reduced Grams ("dual") or gathered
features ("tiled"), by a cost model of compute AND communication.

    dual  : each rank forms its local Grams and the gradient from the reduced ones:
            ~2 B_r (Ds + Dt)^2 flops in float64 on rank r (the slowest rank sets the pace), and
            ONE all_reduce of the packed Grams: Ds(Ds+1)/2 + Ds Dt + Dt(Dt+1)/2 + 1 float64
            values, traffic independent of B.
    tiled : every rank all_gathers the features (B x (Ds + Dt), padded to W max(B_r) rows) and
            runs the fused kernel-space loss on the whole global batch: ~3 B^2 (Ds + Dt) flops
            in the accumulation dtype, redundantly on every rank.

Bytes are what ONE rank receives under the usual algorithms (ring all_reduce: 2 (W-1)/W x the
buffer; all_gather: the other W - 1 ranks' padded blocks). Seconds = flops / rate + bytes /
bandwidth + collectives x latency, with the rates of :data:`COST_MODELS` (per device type; the
CPU numbers are calibrated by ``benchmarks/distributed_bench.py`` on gloo, the CUDA ones are
conservative data-centre figures). The choice depends only on quantities every rank knows after
the shape handshake, so every rank picks the same algorithm.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fastkd.distributed import _inputs
from fastkd.distributed.collectives import comm_device, dtype_code, handshake, require_group

ALGORITHMS = ("auto", "tiled", "dual")
ALGORITHM_CODES = {"auto": 0, "tiled": 1, "dual": 2}
HANDSHAKE_VALUES = 5 + 12  # int64 values per rank in the shape handshake


@dataclass(frozen=True)
class CostModel:
    """Throughputs of one device type, for the ``auto`` choice.

    tiled_flops: flop/s of the fused kernel-space FKD (fp32 accumulation).
    dual_flops: flop/s of float64 GEMMs (the dual path forms its Grams in float64).
    bandwidth: bytes/s a rank receives through the process group's collectives.
    latency: seconds per collective call.
    """

    tiled_flops: float
    dual_flops: float
    bandwidth: float
    latency: float


COST_MODELS = {
    # Fitted to benchmarks/results/distributed-cpu.md (gloo on a shared 2-core VM, one thread
    # per rank): the fused fp32 tiled kernels reach ~5x the flop rate of float64 GEMMs there.
    "cpu": CostModel(tiled_flops=1e10, dual_flops=2e9, bandwidth=1.0e9, latency=2e-4),
    # Conservative H100-class numbers: fp32 CUDA-core kernels, fp64 tensor-core GEMMs, NCCL.
    "cuda": CostModel(tiled_flops=2e13, dual_flops=2e13, bandwidth=2e10, latency=3e-5),
}


@dataclass(frozen=True)
class GlobalFKDPlan:
    """What :func:`plan_global_fkd` chose and why. Costs are per rank and per loss call."""

    algorithm: str
    reason: str
    world_size: int
    batch_sizes: tuple[int, ...]
    student_width: int
    teacher_widths: tuple[int, ...]
    dual_bytes: int
    gather_bytes: int
    dual_flops: float
    tiled_flops: float
    dual_seconds: float
    tiled_seconds: float

    @property
    def batch(self) -> int:
        return sum(self.batch_sizes)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def dual_buffer_values(student_width: int, teacher_width: int) -> int:
    """float64 values in the dual path's single all_reduce (Gram triangles, cross Gram, the
    regulariser's sum of squares)."""
    ds, dt = student_width, teacher_width
    return ds * (ds + 1) // 2 + ds * dt + dt * (dt + 1) // 2 + 1


def communication_bytes(
    batch_sizes: Sequence[int], student_width: int, teacher_widths: Sequence[int], element_size: int
) -> tuple[int, int]:
    """(dual, gather) bytes one rank receives per call, the shape handshake included."""
    world = len(batch_sizes)
    dt = sum(teacher_widths)
    shake = (world - 1) * HANDSHAKE_VALUES * 8
    dual = 2 * (world - 1) * dual_buffer_values(student_width, dt) * 8 // world
    gather = (world - 1) * max(batch_sizes) * (student_width + dt) * element_size
    return dual + shake, gather + shake


def plan_global_fkd(
    batch_sizes: Sequence[int],
    student_width: int,
    teacher_widths: int | Sequence[int],
    *,
    element_size: int = 4,
    device_type: str = "cpu",
    algorithm: str = "auto",
    cost_model: CostModel | None = None,
) -> GlobalFKDPlan:
    """Choose the global FKD algorithm for these shapes; no communication.

    Args:
        batch_sizes: every rank's local batch size, in rank order (len = world size).
        student_width: Ds. teacher_widths: Dt, or the widths of an ensemble's teachers.
        element_size: bytes per gathered feature value (4 for float32, 8 for float64).
        device_type: "cpu" or "cuda" (picks the :data:`COST_MODELS` entry).
        algorithm: "auto" chooses by estimated seconds; "tiled"/"dual" are reported as forced.
        cost_model: overrides the device's :class:`CostModel`.

    Returns:
        a :class:`GlobalFKDPlan` with the choice, a one-line reason and both estimates.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    sizes = tuple(int(b) for b in batch_sizes)
    if not sizes or min(sizes) < 0 or sum(sizes) < 1:
        raise ValueError(f"batch_sizes must be non-negative with a positive sum, got {sizes}")
    widths = (teacher_widths,) if isinstance(teacher_widths, int) else tuple(teacher_widths)
    model = cost_model or COST_MODELS.get(device_type, COST_MODELS["cuda"])
    world, batch = len(sizes), sum(sizes)
    dsum = student_width + sum(widths)
    dual_bytes, gather_bytes = communication_bytes(sizes, student_width, widths, element_size)
    dual_flops = 2.0 * max(sizes) * dsum * dsum
    tiled_flops = 3.0 * batch * batch * dsum
    collectives = 1 if world == 1 else 2  # handshake + data
    dual_s = dual_flops / model.dual_flops + dual_bytes / model.bandwidth
    tiled_s = tiled_flops / model.tiled_flops + gather_bytes / model.bandwidth
    dual_s += collectives * model.latency
    tiled_s += collectives * model.latency
    numbers = (
        f"dual ~{dual_s * 1e3:.3g} ms ({dual_flops:.3g} flop, {dual_bytes} B received), "
        f"tiled ~{tiled_s * 1e3:.3g} ms ({tiled_flops:.3g} flop, {gather_bytes} B received)"
    )
    if algorithm == "auto":
        choice = "dual" if dual_s <= tiled_s else "tiled"
        reason = f"auto on {device_type}, W={world}, B={batch}, D={dsum}: {numbers}"
    else:
        choice = algorithm
        reason = f"forced by algorithm={algorithm!r}; estimates: {numbers}"
    return GlobalFKDPlan(
        algorithm=choice,
        reason=reason,
        world_size=world,
        batch_sizes=sizes,
        student_width=student_width,
        teacher_widths=widths,
        dual_bytes=dual_bytes,
        gather_bytes=gather_bytes,
        dual_flops=dual_flops,
        tiled_flops=tiled_flops,
        dual_seconds=dual_s,
        tiled_seconds=tiled_s,
    )


def explain_global_fkd(
    student: torch.Tensor,
    teacher: torch.Tensor | Sequence[torch.Tensor],
    *,
    algorithm: str = "auto",
    process_group=None,
) -> GlobalFKDPlan:
    """The plan :func:`fastkd.distributed.global_fkd_loss` would follow for these local inputs.

    A collective (every rank must call it: it exchanges the local batch sizes), returns the same
    :class:`GlobalFKDPlan` on every rank. ``str(plan.reason)`` says why.
    """
    group = require_group(process_group)
    checked, problem = _inputs.capture(lambda: _fkd_shapes(student, teacher, algorithm))
    device = comm_device(group, _inputs.device_of(student))
    fields = [] if problem else checked[1]
    batch = 0 if problem else student.shape[0]
    hs = handshake("fkd", group, device, batch, fields, problem)
    return plan_for(hs, student, checked[0], algorithm)


def plan_for(hs, student: torch.Tensor, teachers: Sequence[torch.Tensor], algorithm: str):
    """Plan from a completed handshake (identical on every rank)."""
    return plan_global_fkd(
        hs.batch_sizes,
        student.shape[1],
        [t.shape[1] for t in teachers],
        element_size=max(student.element_size(), *(t.element_size() for t in teachers)),
        device_type=student.device.type,
        algorithm=algorithm,
    )


def _fkd_shapes(student, teacher, algorithm):
    """Validated (teachers, handshake fields) of the FKD inputs."""
    _inputs.features(student, "student")
    teachers = _inputs.teachers(teacher, student)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    fields = [
        ("algorithm", ALGORITHM_CODES[algorithm]),
        ("student width", student.shape[1]),
        ("student dtype", dtype_code(student.dtype)),
        ("teachers", len(teachers)),
    ]
    for i, t in enumerate(teachers):
        fields += [
            (f"teacher[{i}] width", t.shape[1]),
            (f"teacher[{i}] dtype", dtype_code(t.dtype)),
        ]
    return teachers, fields
