"""Global-batch SP (similarity-preserving KD, SPEC §2 and §5) in feature space.

With G = F F^T over the global batch and n_i = max(||G_i||, eps), the loss
``(1/B^2) sum_i || G_T,i / n_T,i - G_S,i / n_S,i ||^2`` expands into per-row terms that need
only D x D Grams (f_i are rows, all in float64):

    ||G_i||^2 = f_i^T (F^T F) f_i,    sum_j G_T,ij G_S,ij = f_T,i^T (F_T^T F_S) f_S,i

Communication, both in the forward pass (backward is local):
  1. one all_reduce of F_S^T F_S, F_T^T F_T (upper triangles) and F_T^T F_S;
  2. one all_reduce of this rank's share of the row sum and its derivative with respect to the
     three Grams (same size), so every rank holds dL/dGram summed over the global batch and
     forms its rows' gradient ``direct + 2 F_S,r dGs + F_T,r dC`` (and the teacher's likewise).
The gradient is scaled by W as in SPEC §5 (see :mod:`fastkd.distributed.fkd`).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

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
from fastkd.distributed.fkd import _pack_symmetric, _unpack_symmetric
from fastkd.losses._common import save_optional, scaled_optional
from fastkd.losses.sp import ALGORITHMS
from fastkd.reference import NORM_EPS
from fastkd.registry import resolve_backend
from fastkd.validation import check_algorithm


def _row_sum(fs, ft, gram_s, gram_t, cross):
    """This rank's share of B^2 x loss: sum over its rows of the expanded per-row terms."""
    eps_sq = NORM_EPS**2
    raw_s = ((fs @ gram_s) * fs).sum(1)  # ||G_S,i||^2, unclamped: a zero row adds 0, not 1
    raw_t = ((ft @ gram_t) * ft).sum(1)
    qs, qt = raw_s.clamp_min(eps_sq), raw_t.clamp_min(eps_sq)
    dot = ((ft @ cross) * fs).sum(1)  # sum_j G_T,ij G_S,ij
    return (raw_s / qs + raw_t / qt - 2.0 * dot / (qs * qt).sqrt()).sum()


