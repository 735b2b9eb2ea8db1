"""Global-batch SRD (SPEC §3 and §5) with nn.SyncBatchNorm semantics, in PyTorch ops.

The fused SRD kernels compute their batch statistics from the local rows, so the global path
is written in eager PyTorch ops instead (elementwise work in the accumulation dtype, every
reduction in float64), with all collectives in the forward pass:

  1. training mode: one all_gather of every rank's column means and centred sums of squares
     (float64, both sides), combined in rank order by Chan's parallel formula (no cancellation
     of E[z^2] - E[z]^2): the global mean and biased variance, identical on every rank.
     Running statistics update like nn.BatchNorm1d / nn.SyncBatchNorm with the unbiased
     variance var * B / (B - 1) of the GLOBAL batch (skipped when the statistics are
     non-finite), so they stay identical on every rank;
  2. one all_reduce of S_r = sum |s - t|^p over the local rows together with the column sums of
     h = p |d|^(p-1) sign(d), h s and h t that the gradient's column means need
     (``d zs = (g - mean_b g - s mean_b(g s)) / sigma_s``, g = h / S, means over the GLOBAL B).

Backward communicates nothing: the gradient is formed in the forward pass and scaled by W for
this rank's rows (SPEC §5; see :mod:`fastkd.distributed.fkd`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from fastkd import reference
from fastkd.distributed import _inputs
from fastkd.distributed.collectives import (
    COMPILE_REASON,
    Handshake,
    all_reduce_sum,
    comm_device,
    dtype_code,
    handshake,
    require_group,
)
from fastkd.losses._common import save_optional, scaled_optional
from fastkd.losses.srd import ALGORITHMS, SRDLoss
from fastkd.registry import resolve_backend
from fastkd.validation import check_algorithm

BUFFER_NAMES = ("running_mean_s", "running_var_s", "running_mean_t", "running_var_t")


def global_moments(x: torch.Tensor, hs: Handshake, group) -> tuple[torch.Tensor, torch.Tensor]:
    """Column mean and biased variance over the global batch of the (B_r, C) tensor ``x``.

    float64 (C,) tensors, identical on every rank: one all_gather of each rank's (mean, M2)
    pair, combined in rank order as ``mean = sum n_r mean_r / B`` and
    ``M2 = sum_r M2_r + n_r (mean_r - mean)^2``.
    """
    z = x.to(torch.float64)
    mean_r = z.mean(0)
    m2_r = (z - mean_r).square().sum(0)
    device = comm_device(group, x.device)
    local = torch.stack([mean_r, m2_r]).to(device)
    parts = [torch.empty_like(local) for _ in range(hs.world_size)]
    dist.all_gather(parts, local, group=group)
    table = torch.stack(parts).to(x.device)  # (W, 2, C)
    counts = torch.tensor(hs.batch_sizes, dtype=torch.float64, device=x.device)[:, None]
    mean = (counts * table[:, 0]).sum(0) / hs.batch
    m2 = table[:, 1].sum(0) + (counts * (table[:, 0] - mean).square()).sum(0)
    return mean, m2 / hs.batch


@torch.no_grad()
def _update(running_mean, running_var, mean, var, batch: int, factor) -> None:
    """nn.BatchNorm1d's update with the unbiased global variance; skipped if non-finite."""
    if running_mean is None:
        return
    if not bool(torch.isfinite(mean).all() and torch.isfinite(var).all()):
        return
    unbiased = var * (batch / (batch - 1))
    running_mean.mul_(1.0 - factor).add_(mean.to(running_mean.dtype) * factor)
    running_var.mul_(1.0 - factor).add_(unbiased.to(running_var.dtype) * factor)


