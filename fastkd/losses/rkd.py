"""RKD distance loss (Park et al., CVPR 2019; SPEC §2, RepDistiller / torchdistill convention):
Function, functional, Module.

Recipe (as every loss of :mod:`fastkd.losses`): validate (:mod:`fastkd.validation`) -> resolve
the backend (:mod:`fastkd.registry`) -> choose the algorithm (one: "tiled") ->
:func:`fastkd.reference.rkd_distance_loss` for the reference backend, else
``RKDFunction.apply(backend, student, teacher)`` on the registry's kernels ->
:class:`RKDDistanceLoss`.

The tiled kernels, ``cpu`` (``csrc/cpu/rkd.cpp``), ``cuda`` (``csrc/cuda/rkd.cu``) and ``triton``
(``fastkd/triton/rkd.py``), make three sweeps over the distance tiles: O(B D) extra memory
instead of about a dozen B x B matrices.

``global_batch=True`` hands the call to :func:`fastkd.distributed.global_rkd_distance_loss`
(the loss of every rank's rows, SPEC §5: gather, then this module's kernels on the global batch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from fastkd import reference
from fastkd.losses._common import scale_saved, wants_global
from fastkd.registry import kernels, resolve_backend
from fastkd.validation import check_algorithm, check_pair, check_precision

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

OP = "rkd"
ALGORITHMS = ("auto", "tiled")

__all__ = ["ALGORITHMS", "RKDDistanceLoss", "RKDFunction", "rkd_distance_loss"]


class RKDFunction(torch.autograd.Function):
    """Autograd Function running the RKD distance kernels of one fused backend.

    ``apply(backend, precision, student, teacher)`` with ``precision`` "ieee" | "tf32x3" |
    "tf32" (SPEC §6, passed to the kernels), student (B, Ds) and teacher (B, Dt) contiguous, any
    floating dtypes; returns the 0-dim loss in float32 (float64 if an input is float64). When an
    input requires grad and the backend has a forward-backward kernel, the forward pass computes
    the gradients with the loss (the sweeps that give the loss are the first two of the three the
    gradient needs) and backward only scales them; otherwise backward calls the backward kernel.
    """

    @staticmethod
    def forward(ctx, backend: str, precision: str, student, teacher):
        ops = kernels(OP, backend)
        ctx.backend = backend
        ctx.precision = precision
        ctx.teacher_grad = bool(ctx.needs_input_grad[3])
        ctx.fused = ops.forward_backward is not None and any(ctx.needs_input_grad[2:])
        if ctx.fused:
            loss, grad_s, grad_t = ops.forward_backward(
                student, teacher, ctx.teacher_grad, precision
            )
            ctx.save_for_backward(grad_s, grad_t)
            return loss
        ctx.save_for_backward(student, teacher)
        return ops.forward(student, teacher, precision)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        if ctx.fused:
            grad_s, grad_t = (scale_saved(g, grad) for g in ctx.saved_tensors)
        else:
            student, teacher = ctx.saved_tensors
            grad_s, grad_t = kernels(OP, ctx.backend).backward(
                grad, student, teacher, ctx.teacher_grad, ctx.precision
            )
        return (
            None,
            None,
            grad_s if ctx.needs_input_grad[2] else None,
            grad_t if ctx.teacher_grad else None,
        )


def rkd_distance_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    backend: str | None = None,
    algorithm: str = "auto",
    precision: str = "ieee",
    global_batch: bool = False,
    process_group: ProcessGroup | None = None,
) -> torch.Tensor:
    """RKD distance loss. student (B, ...), teacher (B, ...) (flattened to (B, D)), B >= 2.

    ``d_ij = sqrt(clamp_min(|f_i|^2 + |f_j|^2 - 2 f_i.f_j, 1e-12))``, ``d_ii = 0``, each side
    divided by its mean off-diagonal distance; ``loss = mean_ij smooth_l1(d_S, d_T)`` with
    beta = 1 (0-dim, float32, or float64 if an input is float64; float16/bfloat16 inputs
    accumulate in float32). The teacher gets its gradient if it requires grad. ``backend``:
    "auto" | "cpu" | "cuda" | "triton" | "reference" (see :mod:`fastkd.registry`); the kernels
    need O(B D) extra memory, the reference about a dozen B x B matrices at its peak.
    ``algorithm``: "auto" or "tiled" (the only one; ignored by the reference backend).
    ``precision``: products of float32 inputs on the cuda and triton backends (SPEC §6): "ieee"
    (default; full fp32, ~1e-6 relative error of the loss), "tf32x3" (split fp32 on tensor
    cores, ~1e-6) or "tf32" (one TF32 product, ~1e-3; the distances of near rows suffer most).
    Independent of torch's global TF32 flags; the cpu and reference backends always compute full
    fp32; 16-bit and float64 inputs ignore it.

    ``global_batch=True``: the loss of the GLOBAL batch (every rank's rows in rank order, SPEC
    §5) through :func:`fastkd.distributed.global_rkd_distance_loss`, a collective every rank of
    ``process_group`` (None: the default group) must call; local batches may differ (>= 1 each,
    global >= 2). Every rank gathers the features and runs ``backend`` on the whole global batch
    (the B x B sweeps are repeated on every rank); the loss is identical on every rank and this
    rank's rows get W x dL/dF_r, so DDP's averaging yields the single-process gradients. Needs
    an initialised process group (``RuntimeError`` otherwise); runs eagerly under
    ``torch.compile`` (a graph break).
    """
    if wants_global(global_batch, process_group):
        # Lazily: fastkd.distributed imports the losses. Its checks join the ranks' handshake.
        from fastkd.distributed.rkd import global_rkd_distance_loss

        return global_rkd_distance_loss(
            student,
            teacher,
            backend=backend,
            algorithm=algorithm,
            precision=precision,
            process_group=process_group,
        )
    flat_s, flat_t = check_pair(student, teacher)
    name = resolve_backend(OP, backend, flat_s.device)
    check_algorithm(algorithm, ALGORITHMS)
    precision = check_precision(precision)
    if name == "reference":
        return reference.rkd_distance_loss(flat_s, flat_t)
    return RKDFunction.apply(name, precision, flat_s.contiguous(), flat_t.contiguous())


class RKDDistanceLoss(nn.Module):
    """Module form of :func:`rkd_distance_loss`: ``RKDDistanceLoss()(student, teacher)``, with
    the same keywords (``global_batch=True``: the loss of the global batch)."""

    def __init__(
        self,
        *,
        backend: str | None = None,
        algorithm: str = "auto",
        precision: str = "ieee",
        global_batch: bool = False,
        process_group: ProcessGroup | None = None,
    ):
        super().__init__()
        self.backend = backend
        self.algorithm = check_algorithm(algorithm, ALGORITHMS)
        self.precision = check_precision(precision)
        self.global_batch = wants_global(global_batch, process_group)
        self.process_group = process_group

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return rkd_distance_loss(
            student,
            teacher,
            backend=self.backend,
            algorithm=self.algorithm,
            precision=self.precision,
            global_batch=self.global_batch,
            process_group=self.process_group,
        )

    def extra_repr(self) -> str:
        return (
            f"backend={self.backend!r}, algorithm={self.algorithm!r}, "
            f"precision={self.precision!r}, global_batch={self.global_batch}"
        )
