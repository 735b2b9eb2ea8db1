"""SRD, LogSum of batch-normalised features (Miles & Mikolajczyk, AAAI 2024; SPEC §3):
Function, functional, Module.

Recipe (as every loss of :mod:`fastkd.losses`): validate (:mod:`fastkd.validation`) -> resolve
the backend (:mod:`fastkd.registry`) -> choose the algorithm (one: "fused") ->
:func:`fastkd.reference.srd_loss` for the reference backend, else
``SRDFunction.apply(backend, ...)`` on the registry's kernels (forward, then backward: SRD has no
forward-backward kernel, its backward is one elementwise sweep) -> :class:`SRDLoss`, which adds
the projector and nn.BatchNorm1d-style running statistics.

With s and t the student and teacher features, each
batch-normalised on its own statistics (no affine parameters, eps 1e-4), the loss is
``log(max(sum |s - t|^p, tiny))`` (p = 4 by default, the paper's choice). The fused kernels
read the inputs twice in the forward pass (column statistics, then the loss sum plus the column
sums that the backward pass needs) and once in the backward pass, and allocate nothing of size
B x D apart from the gradients.

``global_batch=True`` (functional and Module) hands the call to
:func:`fastkd.distributed.global_srd_loss`: nn.SyncBatchNorm semantics over every rank's rows
(SPEC §5), in eager PyTorch ops rather than the fused kernels (their statistics are local).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from fastkd import reference
from fastkd.losses._common import wants_global
from fastkd.registry import kernels, resolve_backend
from fastkd.validation import (
    check_algorithm,
    check_features,
    check_finite_number,
    check_momentum,
    check_srd_args,
)

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

OP = "srd"
ALGORITHMS = ("auto", "fused")

__all__ = ["ALGORITHMS", "SRDFunction", "SRDLoss", "srd_loss"]

# Rows of the (4, D) statistics tensors the kernels return (csrc/include/fastkd/srd_math.h).
STATS_MEAN, STATS_VAR, STATS_CENTRE, STATS_RSTD = 0, 1, 2, 3


class SRDFunction(torch.autograd.Function):
    """Autograd Function running the fused SRD kernels of one backend.

    ``apply(backend, p, eps, training, student, teacher, running_mean_s, running_var_s,
    running_mean_t, running_var_t)``: ``backend`` is "cpu", "cuda" or "triton"; student and
    teacher are contiguous (B, D) tensors of one floating dtype; the running buffers are (D,)
    tensors or None and are only read (eval mode needs all four). Returns
    ``(loss, stats_s, stats_t)``: the 0-dim loss in float32 (float64 for float64 inputs) and each
    side's (4, D) statistics ``[mean, biased var, mean - z[0], 1/sqrt(var + eps)]``, which carry
    no gradient. The teacher gets its gradient only if it requires grad.
    """

    @staticmethod
    def forward(ctx, backend, p, eps, training, student, teacher, rm_s, rv_s, rm_t, rv_t):
        loss, total, stats_s, stats_t, sums = kernels(OP, backend).forward(
            student, teacher, p, eps, training, rm_s, rv_s, rm_t, rv_t
        )
        ctx.backend, ctx.p, ctx.training = backend, p, training
        ctx.save_for_backward(student, teacher, total, stats_s, stats_t, sums)
        ctx.mark_non_differentiable(stats_s, stats_t)
        return loss, stats_s, stats_t

    @staticmethod
    @once_differentiable
    def backward(ctx, grad, _grad_stats_s, _grad_stats_t):
        student, teacher, total, stats_s, stats_t, sums = ctx.saved_tensors
        teacher_grad = bool(ctx.needs_input_grad[5])
        grad_s, grad_t = kernels(OP, ctx.backend).backward(
            grad, student, teacher, ctx.p, ctx.training, total, stats_s, stats_t, sums, teacher_grad
        )
        grad_s = grad_s if ctx.needs_input_grad[4] else None
        grad_t = grad_t if teacher_grad else None
        return None, None, None, None, grad_s, grad_t, None, None, None, None


@torch.no_grad()
def _update_running_stats(running_mean, running_var, stats, batch: int, factor) -> None:
    """nn.BatchNorm1d's update with the unbiased variance, skipped if the batch is non-finite.

    Tensor ops only (torch.where on a finite flag, no Python branch on data), so a compiled
    training step keeps it in its graph. ``factor`` is the momentum: a float or a 0-dim tensor.
    """
    if running_mean is None:
        return
    mean, var = stats[STATS_MEAN], stats[STATS_VAR]
    finite = torch.isfinite(mean).all() & torch.isfinite(var).all()
    unbiased = var * (batch / (batch - 1))
    new_mean = running_mean * (1.0 - factor) + mean.to(running_mean.dtype) * factor
    new_var = running_var * (1.0 - factor) + unbiased.to(running_var.dtype) * factor
    running_mean.copy_(torch.where(finite, new_mean, running_mean))
    running_var.copy_(torch.where(finite, new_var, running_var))


def _srd(student, teacher, p, eps, training, rm_s, rv_s, rm_t, rv_t, factor, backend):
    """Validated inputs -> loss; updates the running buffers in training mode."""
    name = resolve_backend(OP, backend, student.device)
    if name == "reference":
        if not isinstance(factor, float):  # SRDLoss with momentum=None: a tensor factor
            factor = float(factor)
        return reference.srd_loss(
            student, teacher, p, eps, training, rm_s, rv_s, rm_t, rv_t, momentum=factor
        )
    if student.dtype != teacher.dtype:  # the kernels take one dtype
        common = torch.promote_types(student.dtype, teacher.dtype)
        student, teacher = student.to(common), teacher.to(common)
    student, teacher = student.contiguous(), teacher.contiguous()
    loss, stats_s, stats_t = SRDFunction.apply(
        name, p, eps, training, student, teacher, rm_s, rv_s, rm_t, rv_t
    )
    if training:
        batch = student.shape[0]
        _update_running_stats(rm_s, rv_s, stats_s, batch, factor)
        _update_running_stats(rm_t, rv_t, stats_t, batch, factor)
    return loss


def srd_loss(
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
    global_batch: bool = False,
    process_group: ProcessGroup | None = None,
) -> torch.Tensor:
    """SRD loss: LogSum of the difference of batch-normalised features (SPEC §3).

    ``s = (zs - mu_s) / sqrt(var_s + eps)``, ``t = (zt - mu_t) / sqrt(var_t + eps)`` (each side its
    own batch statistics in training, its running statistics otherwise) and
    ``loss = log(max(sum_{b,d} |s - t|^p, tiny))`` with tiny = float32's smallest normal number,
    so identical inputs give a finite loss and a zero gradient.

    Args:
        student: (B, D) projected student features, float16/bfloat16/float32/float64.
        teacher: (B, D) teacher features (same shape; usually computed under ``torch.no_grad()``,
            if it requires grad it gets its gradient).
        p: exponent, >= 1. eps: batch-norm eps, > 0.
        training: batch statistics if True (B >= 2, as nn.BatchNorm1d), running ones if False.
        running_mean_s, running_var_s, running_mean_t, running_var_t: optional (D,) buffers of
            each side. In training they are updated in place like nn.BatchNorm1d's (momentum,
            unbiased variance), unless that side's batch statistics are non-finite; in eval mode
            all four are required.
        momentum: weight of the batch statistics in the running update, in [0, 1].
        backend: "auto" | "cpu" | "cuda" | "triton" | "reference"; None reads ``$FASTKD_BACKEND``.
        algorithm: "auto" or "fused" (the only one; ignored by the reference backend).
        global_batch: if True, SRD over the GLOBAL batch (every rank's rows in rank order) with
            nn.SyncBatchNorm semantics (SPEC §5), through
            :func:`fastkd.distributed.global_srd_loss`: a collective every rank of
            ``process_group`` must call. Batch statistics are those of the global batch (local
            batches may be 1; training needs a global batch >= 2), the running buffers are
            updated from them (unbiased variance with the global B), identically on every rank.
            The loss is identical on every rank and this rank's rows get W x dL/dz_r (DDP's
            averaging yields the single-process gradients). It runs in eager PyTorch ops, not
            the fused kernels (``backend`` is validated but not used). Needs an initialised
            process group (``RuntimeError`` otherwise); eager under ``torch.compile``.
        process_group: the group of the global batch (None: the default group); only with
            ``global_batch=True``.

    Returns:
        0-dim tensor, float32 (float64 if an input is float64).
    """
    if wants_global(global_batch, process_group):
        # Lazily: fastkd.distributed imports this module. Its checks join the ranks' handshake.
        from fastkd.distributed.srd import global_srd_loss

        return global_srd_loss(
            student,
            teacher,
            p,
            eps,
            training,
            running_mean_s,
            running_var_s,
            running_mean_t,
            running_var_t,
            momentum,
            backend=backend,
            algorithm=algorithm,
            process_group=process_group,
        )
    buffers = {
        "running_mean_s": running_mean_s,
        "running_var_s": running_var_s,
        "running_mean_t": running_mean_t,
        "running_var_t": running_var_t,
    }
    p, eps = check_srd_args(student, teacher, p, eps, training, buffers)
    momentum = check_momentum(momentum)
    check_algorithm(algorithm, ALGORITHMS)
    return _srd(student, teacher, p, eps, training, *buffers.values(), momentum, backend)


class SRDLoss(nn.Module):
    """SRD as a module: optional projector, then the loss with BatchNorm1d-style running stats.

    ``SRDLoss(student_dim, teacher_dim)(student_features, teacher_features)`` with
    student_features (B, student_dim) and teacher_features (B, teacher_dim) returns the 0-dim loss
    of :func:`srd_loss` on ``(projector(student_features), teacher_features)``.

    Args:
        student_dim, teacher_dim: feature widths.
        p, eps: as in :func:`srd_loss` (defaults: the authors' 4 and 1e-4).
        momentum: running-statistics momentum; None means a cumulative average over the tracked
            batches, as in nn.BatchNorm1d.
        projector: None creates ``nn.Linear(student_dim, teacher_dim)`` when the widths differ
            (identity otherwise); True always creates it; False never does (the widths must then
            match); an nn.Module is used as given.
        track_running_stats: keep running statistics of both sides (``running_mean_s``,
            ``running_var_s``, ``running_mean_t``, ``running_var_t``, ``num_batches_tracked``)
            and use them in eval mode; if False, batch statistics are used in both modes.
        backend, algorithm: as in :func:`srd_loss`.
        global_batch: if True, the loss of the global batch under torch.distributed with
            nn.SyncBatchNorm semantics (:func:`srd_loss`): the running statistics are updated
            from the GLOBAL batch statistics, identically on every rank, and a local batch may
            be 1 in training. Every rank must call the module in the same order.
        process_group: the group of the global batch (None: the default group); only with
            ``global_batch=True``.
        device, dtype: of the projector and the buffers.

    ``.train()`` / ``.eval()`` behave as in nn.BatchNorm1d(affine=False): training uses and
    updates batch statistics (B = 1 is an error unless ``global_batch``), eval uses the running
    statistics.
    """

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        p: float = 4.0,
        eps: float = reference.SRD_EPS,
        momentum: float | None = 0.1,
        projector: bool | nn.Module | None = None,
        track_running_stats: bool = True,
        backend: str | None = None,
        *,
        algorithm: str = "auto",
        global_batch: bool = False,
        process_group: ProcessGroup | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        for name, value in (("student_dim", student_dim), ("teacher_dim", teacher_dim)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.student_dim, self.teacher_dim = student_dim, teacher_dim
        self.p = check_finite_number(p, "p")
        if self.p < 1:
            raise ValueError(f"p must be >= 1, got {self.p}")
        self.eps = check_finite_number(eps, "eps")
        if self.eps <= 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        self.momentum = None if momentum is None else check_momentum(momentum)
        self.track_running_stats = bool(track_running_stats)
        self.backend = backend
        self.algorithm = check_algorithm(algorithm, ALGORITHMS)
        self.global_batch = wants_global(global_batch, process_group)
        self.process_group = process_group
        factory = {"device": device, "dtype": dtype}
        if isinstance(projector, nn.Module):
            self.projector = projector
        elif projector is None or isinstance(projector, bool):
            if projector is False and student_dim != teacher_dim:
                raise ValueError(
                    f"projector=False needs student_dim == teacher_dim, got {student_dim} "
                    f"and {teacher_dim}"
                )
            wanted = projector is True or (projector is None and student_dim != teacher_dim)
            self.projector = nn.Linear(student_dim, teacher_dim, **factory) if wanted else None
        else:
            raise TypeError(
                f"projector must be None, a bool or an nn.Module, got {type(projector).__name__}"
            )
        if self.track_running_stats:
            for side in ("s", "t"):
                self.register_buffer(f"running_mean_{side}", torch.zeros(teacher_dim, **factory))
                self.register_buffer(f"running_var_{side}", torch.ones(teacher_dim, **factory))
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            for name in ("running_mean_s", "running_var_s", "running_mean_t", "running_var_t"):
                self.register_buffer(name, None)
            self.register_buffer("num_batches_tracked", None)

    def reset_running_stats(self) -> None:
        """Running means to 0, running variances to 1, num_batches_tracked to 0."""
        if self.track_running_stats:
            self.running_mean_s.zero_()
            self.running_var_s.fill_(1)
            self.running_mean_t.zero_()
            self.running_var_t.fill_(1)
            self.num_batches_tracked.zero_()

    def forward(
        self, student_features: torch.Tensor, teacher_features: torch.Tensor
    ) -> torch.Tensor:
        if self.global_batch:
            return self._global_forward(student_features, teacher_features)
        for name, x, width in (
            ("student_features", student_features, self.student_dim),
            ("teacher_features", teacher_features, self.teacher_dim),
        ):
            if isinstance(x, torch.Tensor) and x.dim() == 2 and x.shape[1] != width:
                raise ValueError(f"{name} must have {width} columns, got shape {tuple(x.shape)}")
        check_features(student_features, "student_features")
        z = self.projector(student_features) if self.projector is not None else student_features
        # As nn.BatchNorm1d: batch statistics in training or when nothing is tracked; the buffers
        # are passed whenever they exist (updated in training, read in eval).
        use_batch_stats = self.training or not self.track_running_stats
        buffers = {
            "running_mean_s": self.running_mean_s,
            "running_var_s": self.running_var_s,
            "running_mean_t": self.running_mean_t,
            "running_var_t": self.running_var_t,
        }
        p, eps = check_srd_args(z, teacher_features, self.p, self.eps, use_batch_stats, buffers)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / self.num_batches_tracked
        return _srd(
            z, teacher_features, p, eps, use_batch_stats, *buffers.values(), factor, self.backend
        )

    def _global_forward(
        self, student_features: torch.Tensor, teacher_features: torch.Tensor
    ) -> torch.Tensor:
        """forward() with ``global_batch=True``: :func:`fastkd.distributed.global_srd_loss` on
        (projector(student_features), teacher_features) with this module's buffers."""
        from fastkd.distributed import _inputs  # lazily: fastkd.distributed imports this module
        from fastkd.distributed.srd import global_srd_loss

        def project() -> torch.Tensor:
            for name, x, width in (
                ("student_features", student_features, self.student_dim),
                ("teacher_features", teacher_features, self.teacher_dim),
            ):
                _inputs.features(x, name)
                if x.shape[1] != width:
                    raise ValueError(f"{name} must have {width} columns, got {tuple(x.shape)}")
            return student_features if self.projector is None else self.projector(student_features)

        # A projector or width error on one rank must not leave the others waiting in a
        # collective: it is raised through the handshake, on every rank.
        z, problem = _inputs.capture(project)
        use_batch_stats = self.training or not self.track_running_stats
        updating = self.training and self.track_running_stats
        factor = 0.0 if self.momentum is None else self.momentum
        if updating and self.momentum is None:
            factor = 1.0 / (int(self.num_batches_tracked) + 1)  # cumulative average
        loss = global_srd_loss(
            z if problem is None else None,
            teacher_features,
            self.p,
            self.eps,
            use_batch_stats,
            self.running_mean_s,
            self.running_var_s,
            self.running_mean_t,
            self.running_var_t,
            factor,
            backend=self.backend,
            algorithm=self.algorithm,
            process_group=self.process_group,
            _problem=problem,
        )
        if updating:  # counted only once the call succeeded on every rank
            self.num_batches_tracked.add_(1)
        return loss

    def extra_repr(self) -> str:
        return (
            f"student_dim={self.student_dim}, teacher_dim={self.teacher_dim}, p={self.p}, "
            f"eps={self.eps}, momentum={self.momentum}, "
            f"track_running_stats={self.track_running_stats}, backend={self.backend!r}, "
            f"algorithm={self.algorithm!r}, global_batch={self.global_batch}"
        )
