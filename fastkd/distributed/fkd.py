"""Global-batch FKD (SPEC §1 and §5) over all ranks of a process group.

The loss is FKD on the concatenation of every rank's batch in rank order, identical on every
rank. Two exact algorithms:

dual (feature space)
    With A_r = normalize(F_r) and T_r the normalised teachers side by side, scaled by 1/sqrt(E),
    the Grams are sums of local Grams: A^T A = sum_r A_r^T A_r, A^T T, T^T T. ONE all_reduce
    of one float64 buffer (the Grams' upper triangles, the cross Gram and the regulariser's sum
    of squares) gives the loss ``kd (||A^T A||^2 - 2 ||A^T T||^2 + ||T^T T||^2) / B^2 + fr
    sum F^2 / (B Ds)``, and this rank's gradient ``G_r = (4 kd / B^2)(A_r (A^T A) - T_r (T^T A))``
    (then the normalisation's chain rule) needs only the reduced Grams: no feature gathering,
    traffic independent of B, nothing communicated in backward.
tiled (kernel space)
    Every rank all_gathers the features (uneven batches padded) and runs :func:`fastkd.fkd_loss`
    with ``algorithm="tiled"`` and the requested fused backend on the WHOLE global batch: every
    rank computes the full B x B sweep (redundant: W x the work of a row-block split, which this
    version does not do). Its gradient on the gathered batch is identical on every rank, so this
    rank's rows are sliced out locally.

Scaling (SPEC §5): the gradients a rank's own rows receive are ``W x dL/dF_r``. Under
DistributedDataParallel, which averages parameter gradients over the W ranks, the parameter
gradients then equal those of one process computing the loss on the concatenated batch. Without
DDP's averaging (e.g. summing gradients yourself) you get W x the single-process gradient:
divide by W. Both paths compute the gradient in the forward pass and assume every rank
backpropagates the same upstream gradient into the loss (true when every rank runs the same
training step).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch.autograd.function import once_differentiable

from fastkd.distributed import _inputs
from fastkd.distributed.collectives import (
    COMPILE_REASON,
    Handshake,
    all_reduce_sum,
    comm_device,
    gathered_loss,
    handshake,
    require_group,
)
from fastkd.distributed.plan import _fkd_shapes, plan_for
from fastkd.losses._common import save_optional, scaled_optional
from fastkd.losses.fkd import fkd_loss
from fastkd.reference import NORM_EPS
from fastkd.registry import resolve_backend
from fastkd.validation import check_precision


def _normalized(x: torch.Tensor, scale: float = 1.0):
    """(scale x_i / max(||x_i||, eps), 1 / max(||x_i||, eps)) in float64: (B, D), (B, 1)."""
    a = x.to(torch.float64, copy=True)
    inv = torch.linalg.vector_norm(a, dim=1, keepdim=True).clamp_min(NORM_EPS).reciprocal_()
    a.mul_(inv * scale)
    return a, inv


def _normalize_backward(grad_a: torch.Tensor, a: torch.Tensor, inv: torch.Tensor, scale: float):
    """dL/dx for a = scale * x / max(||x||, eps): ``scale (g - (g.â) â) / max(||x||, eps)`` with
    â = a / scale (in place on ``grad_a``)."""
    dot = (grad_a * a).sum(1, keepdim=True) / (scale * scale)
    return grad_a.sub_(a * dot).mul_(inv * scale)


@functools.lru_cache(maxsize=16)
def _triangle(n: int, device: torch.device) -> torch.Tensor:
    """Flat indices of the upper triangle (diagonal included) of an n x n matrix."""
    rows, cols = torch.triu_indices(n, n, device=device)
    return rows * n + cols


def _pack_symmetric(m: torch.Tensor) -> torch.Tensor:
    return m.reshape(-1)[_triangle(m.shape[0], m.device)]


def _unpack_symmetric(packed: torch.Tensor, n: int) -> torch.Tensor:
    upper = packed.new_zeros(n * n)
    upper[_triangle(n, packed.device)] = packed
    upper = upper.view(n, n)
    return upper + upper.T - torch.diag_embed(upper.diagonal())


class _GlobalFKDDual(torch.autograd.Function):
    """``apply(kd_weight, fr_weight, hs, group, student, *teachers)`` -> 0-dim global loss.

    student (B_r, Ds), teachers (B_r, Dt_e) on this rank; float32 loss (float64 if an input is
    float64); gradients in each input's dtype, W x the single-process ones on this rank's rows.
    """

    @staticmethod
    def forward(ctx, kd_weight, fr_weight, hs: Handshake, group, student, *teachers):
        out_dtype = (
            torch.float64
            if any(x.dtype == torch.float64 for x in (student, *teachers))
            else torch.float32
        )
        ds = student.shape[1]
        root = math.sqrt(len(teachers))
        a, inv_s = _normalized(student)
        parts = [_normalized(t, 1.0 / root) for t in teachers]
        t = torch.cat([p[0] for p in parts], dim=1)
        dt = t.shape[1]
        sum_sq = student.to(torch.float64).square().sum().reshape(1)
        buffer = torch.cat(
            [_pack_symmetric(a.T @ a), (a.T @ t).reshape(-1), _pack_symmetric(t.T @ t), sum_sq]
        )
        buffer = all_reduce_sum(buffer, group)
        n_s = ds * (ds + 1) // 2
        gram_s = _unpack_symmetric(buffer[:n_s], ds)
        cross = buffer[n_s : n_s + ds * dt].view(ds, dt)
        gram_t = _unpack_symmetric(buffer[n_s + ds * dt : -1], dt)
        b = hs.batch
        total = gram_s.square().sum() - 2.0 * cross.square().sum() + gram_t.square().sum()
        loss = kd_weight * total.clamp_min(0.0) / (b * b)
        if fr_weight != 0.0:
            loss = loss + fr_weight * buffer[-1] / (b * ds)

        world = hs.world_size
        scale = world * kd_weight * 4.0 / (b * b)
        needs = ctx.needs_input_grad[4:]
        grads: list[torch.Tensor | None] = [None] * len(needs)
        if needs[0]:
            grad_a = (a @ gram_s - t @ cross.T).mul_(scale)
            g = _normalize_backward(grad_a, a, inv_s, 1.0)
            if fr_weight != 0.0:
                g.add_(student.to(torch.float64), alpha=world * fr_weight * 2.0 / (b * ds))
            grads[0] = g.to(student.dtype)
        if any(needs[1:]):
            # dL/dT = -scale (A (A^T T) - T (T^T T)); T's blocks are normalize(ft_e) / sqrt(E).
            grad_t = (t @ gram_t - a @ cross).mul_(scale)
            col = 0
            for e, te in enumerate(teachers):
                cols = slice(col, col + te.shape[1])
                if needs[1 + e]:
                    g = _normalize_backward(grad_t[:, cols], parts[e][0], parts[e][1], 1.0 / root)
                    grads[1 + e] = g.to(te.dtype)
                col = cols.stop
        save_optional(ctx, grads)
        return loss.to(out_dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        return None, None, None, None, *scaled_optional(ctx, grad)


@torch.compiler.disable(reason=COMPILE_REASON)
def global_fkd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor | Sequence[torch.Tensor],
    kd_weight: float = 1.0,
    fr_weight: float = 0.0,
    *,
    algorithm: str = "auto",
    backend: str | None = None,
    precision: str = "ieee",
    process_group=None,
) -> torch.Tensor:
    """FKD loss over the global batch (all ranks' rows concatenated in rank order; SPEC §5).

    A collective: every rank of ``process_group`` must call it with the same widths, dtypes,
    number of teachers and ``algorithm``; local batch sizes may differ (and be 1) as long as the
    global batch has >= 2 rows. A mismatch or an invalid input on any rank raises on every rank.

    Args:
        student: (B_r, Ds) float16/bfloat16/float32/float64 on this rank.
        teacher: (B_r, Dt) or a list of E tensors (B_r, Dt_e) (ensemble), usually under no_grad.
        kd_weight, fr_weight: finite weights of the kernel term and the feature regulariser
            ``mean(F^2)`` over the global batch.
        algorithm: "dual" (all_reduce of the D x D Grams), "tiled" (gather, fused kernel-space
            loss on the global batch) or "auto" (cost model of compute and communication,
            :func:`fastkd.distributed.plan_global_fkd`; the same choice on every rank).
        backend: fused backend of the tiled path ("auto" | "cpu" | "cuda" | "triton" |
            "reference"; None reads $FASTKD_BACKEND); the dual path is plain GEMMs on the
            features' device and ignores it.
        precision: float32 products of the tiled path's kernels (SPEC §6), as in
            :func:`fastkd.fkd_loss`; the dual path ignores it (full fp32 or better).
        process_group: None for the default group.

    Returns:
        0-dim loss, float32 (float64 if an input is float64), identical on every rank. Backward
        gives this rank's rows W x dL/dF_r (exact single-process gradients after DDP averaging).

    Raises:
        RuntimeError if torch.distributed is not initialised; ValueError/TypeError (on every
        rank) for bad or mismatched inputs.

    ``fastkd.fkd_loss(..., global_batch=True)`` and ``FKDLoss(global_batch=True)`` call this.
    Under ``torch.compile`` it runs eagerly (a graph break; ``fullgraph=True`` raises).
    """
    group = require_group(process_group)

    def check():
        teachers, fields = _fkd_shapes(student, teacher, algorithm)
        resolve_backend("fkd", backend, student.device)  # also on the dual path: no typo passes
        check_precision(precision)
        return (
            teachers,
            fields,
            _inputs.number(kd_weight, "kd_weight"),
            _inputs.number(fr_weight, "fr_weight"),
        )

    checked, problem = _inputs.capture(check)
    device = comm_device(group, _inputs.device_of(student))
    if problem is not None:
        handshake("fkd", group, device, 0, [], problem)
    teachers, fields, kd, fr = checked
    hs = handshake("fkd", group, device, student.shape[0], fields)
    plan = plan_for(hs, student, teachers, algorithm)
    if plan.algorithm == "dual":
        return _GlobalFKDDual.apply(kd, fr, hs, group, student, *teachers)

    def loss_fn(s, *ts):
        return fkd_loss(
            s, list(ts), kd, fr, backend=backend, algorithm="tiled", precision=precision
        )

    return gathered_loss(
        loss_fn, hs, group, student.contiguous(), *[t.contiguous() for t in teachers]
    )
