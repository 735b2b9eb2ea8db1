"""Feature Kernel Distillation (He & Ozay, ICLR 2022; SPEC §1): function, autograd, module."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from fastkd import reference
from fastkd._validate import check_features, check_finite_number, check_teachers
from fastkd.backends import kernels, resolve_backend
from fastkd.dual import FKDDualFunction

ALGORITHMS = ("auto", "tiled", "dual")

# auto picks the feature-space algorithm when B >= DUAL_RATIO * (Ds + Dt): the tiled kernel
# costs ~3 B^2 (Ds + Dt) flops, the dual one ~2 B (Ds + Dt)^2 in float64 (2x an fp32 flop on
# CPUs, more on consumer GPUs), so the break-even sits near B = (Ds + Dt).
DUAL_RATIO = 2.0


def choose_algorithm(algorithm: str, batch: int, student_width: int, teacher_width: int) -> str:
    """Resolve ``algorithm`` ("auto" | "tiled" | "dual") by the cost model above."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if algorithm != "auto":
        return algorithm
    return "dual" if batch >= DUAL_RATIO * (student_width + teacher_width) else "tiled"


class FKDFunction(torch.autograd.Function):
    """Autograd Function running the tiled FKD kernels of one fused backend.

    ``apply(backend, kd_weight, fr_weight, student, *teachers)``: ``backend`` is "cpu", "cuda"
    or "triton"; student (B, Ds) and teachers (B, Dt_e) contiguous, any floating dtype.
    Returns the 0-dim loss in float32 (float64 if any input is float64). When an input requires
    grad and the backend has a forward-backward kernel, the forward pass computes the gradients
    in the same sweep and the backward pass only scales them (one pass over the kernels per
    training step instead of two); otherwise the backward pass recomputes the kernel tiles.
    Either way no B x B matrix is stored.
    """

    @staticmethod
    def forward(ctx, backend: str, kd_weight: float, fr_weight: float, student, *teachers):
        ops = kernels("fkd", backend)
        ctx.backend = backend
        ctx.weights = (kd_weight, fr_weight)
        ctx.num_teachers = len(teachers)
        ctx.teachers_grad = any(ctx.needs_input_grad[4:])
        ctx.fused = ops.forward_backward is not None and any(ctx.needs_input_grad[3:])
        if ctx.fused:
            loss, grad_student, grad_teachers = ops.forward_backward(
                student, list(teachers), kd_weight, fr_weight, ctx.teachers_grad
            )
            ctx.save_for_backward(grad_student, *grad_teachers)
            return loss
        ctx.save_for_backward(student, *teachers)
        return ops.forward(student, list(teachers), kd_weight, fr_weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        if ctx.fused:
            grad_student, *grad_teachers = ctx.saved_tensors
            grad_student = grad_student * grad.to(grad_student.dtype)
            grad_teachers = [g * grad.to(g.dtype) for g in grad_teachers]
        else:
            student, *teachers = ctx.saved_tensors
            grad_student, grad_teachers = kernels("fkd", ctx.backend).backward(
                grad, student, teachers, *ctx.weights, ctx.teachers_grad
            )
        if not ctx.needs_input_grad[3]:
            grad_student = None
        grads = list(grad_teachers) if ctx.teachers_grad else [None] * ctx.num_teachers
        return None, None, None, grad_student, *grads


def fkd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor | Sequence[torch.Tensor],
    kd_weight: float = 1.0,
    fr_weight: float = 0.0,
    *,
    backend: str | None = None,
    algorithm: str = "auto",
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
            (default "auto"). See :mod:`fastkd.backends`.
        algorithm: "tiled" (kernel space, O(B^2 D) time, O(B D) memory), "dual" (feature space,
            O(B D^2) time, O(D^2) memory) or "auto": dual when B >= 2 (Ds + Dt), else tiled.
            Ignored by the reference backend, which forms the kernels explicitly.

    Returns:
        0-dim tensor, float32 (float64 if any input is float64).
    """
    check_features(student, "student", min_batch=2)
    teachers = check_teachers(teacher, student, min_batch=2)
    kd_weight = check_finite_number(kd_weight, "kd_weight")
    fr_weight = check_finite_number(fr_weight, "fr_weight")
    name = resolve_backend("fkd", backend, student.device)
    teacher_width = sum(t.shape[1] for t in teachers)
    algo = choose_algorithm(algorithm, student.shape[0], student.shape[1], teacher_width)
    if name == "reference":
        return reference.fkd_loss(student, teachers, kd_weight, fr_weight)
    student = student.contiguous()
    teachers = [t.contiguous() for t in teachers]
    if algo == "dual":
        return FKDDualFunction.apply(kd_weight, fr_weight, student, *teachers)
    return FKDFunction.apply(name, kd_weight, fr_weight, student, *teachers)


class FKDLoss(nn.Module):
    """Module form of :func:`fkd_loss`: ``FKDLoss(kd_weight, fr_weight)(student, teacher)``.

    Shapes: student (B, Ds), teacher (B, Dt) or a list of (B, Dt_e); returns a 0-dim loss.
    """

    def __init__(
        self,
        kd_weight: float = 1.0,
        fr_weight: float = 0.0,
        *,
        backend: str | None = None,
        algorithm: str = "auto",
    ):
        super().__init__()
        self.kd_weight = check_finite_number(kd_weight, "kd_weight")
        self.fr_weight = check_finite_number(fr_weight, "fr_weight")
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
        self.backend = backend
        self.algorithm = algorithm

    def forward(self, student, teacher):
        return fkd_loss(
            student,
            teacher,
            self.kd_weight,
            self.fr_weight,
            backend=self.backend,
            algorithm=self.algorithm,
        )

    def extra_repr(self) -> str:
        return (
            f"kd_weight={self.kd_weight}, fr_weight={self.fr_weight}, "
            f"backend={self.backend!r}, algorithm={self.algorithm!r}"
        )
