"""RKD distance op (SPEC §2): schemas, fake kernels and autograd, for both op namespaces.

``fastkd::rkd_*`` (compiled, ``csrc/ops.cpp``) and ``fastkd_triton::rkd_*``
(:mod:`fastkd.triton.rkd`) share :data:`SCHEMAS`, the fakes and the autograd formula below.
Shapes: student (B, Ds), teacher (B, Dt), B >= 2; the loss is 0-dim in
:func:`fastkd.reference.loss_dtype`; ``grad_teacher`` is an empty (0,) tensor unless
``teacher_grad``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastkd.ops._common import register_op
from fastkd.reference import loss_dtype

OP = "rkd"
# Argument and return lists of the ops, as declared in csrc/ops.cpp (a test compares them).
SCHEMAS = {
    "rkd_forward": '(Tensor student, Tensor teacher, str precision="ieee") -> Tensor',
    "rkd_backward": "(Tensor grad, Tensor student, Tensor teacher, bool teacher_grad, "
    'str precision="ieee") -> (Tensor grad_student, Tensor grad_teacher)',
    "rkd_forward_backward": "(Tensor student, Tensor teacher, bool teacher_grad, "
    'str precision="ieee") -> (Tensor loss, Tensor grad_student, Tensor grad_teacher)',
}


def forward_fake(student, teacher, precision="ieee"):
    return student.new_empty((), dtype=loss_dtype(student, teacher))


def backward_fake(grad, student, teacher, teacher_grad, precision="ieee"):
    """Gradients shaped like the inputs; an empty (0,) teacher gradient unless teacher_grad."""
    return torch.empty_like(student), (
        torch.empty_like(teacher) if teacher_grad else teacher.new_empty((0,))
    )


def forward_backward_fake(student, teacher, teacher_grad, precision="ieee"):
    return forward_fake(student, teacher), *backward_fake(None, student, teacher, teacher_grad)


def setup_context(ctx, inputs, output):
    student, teacher, *rest = inputs
    ctx.save_for_backward(student, teacher)
    ctx.precision = rest[0] if rest else "ieee"


def backward(backward_op, ctx, grad):
    """Gradients of ``rkd_forward`` through ``backward_op`` (``<namespace>::rkd_backward``)."""
    student, teacher = ctx.saved_tensors
    teacher_grad = bool(ctx.needs_input_grad[1])
    grad_s, grad_t = backward_op(grad, student, teacher, teacher_grad, ctx.precision)
    grad_s = grad_s if ctx.needs_input_grad[0] else None
    return grad_s, (grad_t if teacher_grad else None), None


def register(namespace: str, backends: Sequence[str]) -> None:
    """Fakes and autograd of ``namespace::rkd_*``; its ops become ``backends``' rkd kernels."""
    register_op(
        namespace,
        OP,
        fakes={
            "forward": forward_fake,
            "backward": backward_fake,
            "forward_backward": forward_backward_fake,
        },
        setup_context=setup_context,
        backward=backward,
        backends=backends,
    )
