"""Gram matrices of :mod:`fastkd.selfdistill`: ``rbf_kernel`` and ``linear_kernel``.

Both take (m, d) and (n, d) tensors and return the (m, n) Gram matrix in ``x1``'s dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastkd.validation import check_kernel_inputs, check_real

KernelArg = str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _sq_dists(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    # |a|^2 + |b|^2 - 2 a.b: one matmul; clamp the roundoff negatives of near-duplicates.
    d = x1.square().sum(1, keepdim=True) + x2.square().sum(1)[None, :] - 2.0 * (x1 @ x2.T)
    return d.clamp_min_(0.0)


def rbf_kernel(x1: torch.Tensor, x2: torch.Tensor, gamma: float) -> torch.Tensor:
    """Gaussian (RBF) Gram matrix ``k(x, x') = exp(-gamma ||x - x'||^2)``.

    Args:
        x1: (m, d) floating tensor.
        x2: (n, d) tensor of the same dtype and device.
        gamma: inverse squared length scale, finite and > 0 (scikit-learn convention).

    Returns:
        (m, n) tensor, same dtype/device as ``x1``.
    """
    gamma = check_real(gamma, "gamma")
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    check_kernel_inputs(x1, x2)
    return torch.exp(-gamma * _sq_dists(x1, x2))


def linear_kernel(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """Linear Gram matrix ``k(x, x') = <x, x'>``: (m, d), (n, d) -> (m, n)."""
    check_kernel_inputs(x1, x2)
    return x1 @ x2.T