class _GlobalSRD(torch.autograd.Function):
    """``apply(hs, group, p, training, stats, student, teacher)``: the 0-dim global loss.

    ``stats`` = (mean_s, rstd_s, mean_t, rstd_t), (D,) float64, identical on every rank (global
    batch statistics in training, running statistics otherwise).
    """

    @staticmethod
    def forward(ctx, hs: Handshake, group, p: float, training: bool, stats, student, teacher):
        acc = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
        mean_s, rstd_s, mean_t, rstd_t = (x.to(acc) for x in stats)
        s = (student.to(acc) - mean_s) * rstd_s
        t = (teacher.to(acc) - mean_t) * rstd_t
        d = s - t
        mag = d.abs()
        local_sum = mag.pow(p).sum(dtype=torch.float64).reshape(1)
        needs = ctx.needs_input_grad[5:]
        if not any(needs):
            total = all_reduce_sum(local_sum, group)[0]
            ctx.present = [False, False]
            return torch.log(total.clamp_min(reference.SRD_TINY)).to(acc)
        h = mag.pow(p - 1.0).mul_(d.sign()).mul_(p)  # dS/ds
        pieces = [local_sum]
        if training:
            pieces += [h.sum(0, dtype=torch.float64), (h * s).sum(0, dtype=torch.float64)]
            if needs[1]:
                pieces.append((h * t).sum(0, dtype=torch.float64))
        reduced = all_reduce_sum(torch.cat(pieces), group)
        total = reduced[0]
        loss = torch.log(total.clamp_min(reference.SRD_TINY))
        # d log(max(S, tiny)) / dS, 0 where the clamp holds (identical inputs); W for SPEC §5.
        factor = float(total >= reference.SRD_TINY) / max(float(total), reference.SRD_TINY)
        factor *= hs.world_size
        g = h.mul_(factor)
        width = student.shape[1]
        grads: list[torch.Tensor | None] = [None, None]
        if training:
            col = reduced[1:].view(-1, width) * (factor / hs.batch)  # column means of g, g s, g t
            mean_g, mean_gs = col[0].to(acc), col[1].to(acc)
            if needs[0]:
                grads[0] = ((g - mean_g - s * mean_gs) * rstd_s).to(student.dtype)
            if needs[1]:
                grads[1] = ((mean_g - g + t * col[2].to(acc)) * rstd_t).to(teacher.dtype)
        else:
            if needs[0]:
                grads[0] = (g * rstd_s).to(student.dtype)
            if needs[1]:
                grads[1] = (-g * rstd_t).to(teacher.dtype)
        save_optional(ctx, grads)
        return loss.to(acc)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        return (None,) * 5 + tuple(scaled_optional(ctx, grad))


def _check(student, teacher, p, eps, training, buffers: dict, momentum, backend, algorithm):
    s = _inputs.features(student, "student")
    t = _inputs.features(teacher, "teacher")
    if t.shape != s.shape:
        raise ValueError(
            f"teacher has shape {tuple(t.shape)} but student has {tuple(s.shape)}: SRD compares "
            "them element by element (project the student first, as SRDLoss does)"
        )
    if t.device != s.device:
        raise ValueError(f"teacher is on {t.device} but student is on {s.device}")
    p = _inputs.number(p, "p")
    if p < 1:
        raise ValueError(f"p must be >= 1, got {p}")
    eps = _inputs.number(eps, "eps")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    if not isinstance(momentum, torch.Tensor):
        momentum = _inputs.number(momentum, "momentum")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    for name, buf in buffers.items():
        if buf is None:
            continue
        if not isinstance(buf, torch.Tensor) or buf.dtype not in _inputs.FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating torch.Tensor or None")
        if tuple(buf.shape) != (s.shape[1],):
            raise ValueError(f"{name} must have shape ({s.shape[1]},), got {tuple(buf.shape)}")
        if buf.device != s.device:
            raise ValueError(f"{name} is on {buf.device} but the features are on {s.device}")
    for side in ("s", "t"):
        if (buffers[f"running_mean_{side}"] is None) != (buffers[f"running_var_{side}"] is None):
            raise ValueError(f"running_mean_{side} and running_var_{side}: pass both or neither")
    if not training and any(buf is None for buf in buffers.values()):
        raise ValueError("eval mode (training=False) needs all four running statistics")
    check_algorithm(algorithm, ALGORITHMS)
    resolve_backend("srd", backend, s.device)  # validated as by srd_loss, not used
    grad = torch.is_grad_enabled() and (s.requires_grad or t.requires_grad)
    fields = [
        ("width", s.shape[1]),
        ("student dtype", dtype_code(s.dtype)),
        ("teacher dtype", dtype_code(t.dtype)),
        ("training", int(training)),
        ("requires grad", int(grad)),  # the size of the second all_reduce depends on these
        ("teacher requires grad", int(grad and t.requires_grad)),
        ("running statistics", int(buffers["running_mean_s"] is not None)),
    ]
    return p, eps, momentum, fields


