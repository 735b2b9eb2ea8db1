"""Relational losses in their peers' conventions (SPEC §2): SP (Tung & Mori 2019) and RKD
distance (Park et al. 2019), as in RepDistiller / torchdistill.

They run on the reference backend (eager PyTorch); asking for a fused backend raises
:class:`fastkd.BackendUnavailableError` until kernels for them land.
"""

from __future__ import annotations

import torch
from torch import nn

from fastkd import reference
from fastkd._validate import FLOAT_DTYPES, check_same_batch_and_device
from fastkd.backends import resolve_backend


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


def _checked(student, teacher, op: str, backend: str | None):
    _check_batch_features(student, "student")
    _check_batch_features(teacher, "teacher")
    check_same_batch_and_device(student, "student", teacher, "teacher")
    resolve_backend(op, backend, student.device)


def sp_loss(student: torch.Tensor, teacher: torch.Tensor, *, backend: str | None = None):
    """Similarity-preserving loss. student (B, ...), teacher (B, ...) (flattened to (B, D)).

    ``G = F F^T``, rows L2-normalised; ``loss = (1/B^2) sum (G_T - G_S)^2`` (0-dim, float32 or
    float64).
    """
    _checked(student, teacher, "sp", backend)
    return reference.sp_loss(student, teacher)


def rkd_distance_loss(student: torch.Tensor, teacher: torch.Tensor, *, backend: str | None = None):
    """RKD distance loss. student (B, ...), teacher (B, ...) (flattened to (B, D)).

    Pairwise distances divided by their mean positive distance on each side;
    ``loss = mean_ij smooth_l1(d_S, d_T)`` with beta = 1 (0-dim, float32 or float64).
    """
    _checked(student, teacher, "rkd", backend)
    return reference.rkd_distance_loss(student, teacher)


class SPLoss(nn.Module):
    """Module form of :func:`sp_loss`."""

    def __init__(self, *, backend: str | None = None):
        super().__init__()
        self.backend = backend

    def forward(self, student, teacher):
        return sp_loss(student, teacher, backend=self.backend)


class RKDDistanceLoss(nn.Module):
    """Module form of :func:`rkd_distance_loss`."""

    def __init__(self, *, backend: str | None = None):
        super().__init__()
        self.backend = backend

    def forward(self, student, teacher):
        return rkd_distance_loss(student, teacher, backend=self.backend)
