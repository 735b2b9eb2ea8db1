"""SRD op (SPEC §3): schemas, fake kernels and autograd, for both op namespaces.

``fastkd::srd_*`` (compiled, ``csrc/ops.cpp``) and ``fastkd_triton::srd_*``
(:mod:`fastkd.triton.srd`) share :data:`SCHEMAS`, the fakes and the autograd formula below.
``srd_forward`` returns (loss, S, stats_s, stats_t, sums): the 0-dim loss and S = sum |s - t|^p
and the (4, D) statistics [mean, biased var, mean - z[0], rstd] of each side and column sums
[|d|^p, h, h*s, h*t], all in the accumulation dtype (:func:`fastkd.reference.loss_dtype`). There
is no fused forward-backward op: the backward pass is one elementwise sweep.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastkd.ops._common import register_op
from fastkd.reference import loss_dtype

OP = "srd"
# Argument and return lists of the ops, as declared in csrc/ops.cpp (a test compares them).
SCHEMAS = {
    "srd_forward": "(Tensor student, Tensor teacher, float p, float eps, bool training, "
    "Tensor? running_mean_s, Tensor? running_var_s, Tensor? running_mean_t, "
    "Tensor? running_var_t) -> (Tensor loss, Tensor total, Tensor stats_s, Tensor stats_t, "
    "Tensor sums)",
    "srd_backward": "(Tensor grad, Tensor student, Tensor teacher, float p, bool training, "
    "Tensor total, Tensor stats_s, Tensor stats_t, Tensor sums, bool teacher_grad) "
    "-> (Tensor grad_student, Tensor grad_teacher)",
}


def forward_fake(student, teacher, p, eps, training, rm_s, rv_s, rm_t, rv_t):
    acc = loss_dtype(student, teacher)
    width = student.shape[1]
    scalars = [student.new_empty((), dtype=acc) for _ in range(2)]
    return *scalars, *(student.new_empty((4, width), dtype=acc) for _ in range(3))


def backward_fake(grad, student, teacher, p, training, total, st_s, st_t, sums, t_grad):
    """Gradients shaped like the inputs, an empty (0,) teacher gradient unless t_grad."""
    return torch.empty_like(student), (
        torch.empty_like(teacher) if t_grad else teacher.new_empty((0,))
    )


def setup_context(ctx, inputs, output):
    student, teacher, p, _eps, training, *_running = inputs
    _loss, total, stats_s, stats_t, sums = output
    ctx.save_for_backward(student, teacher, total, stats_s, stats_t, sums)
    ctx.p, ctx.training = p, training
    ctx.mark_non_differentiable(total, stats_s, stats_t, sums)


def backward(backward_op, ctx, grad, *_unused):
    """Gradients of ``srd_forward``'s loss through ``backward_op`` (``<ns>::srd_backward``)."""
    student, teacher, total, stats_s, stats_t, sums = ctx.saved_tensors
    teacher_grad = bool(ctx.needs_input_grad[1])
    grad_s, grad_t = backward_op(
        grad, student, teacher, ctx.p, ctx.training, total, stats_s, stats_t, sums, teacher_grad
    )
    return grad_s, (grad_t if teacher_grad else None), *([None] * 7)


def register(namespace: str, backends: Sequence[str]) -> None:
    """Fakes and autograd of ``namespace::srd_*``; its ops become ``backends``' srd kernels."""
    register_op(
        namespace,
        OP,
        fakes={"forward": forward_fake, "backward": backward_fake},
        setup_context=setup_context,
        backward=backward,
        backends=backends,
    )
