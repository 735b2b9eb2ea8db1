"""fastkd: fused, exact knowledge-distillation losses for PyTorch.

Losses (function and module): :func:`fkd_loss` / :class:`FKDLoss` (feature kernel
distillation), :func:`sp_loss` / :class:`SPLoss`, :func:`rkd_distance_loss` /
:class:`RKDDistanceLoss`, :func:`srd_loss` / :class:`SRDLoss` (LogSum of batch-normalised
features). Each takes ``backend="auto"|"cpu"|"cuda"|"triton"|"reference"`` and ``algorithm=``;
:func:`available_backends` tells what this install can run. :mod:`fastkd.reference` is the
pure-PyTorch oracle of ``docs/SPEC.md``. Self-distillation with ground-truth targets lives in
:mod:`fastkd.selfdistill` (:class:`KernelRidgeSelfDistiller`, :func:`self_distillation_loss`).
The layers (reference, validation, registry, kernels, ops, losses) are described in
``docs/architecture.md``.
"""

from fastkd import _compat, ops, reference  # noqa: F401  (ops registers the compiled ops)
from fastkd.losses import (
    FKDDualFunction,
    FKDFunction,
    FKDLoss,
    RKDDistanceLoss,
    RKDFunction,
    SPLoss,
    SRDFunction,
    SRDLoss,
    fkd_loss,
    rkd_distance_loss,
    sp_loss,
    srd_loss,
)
from fastkd.registry import BackendUnavailableError, available_backends, resolve_backend
from fastkd.selfdistill import (
    KernelRidgeSelfDistiller,
    SelfDistillationLoss,
    estimate_alpha,
    linear_kernel,
    rbf_kernel,
    self_distillation_loss,
)

_compat.install()

__version__ = "0.1.0"  # the one place it is written: pyproject.toml reads it

__all__ = [
    "BackendUnavailableError",
    "FKDDualFunction",
    "FKDFunction",
    "FKDLoss",
    "KernelRidgeSelfDistiller",
    "RKDDistanceLoss",
    "RKDFunction",
    "SPLoss",
    "SelfDistillationLoss",
    "SRDFunction",
    "SRDLoss",
    "available_backends",
    "estimate_alpha",
    "fkd_loss",
    "linear_kernel",
    "rbf_kernel",
    "reference",
    "resolve_backend",
    "rkd_distance_loss",
    "self_distillation_loss",
    "sp_loss",
    "srd_loss",
]
