"""The losses: one module per loss, each an autograd Function (when the loss has fused
kernels), a functional and an ``nn.Module``, built by one recipe:

1. validate the arguments with :mod:`fastkd.validation`;
2. resolve the backend with :func:`fastkd.registry.resolve_backend`;
3. choose the algorithm (``algorithm=`` keyword, "auto" by default);
4. the reference backend runs :mod:`fastkd.reference`; a fused backend runs
   ``<Op>Function.apply(backend, ...)``, which calls the registry's kernels (forward-backward
   when an input requires grad, forward otherwise; backward scales the saved gradients or calls
   the backward kernel);
5. the Module wraps the functional with the same keywords, type hints and ``extra_repr``.

:mod:`fastkd.losses.fkd` (+ :mod:`fastkd.losses.fkd_dual`), :mod:`fastkd.losses.sp`,
:mod:`fastkd.losses.rkd`, :mod:`fastkd.losses.srd`.
"""

from fastkd.losses.fkd import FKDDualFunction, FKDFunction, FKDLoss, fkd_loss
from fastkd.losses.rkd import RKDDistanceLoss, RKDFunction, rkd_distance_loss
from fastkd.losses.sp import SPLoss, sp_loss
from fastkd.losses.srd import SRDFunction, SRDLoss, srd_loss

__all__ = [
    "FKDDualFunction",
    "FKDFunction",
    "FKDLoss",
    "RKDDistanceLoss",
    "RKDFunction",
    "SPLoss",
    "SRDFunction",
    "SRDLoss",
    "fkd_loss",
    "rkd_distance_loss",
    "sp_loss",
    "srd_loss",
]
