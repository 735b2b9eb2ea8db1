"""FKD in feature space (SPEC §1, "dual"): D x D Gram products instead of B x B kernels.

With A = normalize(fs) (B x Ds) and T the normalised teachers concatenated along columns and
scaled by 1/sqrt(E) (B x Dt), the identities

    sum (rho_S - rho_T)^2 = ||A^T A||_F^2 - 2 ||A^T T||_F^2 + ||T^T T||_F^2
    G = (4/B^2) (A (A^T A) - T (T^T A))

give the loss and gradient in O(B (Ds + Dt)^2) time and O((Ds + Dt)^2) extra memory. It is
plain GEMMs, so it runs on every device. The three terms nearly cancel when student and teacher
agree, so the Grams and G are formed in float64 whatever the input dtype (fp32 Grams would lose
the small difference to rounding).
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from fastkd.reference import NORM_EPS, loss_dtype


def normalize_rows(
    x: torch.Tensor, dtype: torch.dtype, scale: float = 1.0, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(scale * x_i / max(||x_i||, eps), 1 / max(||x_i||, eps), sum ||x_i||^2)`` in ``dtype``.

    Shapes (B, D), (B, 1) and (). ``out`` may be a (B, D) column slice of a wider buffer. The
    cast, the norms and the scaling are three passes over one (B, D) buffer (mixed-dtype
    torch ops would allocate a cast copy each).
    """
    a = x.to(dtype, copy=True) if out is None else out.copy_(x)
    norms = torch.linalg.vector_norm(a, dim=1, keepdim=True)
    inv_norm = norms.clamp_min(NORM_EPS).reciprocal_()
    a.mul_(inv_norm * scale if scale != 1.0 else inv_norm)
    return a, inv_norm, norms.square().sum()


def normalize_backward_(grad_a, a, inv_norm, out, scale_a=1.0, input_weight=0.0):
    """Chain rule of a = scale_a * normalize(x), in place on ``grad_a``, cast into ``out``:
    ``dx_i = (g_i - (g_i . â_i) â_i) / max(||x_i||, eps) + input_weight * x_i`` with
    â = a / scale_a. The input term uses x_i = â_i / inv_norm_i, so the whole epilogue is one
    row dot product and two in-place passes."""
    dot = torch.einsum("ij,ij->i", grad_a, a).unsqueeze(1)  # no (B, D) temporary
    coef = dot * inv_norm * (-1.0 / (scale_a * scale_a))
    if input_weight != 0.0:
        coef += input_weight / (scale_a * inv_norm)
    grad_a.mul_(inv_norm).addcmul_(a, coef)
    return out.copy_(grad_a)


def _teacher_matrix(teachers, dtype):
    """Normalised teachers side by side, scaled by 1/sqrt(E): (B, sum Dt_e), without a cat."""
    scale = 1.0 / math.sqrt(len(teachers))
    t = teachers[0].new_empty(
        (teachers[0].shape[0], sum(x.shape[1] for x in teachers)), dtype=dtype
    )
    inv, col = [], 0
    for te in teachers:
        _, inv_e, _ = normalize_rows(te, dtype, scale, out=t[:, col : col + te.shape[1]])
        inv.append(inv_e)
        col += te.shape[1]
    return t, inv


def _unit_gradients(needs, kd_weight, fr_weight, student, teachers, a, inv_s, t, inv_t, grams):
    """Gradients of the loss (for an upstream gradient of 1) w.r.t. the inputs flagged in
    ``needs`` (student first), from the normalised matrices and Grams of the forward pass.
    The scale factors go into the small D x D operands, and the products accumulate in the
    GEMM (``addmm_``), so each gradient costs its two GEMMs plus three elementwise passes
    (row dots, the in-place update, the cast)."""
    gram_s, cross, gram_t = grams
    b, ds = student.shape
    scale = kd_weight * 4.0 / (b * b)
    grads = [None] * (1 + len(teachers))
    if needs[0]:
        # dL/dA = scale * (A (A^T A) - T (T^T A))
        grad_a = torch.mm(t, cross.T * -scale).addmm_(a, gram_s * scale)
        grads[0] = normalize_backward_(
            grad_a,
            a,
            inv_s,
            torch.empty_like(student),
            input_weight=fr_weight * 2.0 / (b * ds),
        )
    if any(needs[1:]):
        # dL/dT = -scale * (A (A^T T) - T (T^T T)) for T = [T_1 .. T_E] / sqrt(E); the chain
        # rule through the 1/sqrt(E) factor and each normalisation is normalize_backward_'s.
        e_count = len(teachers)
        root = math.sqrt(e_count)
        grad_t = torch.mm(a, cross * (-scale / root)).addmm_(t, gram_t * (scale / root))
        col = 0
        for e, te in enumerate(teachers):
            width = te.shape[1]
            if needs[1 + e]:
                cols = slice(col, col + width)
                grads[1 + e] = normalize_backward_(
                    grad_t[:, cols], t[:, cols], inv_t[e], torch.empty_like(te), scale_a=1.0 / root
                )
            col += width
    return grads


class FKDDualFunction(torch.autograd.Function):
    """Autograd Function of the feature-space FKD loss.

    ``apply(kd_weight, fr_weight, student, *teachers)`` with student (B, Ds) and teachers
    (B, Dt_e), any floating dtype; returns the 0-dim loss in float32 (float64 for float64
    inputs), gradients in each input's dtype. Once the Grams exist the gradients cost two more
    B x D x D products, so the forward pass computes them for the inputs that require grad and
    the backward pass only scales them (no second normalisation of the inputs).
    """

    @staticmethod
    def forward(ctx, kd_weight: float, fr_weight: float, student, *teachers):
        out_dtype = loss_dtype(student, *teachers)
        b, ds = student.shape
        a, inv_s, student_sq = normalize_rows(student, torch.float64)
        t, inv_t = _teacher_matrix(teachers, torch.float64)
        grams = (a.T @ a, a.T @ t, t.T @ t)
        gram_s, cross, gram_t = grams
        total = gram_s.square().sum() - 2.0 * cross.square().sum() + gram_t.square().sum()
        loss = kd_weight * total.clamp_min(0.0) / (b * b)
        if fr_weight != 0.0:
            loss = loss + fr_weight * student_sq / (b * ds)
        grads = _unit_gradients(
            ctx.needs_input_grad[2:],
            kd_weight,
            fr_weight,
            student,
            teachers,
            a,
            inv_s,
            t,
            inv_t,
            grams,
        )
        ctx.present = [g is not None for g in grads]
        ctx.save_for_backward(*[g for g in grads if g is not None])
        return loss.to(out_dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) if present else None for present in ctx.present]
        return None, None, *[g * grad.to(g.dtype) if g is not None else None for g in grads]
