"""Relational losses in their peers' conventions (SPEC §2): SP (Tung & Mori 2019) and RKD
distance (Park et al. 2019), as in RepDistiller / torchdistill.

Backends: RKD distance has tiled kernels, ``cpu`` (``csrc/cpu/rkd.cpp``), ``cuda``
(``csrc/cuda/rkd.cu``) and ``triton`` (``fastkd/triton/rkd.py``): three sweeps over the distance
tiles, O(B D) extra memory instead of about a dozen B x B matrices. SP runs on ``reference``
(eager PyTorch, any device). Asking for a backend without a kernel for the op raises
:class:`fastkd.BackendUnavailableError`.
SP has a second exact formulation, ``algorithm="dual"``, in feature space (O(B D^2) time,
O(D^2) extra memory instead of two B x B matrices):

    ||G_i||^2 = f_i^T (F^T F) f_i,    sum_j Gt_ij Gs_ij = ft_i^T (Ft^T Fs) fs_i

so ``B^2 loss = sum_i [|Gt_i|^2/nt_i^2 + |Gs_i|^2/ns_i^2 - 2 ft_i^T C fs_i / (nt_i ns_i)]`` with
C = Ft^T Fs and n the clamped row norms. The terms cancel when student and teacher agree, so it
runs in float64; autograd differentiates it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from fastkd import reference
from fastkd._validate import FLOAT_DTYPES, check_same_batch_and_device
from fastkd.backends import kernels, resolve_backend


def _check_batch_features(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{name} must have a batch and a feature dimension, got {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    if x.shape[0] < 2:
        raise ValueError(f"{name} needs a batch of at least 2 rows, got {x.shape[0]}")
    return x


def _checked(student, teacher, op: str, backend: str | None) -> str:
    """Validates the inputs and returns the backend that runs ``op`` on them."""
    _check_batch_features(student, "student")
    _check_batch_features(teacher, "teacher")
    check_same_batch_and_device(student, "student", teacher, "teacher")
    return resolve_backend(op, backend, student.device)


SP_ALGORITHMS = ("auto", "explicit", "dual")


def _sp_dual(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    fs = student.flatten(1).to(torch.float64)
    ft = teacher.flatten(1).to(torch.float64)
    eps_sq = reference.NORM_EPS**2

    def row_norms_sq(f):  # ||(F F^T)_i||^2 = f_i^T (F^T F) f_i, clamped like F.normalize
        return ((f @ (f.T @ f)) * f).sum(1).clamp_min(eps_sq)

    qs, qt = row_norms_sq(fs), row_norms_sq(ft)
    cross = ((ft @ (ft.T @ fs)) * fs).sum(1)  # sum_j Gt_ij Gs_ij
    raw_s = ((fs @ (fs.T @ fs)) * fs).sum(1)  # unclamped: a zero row contributes 0, not 1
    raw_t = ((ft @ (ft.T @ ft)) * ft).sum(1)
    total = raw_s / qs + raw_t / qt - 2.0 * cross / (qs * qt).sqrt()
    b = fs.shape[0]
    return (total.sum().clamp_min(0.0) / (b * b)).to(reference.loss_dtype(student, teacher))


def sp_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    backend: str | None = None,
    algorithm: str = "auto",
):
    """Similarity-preserving loss. student (B, ...), teacher (B, ...) (flattened to (B, D)).

    ``G = F F^T``, rows L2-normalised; ``loss = (1/B^2) sum (G_T - G_S)^2`` (0-dim, float32 or
    float64). ``algorithm``: "explicit" forms the two B x B Grams (the reference), "dual" works
    in feature space (see the module docstring), "auto" picks dual when B >= 2 (Ds + Dt).
    """
    _checked(student, teacher, "sp", backend)
    if algorithm not in SP_ALGORITHMS:
        raise ValueError(f"algorithm must be one of {SP_ALGORITHMS}, got {algorithm!r}")
    if algorithm == "auto":
        widths = student[0].numel() + teacher[0].numel()
        algorithm = "dual" if student.shape[0] >= 2 * widths else "explicit"
    if algorithm == "dual":
        return _sp_dual(student, teacher)
    return reference.sp_loss(student, teacher)


class RKDFunction(torch.autograd.Function):
    """Autograd Function running the RKD distance kernels of one fused backend.

    ``apply(backend, student, teacher)`` with student (B, Ds) and teacher (B, Dt) contiguous, any
    floating dtypes; returns the 0-dim loss in float32 (float64 if an input is float64). When an
    input requires grad the forward pass computes the gradients with the loss (the sweeps that
    give the loss are the first two of the three the gradient needs) and backward only scales
    them.
    """

    @staticmethod
    def forward(ctx, backend: str, student, teacher):
        ops = kernels("rkd", backend)
        ctx.teacher_grad = bool(ctx.needs_input_grad[2])
        if any(ctx.needs_input_grad[1:]):
            loss, grad_s, grad_t = ops.forward_backward(student, teacher, ctx.teacher_grad)
            ctx.save_for_backward(grad_s, grad_t)
            return loss
        return ops.forward(student, teacher)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        grad_s, grad_t = ctx.saved_tensors
        return (
            None,
            grad_s * grad.to(grad_s.dtype) if ctx.needs_input_grad[1] else None,
            grad_t * grad.to(grad_t.dtype) if ctx.teacher_grad else None,
        )


def rkd_distance_loss(student: torch.Tensor, teacher: torch.Tensor, *, backend: str | None = None):
    """RKD distance loss. student (B, ...), teacher (B, ...) (flattened to (B, D)), B >= 2.

    ``d_ij = sqrt(clamp_min(|f_i|^2 + |f_j|^2 - 2 f_i.f_j, 1e-12))``, ``d_ii = 0``, each side
    divided by its mean off-diagonal distance; ``loss = mean_ij smooth_l1(d_S, d_T)`` with
    beta = 1 (0-dim, float32, or float64 if an input is float64; float16/bfloat16 inputs
    accumulate in float32). The teacher gets its gradient if it requires grad. ``backend``:
    "auto" | "cpu" | "cuda" | "triton" | "reference" (see :mod:`fastkd.backends`); the kernels
    need O(B D) extra memory, the reference about a dozen B x B matrices at its peak.
    """
    name = _checked(student, teacher, "rkd", backend)
    if name == "reference":
        return reference.rkd_distance_loss(student, teacher)
    return RKDFunction.apply(name, student.flatten(1).contiguous(), teacher.flatten(1).contiguous())


class SPLoss(nn.Module):
    """Module form of :func:`sp_loss`."""

    def __init__(self, *, backend: str | None = None, algorithm: str = "auto"):
        super().__init__()
        if algorithm not in SP_ALGORITHMS:
            raise ValueError(f"algorithm must be one of {SP_ALGORITHMS}, got {algorithm!r}")
        self.backend = backend
        self.algorithm = algorithm

    def forward(self, student, teacher):
        return sp_loss(student, teacher, backend=self.backend, algorithm=self.algorithm)


class RKDDistanceLoss(nn.Module):
    """Module form of :func:`rkd_distance_loss`."""

    def __init__(self, *, backend: str | None = None):
        super().__init__()
        self.backend = backend

    def forward(self, student, teacher):
        return rkd_distance_loss(student, teacher, backend=self.backend)
