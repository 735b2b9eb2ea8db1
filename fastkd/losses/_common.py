"""What the loss modules share: the kernel-space / feature-space cost model, the gradient
scaling of the fused autograd Functions and the ``global_batch=`` switch."""

from __future__ import annotations

import torch

from fastkd.validation import check_bool

# A kernel-space algorithm (tiled kernels, or the explicit B x B Grams) costs ~3 B^2 D flops
# for D = Ds + Dt, the feature-space ("dual") one ~2 B D^2 in float64 (2x an fp32 flop on
# CPUs, more on consumer GPUs), so the break-even sits near B = D: "auto" picks the dual when
# B >= DUAL_RATIO * D. FKD and SP use the same rule.
DUAL_RATIO = 2.0


def prefers_dual(batch: int, width: int) -> bool:
    """Whether "auto" picks the feature-space algorithm for a batch of ``batch`` rows and
    ``width`` = Ds + Dt feature columns in all."""
    return batch >= DUAL_RATIO * width


def scale_saved(grad_unit: torch.Tensor | None, grad: torch.Tensor) -> torch.Tensor | None:
    """A gradient saved for a unit upstream gradient, times the actual (0-dim) ``grad``."""
    return None if grad_unit is None else grad_unit * grad.to(grad_unit.dtype)


def save_optional(ctx, grads) -> None:
    """Save the gradients of a Function's tensor inputs (None where not needed) for
    :func:`scaled_optional`."""
    ctx.present = [g is not None for g in grads]
    ctx.save_for_backward(*[g for g in grads if g is not None])


def scaled_optional(ctx, grad: torch.Tensor) -> list[torch.Tensor | None]:
    """The gradients saved by :func:`save_optional`, each times the 0-dim upstream ``grad``."""
    saved = iter(ctx.saved_tensors)
    return [scale_saved(next(saved) if present else None, grad) for present in ctx.present]


def wants_global(global_batch: object, process_group: object) -> bool:
    """Whether a loss runs over the global batch (:mod:`fastkd.distributed`, SPEC §5).

    ``global_batch`` must be a bool; a ``process_group`` without ``global_batch=True`` is an
    error rather than a silently local loss.
    """
    if check_bool(global_batch, "global_batch"):
        return True
    if process_group is not None:
        raise ValueError(
            "process_group is only used with global_batch=True (the local loss communicates "
            "nothing); pass global_batch=True or drop process_group"
        )
    return False
