"""Self-distillation loss for networks (paper Section 5): function and module.

Per sample ``l_i = alpha/2 ||f_i - Y_i||^2 + (1 - alpha)/2 ||f_i - Yt_i||^2``.
"""

from __future__ import annotations

import torch
from torch import nn

from fastkd.validation import check_real, check_tensor

REDUCTIONS = ("mean", "sum", "none")


def self_distillation_loss(
    outputs: torch.Tensor,
    targets: torch.Tensor,
    teacher_outputs: torch.Tensor,
    alpha: float,
    reduction: str = "mean",
) -> torch.Tensor:
    """Weighted squared loss of self-distillation with ground truth (paper Section 5).

    Per sample ``i`` (sums over all non-batch entries)::

        l_i = alpha/2 ||f_i - Y_i||^2 + (1 - alpha)/2 ||f_i - Yt_i||^2

    ``reduction="sum"`` gives ``sum_i l_i``, the paper's
    ``alpha/2 ||f - Y||_F^2 + (1 - alpha)/2 ||f - Y^(t-1)||_F^2``; ``"mean"`` (default) gives
    ``sum_i l_i / n`` with ``n = outputs.shape[0]`` (so the scale does not grow with the batch
    size; the minimiser is the same); ``"none"`` gives the (n,) vector ``l``.
    The minimiser over ``f`` is ``alpha Y + (1 - alpha) Yt`` whatever ``alpha``.

    Gradients flow into every input that requires grad; detach ``teacher_outputs`` (or compute
    it under ``torch.no_grad()``) for the usual fixed teacher. NaN/Inf in the tensors propagate.

    Args:
        outputs: (n, ...) student predictions ``f``, floating.
        targets: ground-truth ``Y``, same shape and device.
        teacher_outputs: previous-step predictions ``Y^(t-1)``, same shape and device.
        alpha: finite weight of the ground truth (paper: [0, 1]; see module docstring).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        0-dim tensor (or (n,) for ``"none"``) in float32, or float64 if any input is float64.
    """
    alpha = check_real(alpha, "alpha")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    names = ("outputs", "targets", "teacher_outputs")
    ts = (outputs, targets, teacher_outputs)
    for name, t in zip(names, ts, strict=True):
        check_tensor(t, name)
        if t.dim() == 0:
            raise ValueError(f"{name} must have a batch axis, got a 0-dim tensor")
        if t.numel() == 0:
            raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")
        if t.shape != outputs.shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but outputs has {tuple(outputs.shape)}"
            )
        if t.device != outputs.device:
            raise ValueError(f"{name} is on {t.device} but outputs is on {outputs.device}")
    acc = torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32
    f, y, yt = (t.to(acc) for t in ts)
    n = f.shape[0]
    gt = (f - y).square().reshape(n, -1).sum(1)
    kd = (f - yt).square().reshape(n, -1).sum(1)
    per_sample = 0.5 * alpha * gt + 0.5 * (1.0 - alpha) * kd
    if reduction == "none":
        return per_sample
    total = per_sample.sum()
    return total / n if reduction == "mean" else total


class SelfDistillationLoss(nn.Module):
    """Module form of :func:`self_distillation_loss`.

    Args:
        alpha: ground-truth weight; may be reassigned between distillation steps
            (e.g. ``loss.alpha = estimate_alpha(...)``).
        reduction: ``"mean"`` (default, divides by the batch size), ``"sum"`` (the paper's
            formula) or ``"none"``.

    ``forward(outputs, targets, teacher_outputs)`` -> loss, shapes as in the function.
    """

    def __init__(self, alpha: float, reduction: str = "mean") -> None:
        super().__init__()
        self.alpha = check_real(alpha, "alpha")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction

    def forward(
        self, outputs: torch.Tensor, targets: torch.Tensor, teacher_outputs: torch.Tensor
    ) -> torch.Tensor:
        return self_distillation_loss(
            outputs, targets, teacher_outputs, self.alpha, reduction=self.reduction
        )

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, reduction={self.reduction!r}"
