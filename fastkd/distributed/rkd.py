"""Global-batch RKD distance (Park et al. 2019; SPEC §2 and §5).

RKD does not decompose over ranks (the mean distance normalises every pair, and the smooth-L1
acts on square roots), so every rank all_gathers the flattened features (uneven batches padded)
and runs :func:`fastkd.rkd_distance_loss` with the requested fused backend on the whole global
batch. Every rank computes the full B x B sweeps (redundant work, W x a row-block split's);
the gradient on the gathered batch is identical on every rank, so this rank's rows are sliced
out locally and scaled by W (SPEC §5), with nothing communicated in backward.
"""

from __future__ import annotations

import torch

from fastkd.distributed import _inputs
from fastkd.distributed.collectives import (
    COMPILE_REASON,
    comm_device,
    dtype_code,
    gathered_loss,
    handshake,
    require_group,
)
from fastkd.losses.rkd import ALGORITHMS, rkd_distance_loss
from fastkd.registry import resolve_backend
from fastkd.validation import check_algorithm, check_precision


@torch.compiler.disable(reason=COMPILE_REASON)
def global_rkd_distance_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    backend: str | None = None,
    algorithm: str = "auto",
    precision: str = "ieee",
    process_group=None,
) -> torch.Tensor:
    """RKD distance loss over the global batch (all ranks' rows in rank order).

    A collective: every rank must call it; widths and dtypes must agree across ranks (else an
    error on every rank), local batch sizes may differ (>= 1 each, global >= 2).

    Args:
        student: (B_r, ...) student features, flattened to (B_r, Ds).
        teacher: (B_r, ...) teacher features, flattened to (B_r, Dt).
        backend: fused backend run on the gathered batch ("auto" | "cpu" | "cuda" | "triton" |
            "reference"; None reads $FASTKD_BACKEND).
        algorithm: "auto" or "tiled" (the only one), as in :func:`fastkd.rkd_distance_loss`.
        precision: float32 products of the kernels (SPEC §6), as in
            :func:`fastkd.rkd_distance_loss`.
        process_group: None for the default group.

    Returns:
        0-dim loss, float32 (float64 if an input is float64), identical on every rank; this
        rank's rows get W x dL/dF_r. Communication: one all_gather of W max(B_r) x (Ds + Dt)
        values (one per dtype when student and teacher dtypes differ).

    ``fastkd.rkd_distance_loss(..., global_batch=True)`` and ``RKDDistanceLoss(global_batch=
    True)`` call this. Under ``torch.compile`` it runs eagerly (a graph break).
    """
    group = require_group(process_group)

    def check():
        s = _inputs.features(student, "student", flatten=True)
        t = _inputs.features(teacher, "teacher", flatten=True)
        _inputs.same_rows(s, "student", t, "teacher")
        check_algorithm(algorithm, ALGORITHMS)
        check_precision(precision)
        resolve_backend("rkd", backend, s.device)
        fields = [
            ("student width", s.shape[1]),
            ("student dtype", dtype_code(s.dtype)),
            ("teacher width", t.shape[1]),
            ("teacher dtype", dtype_code(t.dtype)),
        ]
        return s, t, fields

    checked, problem = _inputs.capture(check)
    device = comm_device(group, _inputs.device_of(student))
    if problem is not None:
        handshake("rkd", group, device, 0, [], problem)
    s, t, fields = checked
    hs = handshake("rkd", group, device, s.shape[0], fields)

    def loss_fn(gs, gt):
        return rkd_distance_loss(gs, gt, backend=backend, precision=precision)

    return gathered_loss(loss_fn, hs, group, s.contiguous(), t.contiguous())
