"""Global-batch losses under torch.distributed (SPEC §5).

Every rank holds a local batch (sizes may differ); these losses are the loss of the
concatenation of all ranks' batches in rank order, identical on every rank, and the gradients
make DistributedDataParallel's averaged parameter gradients equal those of one process on the
concatenated batch (a rank's own rows receive W x dL/dF_r). See ``docs/distributed.md``.

- :func:`global_fkd_loss`: FKD by one all_reduce of the D x D Grams ("dual") or by gathering
  the features and running the fused kernel-space loss on the global batch ("tiled");
  :func:`plan_global_fkd` / :func:`explain_global_fkd` report which one "auto" picks and why.
- :func:`global_sp_loss`: SP in feature space from all_reduced Grams.
- :func:`global_rkd_distance_loss`: RKD distance on the gathered batch (fused backends).
- :func:`global_srd_loss` / :class:`GlobalSRDLoss`: SRD with nn.SyncBatchNorm semantics.
- :func:`all_gather_with_grad` / :func:`all_reduce_with_grad`: autograd-aware, uneven-batch
  collectives for user-written global losses.

All of them need an initialised process group (``RuntimeError`` otherwise) and are
collectives: every rank must call them in the same order.
"""

from fastkd.distributed.collectives import (
    GlobalBatchError,
    all_gather_with_grad,
    all_reduce_with_grad,
)
from fastkd.distributed.fkd import global_fkd_loss
from fastkd.distributed.plan import (
    COST_MODELS,
    CostModel,
    GlobalFKDPlan,
    explain_global_fkd,
    plan_global_fkd,
)
from fastkd.distributed.rkd import global_rkd_distance_loss
from fastkd.distributed.sp import global_sp_loss
from fastkd.distributed.srd import GlobalSRDLoss, global_srd_loss

__all__ = [
    "COST_MODELS",
    "CostModel",
    "GlobalBatchError",
    "GlobalFKDPlan",
    "GlobalSRDLoss",
    "all_gather_with_grad",
    "all_reduce_with_grad",
    "explain_global_fkd",
    "global_fkd_loss",
    "global_rkd_distance_loss",
    "global_sp_loss",
    "global_srd_loss",
    "plan_global_fkd",
]
