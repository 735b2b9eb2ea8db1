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


class FKDDualFunction(torch.autograd.Function):
    """Autograd Function of the feature-space FKD loss.

    ``apply(kd_weight, fr_weight, student, *teachers)`` with student (B, Ds) and teachers
    (B, Dt_e), any floating dtype; returns the 0-dim loss in float32 (float64 for float64
    inputs), gradients in each input's dtype.
    """

    @staticmethod
    def forward(ctx, kd_weight: float, fr_weight: float, student, *teachers):
        out_dtype = loss_dtype(student, *teachers)
        b, ds = student.shape
        a, _ = normalize_rows(student, torch.float64)
        t, _ = _teacher_matrix(teachers, torch.float64)
        gram_s = a.T @ a
        cross = a.T @ t
        gram_t = t.T @ t
        total = gram_s.square().sum() - 2.0 * cross.square().sum() + gram_t.square().sum()
        loss = kd_weight * total.clamp_min(0.0) / (b * b)
        if fr_weight != 0.0:
            loss = loss + fr_weight * student.to(torch.float64).square().sum() / (b * ds)
        # The D x D products are all the backward pass needs besides the inputs: keep them.
        ctx.save_for_backward(student, gram_s, cross, gram_t, *teachers)
        ctx.weights = (kd_weight, fr_weight)
        return loss.to(out_dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        student, gram_s, cross, gram_t, *teachers = ctx.saved_tensors
        kd_weight, fr_weight = ctx.weights
        b, ds = student.shape
        g = grad.to(torch.float64)
        a, inv_s = normalize_rows(student, torch.float64)
        t, inv_t = _teacher_matrix(teachers, torch.float64)
        scale = g * kd_weight * 4.0 / (b * b)
        grad_student = None
        if ctx.needs_input_grad[2]:
            grad_a = scale * (a @ gram_s - t @ cross.T)
            grad_student = normalize_backward(grad_a, a, inv_s)
            if fr_weight != 0.0:
                grad_student = grad_student + g * fr_weight * 2.0 * student.to(torch.float64) / (
                    b * ds
                )
            grad_student = grad_student.to(student.dtype)
        grad_teachers = [None] * len(teachers)
        if any(ctx.needs_input_grad[3:]):
            # dL/dThat_e = -(4/B^2)/sqrt(E) * (A (A^T T) - T (T^T T))[:, cols of e]
            e_count = len(teachers)
            grad_t = -scale / math.sqrt(e_count) * (a @ cross - t @ gram_t)
            col = 0
            for e, te in enumerate(teachers):
                width = te.shape[1]
                if ctx.needs_input_grad[3 + e]:
                    t_hat = t[:, col : col + width] * math.sqrt(e_count)
                    ge = normalize_backward(grad_t[:, col : col + width], t_hat, inv_t[e])
                    grad_teachers[e] = ge.to(te.dtype)
                col += width
        return None, None, grad_student, *grad_teachers
