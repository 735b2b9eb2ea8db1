"""FKD op (SPEC §1): schemas, fake kernels and autograd, for both op namespaces.

``fastkd::fkd_*`` (compiled, ``csrc/ops.cpp``) and ``fastkd_triton::fkd_*``
(:mod:`fastkd.triton.fkd`) share :data:`SCHEMAS`, the fakes and the autograd formula below;
:func:`register` installs them for one namespace and adds its kernels to the backend table.
Shapes: student (B, Ds), teachers a list of E tensors (B, Dt_e); the loss is 0-dim in
:func:`fastkd.reference.loss_dtype`; gradients are shaped like the inputs, ``grad_teachers`` is
``[]`` unless ``teachers_grad``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from fastkd.ops._common import register_op
from fastkd.reference import loss_dtype

OP = "fkd"
# Argument and return lists of the ops, as declared in csrc/ops.cpp (a test compares them).
SCHEMAS = {
    "fkd_forward": "(Tensor student, Tensor[] teachers, float kd_weight, float fr_weight, "
    'str precision="ieee") -> Tensor',
    "fkd_backward": "(Tensor grad, Tensor student, Tensor[] teachers, float kd_weight, "
    'float fr_weight, bool teachers_grad, str precision="ieee") '
    "-> (Tensor grad_student, Tensor[] grad_teachers)",
    "fkd_forward_backward": "(Tensor student, Tensor[] teachers, float kd_weight, "
    'float fr_weight, bool teachers_grad, str precision="ieee") '
    "-> (Tensor loss, Tensor grad_student, Tensor[] grad_teachers)",
}


def forward_fake(student, teachers, kd_weight, fr_weight, precision="ieee"):
    return student.new_empty((), dtype=loss_dtype(student, *teachers))


def backward_fake(grad, student, teachers, kd_weight, fr_weight, teachers_grad, precision="ieee"):
    grad_teachers = [torch.empty_like(t) for t in teachers] if teachers_grad else []
    return torch.empty_like(student), grad_teachers


def forward_backward_fake(student, teachers, kd_weight, fr_weight, teachers_grad, precision="ieee"):
    loss = forward_fake(student, teachers, kd_weight, fr_weight)
    return loss, *backward_fake(None, student, teachers, kd_weight, fr_weight, teachers_grad)


def setup_context(ctx, inputs, output):
    student, teachers, kd_weight, fr_weight, *rest = inputs
    ctx.save_for_backward(student, *teachers)
    ctx.weights = (kd_weight, fr_weight)
    ctx.precision = rest[0] if rest else "ieee"


def backward(backward_op, ctx, grad):
    """Gradients of ``fkd_forward`` through ``backward_op`` (``<namespace>::fkd_backward``)."""
    student, *teachers = ctx.saved_tensors
    # For the Tensor[] argument needs_input_grad holds one bool per teacher (a plain bool in
    # some torch versions for custom ops).
    need = ctx.needs_input_grad[1]
    need = list(need) if isinstance(need, (list, tuple)) else [bool(need)] * len(teachers)
    teachers_grad = any(need)
    grad_student, grad_teachers = backward_op(
        grad, student, teachers, *ctx.weights, teachers_grad, ctx.precision
    )
    grads = [None] * len(teachers)  # a list argument takes a list of the same length back
    if teachers_grad:
        grads = [g if n else None for g, n in zip(grad_teachers, need, strict=True)]
    grad_student = grad_student if ctx.needs_input_grad[0] else None
    return grad_student, grads, None, None, None


def register(
    namespace: str, backends: Sequence[str], has_fused: Callable[[str], bool] = lambda b: True
) -> None:
    """Fakes and autograd of ``namespace::fkd_*``; its ops become ``backends``' fkd kernels."""
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
        has_fused=has_fused,
    )
