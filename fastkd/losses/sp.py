"""Similarity-preserving loss (Tung & Mori, ICCV 2019; SPEC §2): functional and Module.

SP has no fused kernels: the recipe of :mod:`fastkd.losses` reduces to validate
(:mod:`fastkd.validation`) -> resolve the backend (:mod:`fastkd.registry`; only ``reference``
implements "sp", so asking for another one raises :class:`fastkd.BackendUnavailableError`)
-> choose the algorithm (the FKD cost model, :func:`fastkd.losses._common.prefers_dual`) ->
run it. Both algorithms are exact and run on any device:

* "explicit": :func:`fastkd.reference.sp_loss`, the two B x B Grams.
* "dual": feature space, O(B D^2) time, O(D^2) extra memory. With G = F F^T,

      ||G_i||^2 = f_i^T (F^T F) f_i,    sum_j Gt_ij Gs_ij = ft_i^T (Ft^T Fs) fs_i

  so ``B^2 loss = sum_i [|Gt_i|^2/nt_i^2 + |Gs_i|^2/ns_i^2 - 2 ft_i^T C fs_i / (nt_i ns_i)]``
  with C = Ft^T Fs and n the clamped row norms of G. The terms cancel when student and teacher
  agree, so it runs in float64. It is an autograd composite (no Function): plain differentiable
  torch ops, so autograd derives the gradient and ``torch.compile`` traces it.

``global_batch=True`` hands the call to :func:`fastkd.distributed.global_sp_loss` (the loss of
every rank's rows, SPEC §5), which works in feature space from all_reduced Grams.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from fastkd import reference
from fastkd.losses._common import prefers_dual, wants_global
from fastkd.registry import resolve_backend
from fastkd.validation import check_algorithm, check_pair

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

OP = "sp"
ALGORITHMS = ("auto", "explicit", "dual")
SP_ALGORITHMS = ALGORITHMS  # the name of fastkd.relational

__all__ = ["ALGORITHMS", "SPLoss", "choose_algorithm", "sp_dual", "sp_loss"]


def choose_algorithm(algorithm: str, batch: int, student_width: int, teacher_width: int) -> str:
    """Resolve ``algorithm`` ("auto" | "explicit" | "dual"), with FKD's rule: "auto" is "dual"
    when B >= DUAL_RATIO * (Ds + Dt)."""
    check_algorithm(algorithm, ALGORITHMS)
    if algorithm != "auto":
        return algorithm
    return "dual" if prefers_dual(batch, student_width + teacher_width) else "explicit"


def sp_dual(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """SP loss in feature space (module docstring): (B, Ds), (B, Dt) -> 0-dim loss in
    :func:`fastkd.reference.loss_dtype`, computed in float64; differentiable by autograd."""
    fs = student.flatten(1).to(torch.float64)
    ft = teacher.flatten(1).to(torch.float64)
    eps_sq = reference.NORM_EPS**2

    def row_norms_sq(f):  # ||(F F^T)_i||^2 = f_i^T (F^T F) f_i, clamped like F.normalize
        return ((f @ (f.T @ f)) * f).sum(1).clamp_min(eps_sq)

    qs, qt = row_norms_sq(fs), row_norms_sq(ft)
    cross = ((ft @ (ft.T @ fs)) * fs).sum(1)  # sum_j Gt_ij Gs_ij
    raw_s = ((fs @ (fs.T @ fs)) * fs).sum(1)  # unclamped: a zero row contributes 0, not 1
    raw_t = ((ft @ (ft.T @ ft)) * ft).sum(1)
    total = raw_s / qs + raw_t / qt - 2.0 * cross / (qs * qt).sqrt()
    b = fs.shape[0]
    return (total.sum().clamp_min(0.0) / (b * b)).to(reference.loss_dtype(student, teacher))


def sp_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    backend: str | None = None,
    algorithm: str = "auto",
    global_batch: bool = False,
    process_group: ProcessGroup | None = None,
) -> torch.Tensor:
    """Similarity-preserving loss. student (B, ...), teacher (B, ...) (flattened to (B, D)).

    ``G = F F^T``, rows L2-normalised; ``loss = (1/B^2) sum (G_T - G_S)^2`` (0-dim, float32 or
    float64). ``backend``: "auto" | "reference" (None reads ``$FASTKD_BACKEND``); other
    backends have no SP kernel and raise. ``algorithm``: "explicit" forms the two B x B Grams
    (the reference), "dual" works in feature space (module docstring), "auto" picks dual when
    B >= 2 (Ds + Dt).

    ``global_batch=True``: the loss of the GLOBAL batch (every rank's rows in rank order, SPEC
    §5) through :func:`fastkd.distributed.global_sp_loss`, a collective every rank of
    ``process_group`` (None: the default group) must call; local batches may differ (>= 1 each,
    global >= 2). It always runs in feature space (two all_reduces of D x D Grams, whatever
    ``algorithm``: both are exact), identical on every rank; this rank's rows get W x dL/dF_r,
    so DDP's averaging yields the single-process gradients. Needs an initialised process group
    (``RuntimeError`` otherwise); runs eagerly under ``torch.compile`` (a graph break).
    """
    if wants_global(global_batch, process_group):
        # Lazily: fastkd.distributed imports the losses. Its checks join the ranks' handshake.
        from fastkd.distributed.sp import global_sp_loss

        return global_sp_loss(
            student, teacher, backend=backend, algorithm=algorithm, process_group=process_group
        )
    flat_s, flat_t = check_pair(student, teacher)
    resolve_backend(OP, backend, flat_s.device)
    algo = choose_algorithm(algorithm, flat_s.shape[0], flat_s.shape[1], flat_t.shape[1])
    if algo == "dual":
        return sp_dual(flat_s, flat_t)
    return reference.sp_loss(flat_s, flat_t)


class SPLoss(nn.Module):
    """Module form of :func:`sp_loss`: ``SPLoss()(student, teacher)`` -> 0-dim loss, with the
    same keywords (``global_batch=True``: the loss of the global batch)."""

    def __init__(
        self,
        *,
        backend: str | None = None,
        algorithm: str = "auto",
        global_batch: bool = False,
        process_group: ProcessGroup | None = None,
    ):
        super().__init__()
        self.backend = backend
        self.algorithm = check_algorithm(algorithm, ALGORITHMS)
        self.global_batch = wants_global(global_batch, process_group)
        self.process_group = process_group

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return sp_loss(
            student,
            teacher,
            backend=self.backend,
            algorithm=self.algorithm,
            global_batch=self.global_batch,
            process_group=self.process_group,
        )

    def extra_repr(self) -> str:
        return (
            f"backend={self.backend!r}, algorithm={self.algorithm!r}, "
            f"global_batch={self.global_batch}"
        )
