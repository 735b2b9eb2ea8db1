"""Feature Kernel Distillation (He & Ozay, ICLR 2022; SPEC §1): Function, functional, Module.

The recipe every loss of :mod:`fastkd.losses` follows:

1. validate the arguments (:mod:`fastkd.validation`);
2. resolve the backend (:func:`fastkd.registry.resolve_backend`);
3. choose the algorithm (:func:`choose_algorithm`: tiled kernel space or dual feature space);
4. run :func:`fastkd.reference.fkd_loss` for the reference backend, else
   :class:`FKDDualFunction` (plain GEMMs, any device) or ``FKDFunction.apply(backend, ...)``,
   which calls the registry's kernels: forward-backward when an input requires grad (the
   backward pass then only scales the saved gradients), forward otherwise (the backward pass
   then calls the backward kernel);
5. :class:`FKDLoss` wraps :func:`fkd_loss` with the same keywords.

``global_batch=True`` hands the call, before any local check, to
:func:`fastkd.distributed.global_fkd_loss` (the loss of all ranks' rows, SPEC §5): its checks
run inside the ranks' shape handshake, so a bad input on one rank raises on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from fastkd import reference
from fastkd.losses._common import DUAL_RATIO, prefers_dual, scale_saved, wants_global
from fastkd.losses.fkd_dual import FKDDualFunction
from fastkd.registry import kernels, resolve_backend
from fastkd.validation import (
    check_algorithm,
    check_features,
    check_finite_number,
    check_precision,
    check_teachers,
)

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

OP = "fkd"
ALGORITHMS = ("auto", "tiled", "dual")

__all__ = [
    "ALGORITHMS",
    "DUAL_RATIO",
    "FKDDualFunction",
    "FKDFunction",
    "FKDLoss",
    "choose_algorithm",
    "fkd_loss",
]


def choose_algorithm(algorithm: str, batch: int, student_width: int, teacher_width: int) -> str:
    """Resolve ``algorithm`` ("auto" | "tiled" | "dual"): "auto" is "dual" when
    B >= DUAL_RATIO * (Ds + Dt) (the cost model of :mod:`fastkd.losses._common`)."""
    check_algorithm(algorithm, ALGORITHMS)
    if algorithm != "auto":
        return algorithm
    return "dual" if prefers_dual(batch, student_width + teacher_width) else "tiled"


class FKDFunction(torch.autograd.Function):
    """Autograd Function running the tiled FKD kernels of one fused backend.

    ``apply(backend, precision, kd_weight, fr_weight, student, *teachers)``: ``backend`` is
    "cpu", "cuda" or "triton"; ``precision`` "ieee" | "tf32x3" | "tf32" (SPEC §6, passed to the
    kernels); student (B, Ds) and teachers (B, Dt_e) contiguous, any floating dtype.
    Returns the 0-dim loss in float32 (float64 if any input is float64). When an input requires
    grad and the backend has a forward-backward kernel, the forward pass computes the gradients
    in the same sweep and the backward pass only scales them (one pass over the kernels per
    training step instead of two); otherwise the backward pass recomputes the kernel tiles.
    Either way no B x B matrix is stored.
    """

    @staticmethod
    def forward(
        ctx, backend: str, precision: str, kd_weight: float, fr_weight: float, student, *teachers
    ):
        ops = kernels(OP, backend)
        ctx.backend = backend
        ctx.precision = precision
        ctx.weights = (kd_weight, fr_weight)
        ctx.num_teachers = len(teachers)
        ctx.teachers_grad = any(ctx.needs_input_grad[5:])
        ctx.fused = ops.forward_backward is not None and any(ctx.needs_input_grad[4:])
        if ctx.fused:
            loss, grad_student, grad_teachers = ops.forward_backward(
                student, list(teachers), kd_weight, fr_weight, ctx.teachers_grad, precision
            )
            ctx.save_for_backward(grad_student, *grad_teachers)
            return loss
        ctx.save_for_backward(student, *teachers)
        return ops.forward(student, list(teachers), kd_weight, fr_weight, precision)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        if ctx.fused:
            grad_student, *grad_teachers = ctx.saved_tensors
            grad_student = scale_saved(grad_student, grad)
            grad_teachers = [scale_saved(g, grad) for g in grad_teachers]
        else:
            student, *teachers = ctx.saved_tensors
            grad_student, grad_teachers = kernels(OP, ctx.backend).backward(
                grad, student, teachers, *ctx.weights, ctx.teachers_grad, ctx.precision
            )
        if not ctx.needs_input_grad[4]:
            grad_student = None
        grads = list(grad_teachers) if ctx.teachers_grad else [None] * ctx.num_teachers
        return None, None, None, None, grad_student, *grads


def fkd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor | Sequence[torch.Tensor],
    kd_weight: float = 1.0,
    fr_weight: float = 0.0,
    *,
    backend: str | None = None,
    algorithm: str = "auto",
    precision: str = "ieee",
    global_batch: bool = False,
    process_group: ProcessGroup | None = None,
) -> torch.Tensor:
    """FKD loss: kernel distillation plus feature regularisation (SPEC §1).

    ``loss = kd_weight * mean_ij (rho_S - rho_T)_ij^2 + fr_weight * mean(student^2)`` with
    ``rho_S = normalize(student) normalize(student)^T`` and ``rho_T`` the mean of the teachers'
    kernels. Widths may differ between student and teachers and among teachers.

    Args:
        student: (B, Ds) float16/bfloat16/float32/float64, B >= 2.
        teacher: (B, Dt) tensor or a list of E tensors (B, Dt_e) for ensemble distillation.
            Usually computed under ``torch.no_grad()``; if it requires grad it gets its gradient.
        kd_weight, fr_weight: finite weights of the two terms.
        backend: "auto" | "cpu" | "cuda" | "triton" | "reference"; None reads ``$FASTKD_BACKEND``
            (default "auto"). See :mod:`fastkd.registry`.
        algorithm: "tiled" (kernel space, O(B^2 D) time, O(B D) memory), "dual" (feature space,
            O(B D^2) time, O(D^2) memory) or "auto": dual when B >= 2 (Ds + Dt), else tiled.
            The dual's Grams are float64 where fp64 is fast (CPU, A100/H100-class GPUs), else
            a non-cancelling fp32 form (:mod:`fastkd.losses.fkd_dual`, docs/dual.md).
            Ignored by the reference backend, which forms the kernels explicitly.
        precision: products of float32 inputs on the cuda and triton backends (SPEC §6):
            "ieee" (default; full fp32, ~1e-6 relative error of the loss), "tf32x3" (split fp32
            on tensor cores, ~1e-6) or "tf32" (one TF32 product, ~1e-3). Independent of torch's
            global TF32 flags. The cpu and reference backends and the dual algorithm always
            compute at least full fp32; 16-bit and float64 inputs ignore it.
        global_batch: if True, the loss of the GLOBAL batch (every rank's rows concatenated in
            rank order; SPEC §5) through :func:`fastkd.distributed.global_fkd_loss`: a
            collective that every rank of the group must call. Local batches may differ (and be
            1; the global batch needs >= 2 rows). "dual" all_reduces the D x D Grams; "tiled"
            gathers the features and runs ``backend`` on the global batch; "auto" weighs compute
            and communication (:func:`fastkd.distributed.explain_global_fkd`). The loss is
            identical on every rank and this rank's rows get W x dL/dF_r, so DDP's averaging
            yields the single-process gradients. Needs an initialised process group
            (``RuntimeError`` otherwise); runs eagerly under ``torch.compile`` (a graph break;
            ``fullgraph=True`` raises).
        process_group: the group of the global batch (None: the default group); only with
            ``global_batch=True``.

    Returns:
        0-dim tensor, float32 (float64 if any input is float64).
    """
    if wants_global(global_batch, process_group):
        # Lazily: fastkd.distributed imports this module. No local check first: a rank that
        # raised alone would leave the others waiting in a collective.
        from fastkd.distributed.fkd import global_fkd_loss

        return global_fkd_loss(
            student,
            teacher,
            kd_weight,
            fr_weight,
            algorithm=algorithm,
            backend=backend,
            precision=precision,
            process_group=process_group,
        )
    check_features(student, "student", min_batch=2)
    teachers = check_teachers(teacher, student, min_batch=2)
    kd_weight = check_finite_number(kd_weight, "kd_weight")
    fr_weight = check_finite_number(fr_weight, "fr_weight")
    precision = check_precision(precision)
    name = resolve_backend(OP, backend, student.device)
    teacher_width = sum(t.shape[1] for t in teachers)
    algo = choose_algorithm(algorithm, student.shape[0], student.shape[1], teacher_width)
    if name == "reference":
        return reference.fkd_loss(student, teachers, kd_weight, fr_weight)
    student = student.contiguous()
    teachers = [t.contiguous() for t in teachers]
    if algo == "dual":
        return FKDDualFunction.apply(kd_weight, fr_weight, student, *teachers)
    return FKDFunction.apply(name, precision, kd_weight, fr_weight, student, *teachers)


class FKDLoss(nn.Module):
    """Module form of :func:`fkd_loss`: ``FKDLoss(kd_weight, fr_weight)(student, teacher)``.

    Shapes: student (B, Ds), teacher (B, Dt) or a list of (B, Dt_e); returns a 0-dim loss.
    ``global_batch=True`` (with ``process_group``) makes it the loss of the global batch under
    torch.distributed, as in :func:`fkd_loss`.
    """

    def __init__(
        self,
        kd_weight: float = 1.0,
        fr_weight: float = 0.0,
        *,
        backend: str | None = None,
        algorithm: str = "auto",
        precision: str = "ieee",
        global_batch: bool = False,
        process_group: ProcessGroup | None = None,
    ):
        super().__init__()
        self.kd_weight = check_finite_number(kd_weight, "kd_weight")
        self.fr_weight = check_finite_number(fr_weight, "fr_weight")
        self.backend = backend
        self.algorithm = check_algorithm(algorithm, ALGORITHMS)
        self.precision = check_precision(precision)
        self.global_batch = wants_global(global_batch, process_group)
        self.process_group = process_group

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor | Sequence[torch.Tensor]
    ) -> torch.Tensor:
        return fkd_loss(
            student,
            teacher,
            self.kd_weight,
            self.fr_weight,
            backend=self.backend,
            algorithm=self.algorithm,
            precision=self.precision,
            global_batch=self.global_batch,
            process_group=self.process_group,
        )

    def extra_repr(self) -> str:
        return (
            f"kd_weight={self.kd_weight}, fr_weight={self.fr_weight}, "
            f"backend={self.backend!r}, algorithm={self.algorithm!r}, "
            f"precision={self.precision!r}, global_batch={self.global_batch}"
        )
