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


def normalize_rows(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_i / max(||x_i||, eps), 1 / max(||x_i||, eps)) in ``dtype``; shapes (B, D) and (B, 1)."""
    x = x.to(dtype)
    inv_norm = 1.0 / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(NORM_EPS)
    return x * inv_norm, inv_norm


def normalize_backward(grad_a: torch.Tensor, a: torch.Tensor, inv_norm: torch.Tensor):
    """Chain rule of a = normalize(x): dx_i = (g_i - (g_i . a_i) a_i) / max(||x_i||, eps)."""
    return (grad_a - (grad_a * a).sum(1, keepdim=True) * a) * inv_norm


def _teacher_matrix(teachers, dtype):
    scale = 1.0 / math.sqrt(len(teachers))
    parts = [normalize_rows(t, dtype) for t in teachers]
    return torch.cat([a for a, _ in parts], dim=1) * scale, [inv for _, inv in parts]


def _unit_gradients(needs, kd_weight, fr_weight, student, teachers, a, inv_s, t, inv_t, grams):
    """Gradients of the loss (for an upstream gradient of 1) w.r.t. the inputs flagged in
    ``needs`` (student first), from the normalised matrices and Grams of the forward pass."""
    gram_s, cross, gram_t = grams
    b, ds = student.shape
    scale = kd_weight * 4.0 / (b * b)
    grads = [None] * (1 + len(teachers))
    if needs[0]:
        grad_a = scale * (a @ gram_s - t @ cross.T)
        grad = normalize_backward(grad_a, a, inv_s)
        if fr_weight != 0.0:
            grad = grad + fr_weight * 2.0 / (b * ds) * student.to(torch.float64)
        grads[0] = grad.to(student.dtype)
    if any(needs[1:]):
        # dL/dThat_e = -(4/B^2)/sqrt(E) * (A (A^T T) - T (T^T T))[:, cols of e]
        e_count = len(teachers)
        grad_t = -scale / math.sqrt(e_count) * (a @ cross - t @ gram_t)
        col = 0
        for e, te in enumerate(teachers):
            width = te.shape[1]
            if needs[1 + e]:
                t_hat = t[:, col : col + width] * math.sqrt(e_count)
                ge = normalize_backward(grad_t[:, col : col + width], t_hat, inv_t[e])
                grads[1 + e] = ge.to(te.dtype)
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
        a, inv_s = normalize_rows(student, torch.float64)
        t, inv_t = _teacher_matrix(teachers, torch.float64)
        grams = (a.T @ a, a.T @ t, t.T @ t)
        gram_s, cross, gram_t = grams
        total = gram_s.square().sum() - 2.0 * cross.square().sum() + gram_t.square().sum()
        loss = kd_weight * total.clamp_min(0.0) / (b * b)
        if fr_weight != 0.0:
            loss = loss + fr_weight * student.to(torch.float64).square().sum() / (b * ds)
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
