"""Pure-PyTorch reference of every fastkd loss: the oracle for tests and the benchmark baseline.

Each function is a literal transcription of ``SPEC.md`` (shipped in ``docs/SPEC.md``) in eager
PyTorch, differentiated by autograd. They materialise the B x B kernels, so they cost
O(B^2) memory; the fused backends compute exactly the same numbers in O(B*D).

Dtypes: inputs may be float16/bfloat16/float32/float64; arithmetic runs in float32
(float64 for float64 inputs) and the returned loss has that accumulation dtype.
Input validation lives in :mod:`fastkd.validation`; these functions assume valid input.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

NORM_EPS = 1e-12  # torch.nn.functional.normalize's eps: a zero row normalises to zeros
SRD_EPS = 1e-4  # batch-norm eps of the SRD authors' code
SRD_TINY = torch.finfo(torch.float32).tiny  # log(max(S, tiny)): identical inputs stay finite


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for every other floating dtype (SPEC conventions)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def loss_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Dtype of a loss over ``tensors``: float64 if any is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _acc(x: torch.Tensor) -> torch.Tensor:
    return x.to(accumulation_dtype(x.dtype))


def correlation_kernel(features: torch.Tensor) -> torch.Tensor:
    """rho = normalize(f) normalize(f)^T for ``features`` of shape (B, D); returns (B, B)."""
    a = F.normalize(_acc(features), dim=1, eps=NORM_EPS)
    return a @ a.T


def teacher_kernel(teachers: Sequence[torch.Tensor]) -> torch.Tensor:
    """rho_T = (1/E) sum_e normalize(ft_e) normalize(ft_e)^T over E teachers (B, Dt_e)."""
    return sum(correlation_kernel(t) for t in teachers) / len(teachers)


def fkd_loss(
    student: torch.Tensor,
    teachers: torch.Tensor | Sequence[torch.Tensor],
    kd_weight: float = 1.0,
    fr_weight: float = 0.0,
) -> torch.Tensor:
    """Feature Kernel Distillation loss (SPEC §1), O(B^2) memory.

    Args:
        student: (B, Ds) student features.
        teachers: (B, Dt) teacher features, or a list of E tensors (B, Dt_e) (ensemble).
        kd_weight: weight of the kernel distillation term.
        fr_weight: weight of the feature regulariser.

    Returns:
        0-dim tensor ``kd_weight * mean_ij (rho_S - rho_T)_ij^2 + fr_weight * mean(fs^2)``.
    """
    if isinstance(teachers, torch.Tensor):
        teachers = [teachers]
    diff = correlation_kernel(student) - teacher_kernel(teachers)
    distil = diff.square().mean()
    featreg = _acc(student).square().mean()
    return kd_weight * distil + fr_weight * featreg


def sp_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Similarity-preserving KD (Tung & Mori 2019), RepDistiller convention (SPEC §2).

    ``student`` (B, ...) and ``teacher`` (B, ...) are flattened to (B, D). G = F F^T,
    row-normalised (eps 1e-12); loss = (1/B^2) sum (G_T - G_S)^2. Returns a 0-dim tensor.
    """
    fs = _acc(student).flatten(1)
    ft = _acc(teacher).flatten(1)
    gs = F.normalize(fs @ fs.T, dim=1, eps=NORM_EPS)
    gt = F.normalize(ft @ ft.T, dim=1, eps=NORM_EPS)
    b = fs.shape[0]
    return (gt - gs).square().sum() / (b * b)


def _rkd_normalized_distances(features: torch.Tensor) -> torch.Tensor:
    f = _acc(features).flatten(1)
    sq = f.square().sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (f @ f.T)).clamp_min(1e-12)
    d = d2.sqrt()
    b = f.shape[0]
    d = d * (1.0 - torch.eye(b, dtype=d.dtype, device=d.device))  # d_ii = 0 exactly
    positive = d > 0
    mean = d[positive].mean()
    return d / mean


def rkd_distance_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD distance loss (Park et al. 2019), RepDistiller/torchdistill convention (SPEC §2).

    d_ij = sqrt(clamp_min(|f_i|^2 + |f_j|^2 - 2 f_i.f_j, 1e-12)), d_ii = 0, each side divided
    by its mean positive distance (the teacher side without gradient, as the peers do it when
    the teacher is detached); loss = mean over B^2 of smooth_l1(d_S, d_T), beta = 1.
    """
    ds = _rkd_normalized_distances(student)
    dt = _rkd_normalized_distances(teacher)
    return F.smooth_l1_loss(ds, dt, reduction="mean", beta=1.0)


def batch_norm_statistics(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Column mean and biased variance of ``z`` (B, D) in the accumulation dtype."""
    z = _acc(z)
    mean = z.mean(0)
    var = (z - mean).square().mean(0)
    return mean, var


def update_running_stats(
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    batch_mean: torch.Tensor,
    batch_var: torch.Tensor,
    batch_size: int,
    momentum: float,
) -> None:
    """In-place nn.BatchNorm1d update; skipped whole when the batch statistics are non-finite."""
    if running_mean is None or running_var is None:
        return
    if not bool(torch.isfinite(batch_mean).all() and torch.isfinite(batch_var).all()):
        return
    unbiased = batch_var * (batch_size / (batch_size - 1))
    with torch.no_grad():
        running_mean.mul_(1.0 - momentum).add_(
            batch_mean.detach().to(running_mean.dtype), alpha=momentum
        )
        running_var.mul_(1.0 - momentum).add_(
            unbiased.detach().to(running_var.dtype), alpha=momentum
        )


def srd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    p: float = 4.0,
    eps: float = SRD_EPS,
    training: bool = True,
    running_mean_s: torch.Tensor | None = None,
    running_var_s: torch.Tensor | None = None,
    running_mean_t: torch.Tensor | None = None,
    running_var_t: torch.Tensor | None = None,
    momentum: float = 0.1,
) -> torch.Tensor:
    """SRD LogSum of batch-normalised features (SPEC §3).

    Args:
        student: (B, D) projected student features ``zs``.
        teacher: (B, D) teacher features ``zt``.
        p: exponent (>= 1); eps: batch-norm eps.
        training: batch statistics (and running-stat update) if True, running statistics if False.
        running_*: optional (D,) buffers, updated in place like nn.BatchNorm1d in training mode.

    Returns:
        0-dim tensor ``log(max(sum |s - t|^p, tiny))`` with s, t each side batch-normalised.
    """
    zs, zt = _acc(student), _acc(teacher)
    b = zs.shape[0]
    if training:
        mean_s, var_s = batch_norm_statistics(zs)
        mean_t, var_t = batch_norm_statistics(zt)
        update_running_stats(running_mean_s, running_var_s, mean_s, var_s, b, momentum)
        update_running_stats(running_mean_t, running_var_t, mean_t, var_t, b, momentum)
    else:
        # In the features' accumulation dtype: float32 buffers must not round a float64 sigma.
        mean_s, var_s = running_mean_s.to(zs.dtype), running_var_s.to(zs.dtype)
        mean_t, var_t = running_mean_t.to(zt.dtype), running_var_t.to(zt.dtype)
    s = (zs - mean_s) / torch.sqrt(var_s + eps)
    t = (zt - mean_t) / torch.sqrt(var_t + eps)
    total = (s - t).abs().pow(p).sum()
    return torch.log(total.clamp_min(SRD_TINY))