class _GlobalSP(torch.autograd.Function):
    """``apply(hs, group, student, teacher)`` with (B_r, Ds), (B_r, Dt) -> 0-dim global loss."""

    @staticmethod
    def forward(ctx, hs: Handshake, group, student, teacher):
        out_dtype = (
            torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else (torch.float32)
        )
        fs, ft = student.to(torch.float64), teacher.to(torch.float64)
        ds, dt = fs.shape[1], ft.shape[1]
        n_s, n_t = ds * (ds + 1) // 2, dt * (dt + 1) // 2
        grams = all_reduce_sum(
            torch.cat(
                [_pack_symmetric(fs.T @ fs), _pack_symmetric(ft.T @ ft), (ft.T @ fs).view(-1)]
            ),
            group,
        )
        gram_s = _unpack_symmetric(grams[:n_s], ds)
        gram_t = _unpack_symmetric(grams[n_s : n_s + n_t], dt)
        cross = grams[n_s + n_t :].view(dt, ds).clone()

        needs = ctx.needs_input_grad[2:]
        leaves = [x.requires_grad_() for x in (gram_s, gram_t, cross)]
        fs_leaf = fs.detach().requires_grad_(bool(needs[0]))
        ft_leaf = ft.detach().requires_grad_(bool(needs[1]))
        with torch.enable_grad():
            partial = _row_sum(fs_leaf, ft_leaf, *leaves)
        if any(needs):
            wanted = leaves + [x for x in (fs_leaf, ft_leaf) if x.requires_grad]
            d = torch.autograd.grad(partial, wanted, allow_unused=True)
            d = [torch.zeros_like(w) if g is None else g for g, w in zip(d, wanted, strict=True)]
            d_gs, d_gt, d_c, *direct = d
            # Sum over ranks of the loss share and its derivative w.r.t. the Grams (symmetric
            # for the two Grams, so their triangles suffice).
            reduced = all_reduce_sum(
                torch.cat(
                    [
                        partial.detach().reshape(1),
                        _pack_symmetric(d_gs),
                        _pack_symmetric(d_gt),
                        d_c.reshape(-1),
                    ]
                ),
                group,
            )
            total = reduced[0]
            d_gs = _unpack_symmetric(reduced[1 : 1 + n_s], ds)
            d_gt = _unpack_symmetric(reduced[1 + n_s : 1 + n_s + n_t], dt)
            d_c = reduced[1 + n_s + n_t :].view(dt, ds)
        else:
            total = all_reduce_sum(partial.detach().reshape(1), group)[0]
        b = hs.batch
        loss = total.clamp_min(0.0) / (b * b)

        grads: list[torch.Tensor | None] = [None, None]
        if any(needs):
            # Zero when the clamp is active (the roundoff-negative case of identical inputs).
            scale = hs.world_size / (b * b) * float(total >= 0)
            it = iter(direct)
            if needs[0]:
                g = next(it) + 2.0 * (fs @ d_gs) + ft @ d_c
                grads[0] = (g * scale).to(student.dtype)
            if needs[1]:
                g = next(it) + 2.0 * (ft @ d_gt) + fs @ d_c.T
                grads[1] = (g * scale).to(teacher.dtype)
        save_optional(ctx, grads)
        return loss.to(out_dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        return None, None, *scaled_optional(ctx, grad)


@torch.compiler.disable(reason=COMPILE_REASON)
def global_sp_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    backend: str | None = None,
    algorithm: str = "auto",
    process_group=None,
) -> torch.Tensor:
    """SP loss over the global batch (all ranks' rows in rank order; SPEC §2, §5).

    A collective: every rank must call it; widths and dtypes must agree across ranks (else an
    error on every rank), local batch sizes may differ (>= 1 each, global >= 2).

    Args:
        student: (B_r, ...) student features, flattened to (B_r, Ds); float16..float64.
        teacher: (B_r, ...) teacher features, flattened to (B_r, Dt).
        backend: "auto" | "reference" (None reads $FASTKD_BACKEND), validated as by
            :func:`fastkd.sp_loss`; the global path is plain float64 GEMMs on the features'
            device.
        algorithm: "auto" | "explicit" | "dual", validated; the global path always works in
            feature space (both algorithms are exact, and the Grams are what ranks can sum).
        process_group: None for the default group.

    Returns:
        0-dim loss ``(1/B^2) sum (G_T - G_S)^2`` of the row-normalised global Grams G = F F^T,
        float32 (float64 if an input is float64), identical on every rank. Computed in float64
        in feature space, O(B_r D^2) time, two all_reduces of ~Ds^2/2 + Dt^2/2 + Ds Dt values
        (one if nothing requires grad). This rank's rows get W x dL/dF_r.

    ``fastkd.sp_loss(..., global_batch=True)`` and ``SPLoss(global_batch=True)`` call this.
    Under ``torch.compile`` it runs eagerly (a graph break).
    """
    group = require_group(process_group)

    def check():
        s = _inputs.features(student, "student", flatten=True)
        t = _inputs.features(teacher, "teacher", flatten=True)
        _inputs.same_rows(s, "student", t, "teacher")
        check_algorithm(algorithm, ALGORITHMS)
        resolve_backend("sp", backend, s.device)
        grad = torch.is_grad_enabled() and (s.requires_grad or t.requires_grad)
        fields = [
            ("student width", s.shape[1]),
            ("student dtype", dtype_code(s.dtype)),
            ("teacher width", t.shape[1]),
            ("teacher dtype", dtype_code(t.dtype)),
            ("requires grad", int(grad)),  # decides whether a second all_reduce happens
        ]
        return s, t, fields

    checked, problem = _inputs.capture(check)
    device = comm_device(group, _inputs.device_of(student))
    if problem is not None:
        handshake("sp", group, device, 0, [], problem)
    s, t, fields = checked
    hs = handshake("sp", group, device, s.shape[0], fields)
    return _GlobalSP.apply(hs, group, s, t)