@torch.compiler.disable(reason=COMPILE_REASON)
def global_srd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    p: float = 4.0,
    eps: float = reference.SRD_EPS,
    training: bool = True,
    running_mean_s: torch.Tensor | None = None,
    running_var_s: torch.Tensor | None = None,
    running_mean_t: torch.Tensor | None = None,
    running_var_t: torch.Tensor | None = None,
    momentum: float = 0.1,
    *,
    backend: str | None = None,
    algorithm: str = "auto",
    process_group=None,
    _problem: BaseException | None = None,
) -> torch.Tensor:
    """SRD loss over the global batch with nn.SyncBatchNorm semantics (SPEC §3, §5).

    A collective: every rank must call it with the same width, dtypes and mode. Local batch sizes
    may differ and be 1 (training needs a global batch >= 2, as nn.SyncBatchNorm).

    Args:
        student: (B_r, D) projected student features; teacher: (B_r, D) teacher features
            (float16..float64; the teacher gets its gradient if it requires grad).
        p: exponent >= 1; eps: batch-norm eps > 0.
        training: global batch statistics (biased variance) if True, else the running ones.
        running_mean_s, running_var_s, running_mean_t, running_var_t: optional (D,) buffers,
            updated in training from the global statistics (momentum, unbiased variance with
            the global B), identically on every rank; eval mode needs all four.
        momentum: in [0, 1].
        backend, algorithm: validated as by :func:`fastkd.srd_loss`, not used (see Returns).
        process_group: None for the default group.

    Returns:
        0-dim ``log(max(sum |s - t|^p, tiny))`` over the global batch, float32 (float64 if an
        input is float64), identical on every rank; this rank's rows get W x dL/dz_r. Runs in
        eager PyTorch ops (not the fused kernels).

    ``fastkd.srd_loss(..., global_batch=True)`` and ``SRDLoss(global_batch=True)`` call this.
    Under ``torch.compile`` it runs eagerly (a graph break).
    """
    group = require_group(process_group)
    buffers = dict(
        zip(
            BUFFER_NAMES,
            (running_mean_s, running_var_s, running_mean_t, running_var_t),
            strict=True,
        )
    )
    checked, problem = _inputs.capture(
        lambda: _check(student, teacher, p, eps, training, buffers, momentum, backend, algorithm)
    )
    problem = _problem or problem
    device = comm_device(group, _inputs.device_of(student))
    if problem is not None:
        handshake("srd", group, device, 0, [], problem)
    p, eps, momentum, fields = checked
    hs = handshake(
        "srd", group, device, student.shape[0], fields, min_global_batch=2 if training else 1
    )
    if training:
        both = torch.cat([student.to(torch.float64), teacher.to(torch.float64)], dim=1)
        moments = global_moments(both, hs, group)
        width = student.shape[1]
        mean_s, mean_t = moments[0][:width], moments[0][width:]
        var_s, var_t = moments[1][:width], moments[1][width:]
        _update(running_mean_s, running_var_s, mean_s, var_s, hs.batch, momentum)
        _update(running_mean_t, running_var_t, mean_t, var_t, hs.batch, momentum)
    else:
        mean_s, var_s = running_mean_s.to(torch.float64), running_var_s.to(torch.float64)
        mean_t, var_t = running_mean_t.to(torch.float64), running_var_t.to(torch.float64)
    stats = (mean_s, (var_s + eps).rsqrt(), mean_t, (var_t + eps).rsqrt())
    return _GlobalSRD.apply(hs, group, p, training, stats, student, teacher)


class GlobalSRDLoss(SRDLoss):
    """``SRDLoss(..., global_batch=True)`` under its Phase-1 name: :class:`fastkd.SRDLoss` over
    the global batch with nn.SyncBatchNorm semantics (running statistics updated from the
    global batch statistics, identically on every rank).

    ``GlobalSRDLoss(student_dim, teacher_dim, ..., process_group=None)`` takes SRDLoss's
    arguments (``global_batch`` is always True); student_features (B_r, student_dim),
    teacher_features (B_r, teacher_dim) -> the 0-dim global loss.
    """

    def __init__(self, *args, process_group=None, **kwargs):
        if "global_batch" in kwargs:
            raise TypeError("GlobalSRDLoss is always global: do not pass global_batch")
        super().__init__(*args, global_batch=True, process_group=process_group, **kwargs)
