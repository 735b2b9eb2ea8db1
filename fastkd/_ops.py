"""Python-side registrations of the compiled ``torch.ops.fastkd`` operators.

For each op declared in ``csrc/ops.cpp`` this adds what C++ does not: a fake (meta) kernel so
``torch.compile`` can trace shapes without running it, an autograd formula so the forward op is
differentiable on its own (``torch.library.opcheck`` checks it), and the entry in the backend
table used by :mod:`fastkd.backends` for the ``cpu`` and ``cuda`` backends.
"""

from __future__ import annotations

import torch

from fastkd import _extension
from fastkd.backends import register_kernels
from fastkd.reference import loss_dtype


def srd_backward_fake(grad, student, teacher, p, training, total, st_s, st_t, sums, t_grad):
    """Fake kernel of an SRD backward op (compiled or Triton): gradients shaped like the
    inputs, an empty (0,) teacher gradient unless t_grad."""
    return torch.empty_like(student), (
        torch.empty_like(teacher) if t_grad else teacher.new_empty((0,))
    )


def register_srd_autograd(forward_op, backward_op) -> None:
    """Autograd formula of an SRD forward op through its backward op (same schema for the
    compiled ``fastkd::srd_*`` and the Triton ``fastkd_triton::srd_*`` ops)."""

    def setup_context(ctx, inputs, output):
        student, teacher, p, _eps, training, *_running = inputs
        _loss, total, stats_s, stats_t, sums = output
        ctx.save_for_backward(student, teacher, total, stats_s, stats_t, sums)
        ctx.p, ctx.training = p, training
        ctx.mark_non_differentiable(total, stats_s, stats_t, sums)

    def backward(ctx, grad, *_unused):
        student, teacher, total, stats_s, stats_t, sums = ctx.saved_tensors
        teacher_grad = bool(ctx.needs_input_grad[1])
        grad_s, grad_t = backward_op(
            grad, student, teacher, ctx.p, ctx.training, total, stats_s, stats_t, sums, teacher_grad
        )
        return grad_s, (grad_t if teacher_grad else None), *([None] * 7)

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)


def _register_fkd() -> None:
    @torch.library.register_fake("fastkd::fkd_forward")
    def _fkd_forward_fake(student, teachers, kd_weight, fr_weight):
        return student.new_empty((), dtype=loss_dtype(student, *teachers))

    @torch.library.register_fake("fastkd::fkd_backward")
    def _fkd_backward_fake(grad, student, teachers, kd_weight, fr_weight, teachers_grad):
        grad_teachers = [torch.empty_like(t) for t in teachers] if teachers_grad else []
        return torch.empty_like(student), grad_teachers

    @torch.library.register_fake("fastkd::fkd_forward_backward")
    def _fkd_forward_backward_fake(student, teachers, kd_weight, fr_weight, teachers_grad):
        loss = student.new_empty((), dtype=loss_dtype(student, *teachers))
        grad_teachers = [torch.empty_like(t) for t in teachers] if teachers_grad else []
        return loss, torch.empty_like(student), grad_teachers

    def setup_context(ctx, inputs, output):
        student, teachers, kd_weight, fr_weight = inputs
        ctx.save_for_backward(student, *teachers)
        ctx.weights = (kd_weight, fr_weight)

    def backward(ctx, grad):
        student, *teachers = ctx.saved_tensors
        # For the Tensor[] argument needs_input_grad holds one bool per teacher.
        need = list(ctx.needs_input_grad[1])
        teachers_grad = any(need)
        grad_student, grad_teachers = torch.ops.fastkd.fkd_backward(
            grad, student, teachers, *ctx.weights, teachers_grad
        )
        grads = [None] * len(teachers)  # a list argument takes a list of the same length
        if teachers_grad:
            grads = [g if n else None for g, n in zip(grad_teachers, need, strict=True)]
        grad_student = grad_student if ctx.needs_input_grad[0] else None
        return grad_student, grads, None, None

    torch.library.register_autograd("fastkd::fkd_forward", backward, setup_context=setup_context)
    for backend in ("cpu", "cuda"):
        fused = _extension.has_kernel("fkd_forward_backward", backend.upper())
        register_kernels(
            "fkd",
            backend,
            torch.ops.fastkd.fkd_forward,
            torch.ops.fastkd.fkd_backward,
            torch.ops.fastkd.fkd_forward_backward if fused else None,
        )


def _register_srd() -> None:
    def _acc_empty(like, shape, *others):
        return like.new_empty(shape, dtype=loss_dtype(like, *others))

    @torch.library.register_fake("fastkd::srd_forward")
    def _srd_forward_fake(student, teacher, p, eps, training, rm_s, rv_s, rm_t, rv_t):
        width = student.shape[1]
        return (
            _acc_empty(student, (), teacher),
            _acc_empty(student, (), teacher),
            _acc_empty(student, (4, width), teacher),
            _acc_empty(student, (4, width), teacher),
            _acc_empty(student, (4, width), teacher),
        )

    torch.library.register_fake("fastkd::srd_backward", srd_backward_fake)
    register_srd_autograd("fastkd::srd_forward", torch.ops.fastkd.srd_backward)
    for backend in ("cpu", "cuda"):
        register_kernels(
            "srd", backend, torch.ops.fastkd.srd_forward, torch.ops.fastkd.srd_backward
        )


# RKD fake kernels and autograd, shared by the compiled ``fastkd::rkd_*`` and the Triton
# ``fastkd_triton::rkd_*`` ops (same schemas).
def rkd_forward_fake(student, teacher):
    return student.new_empty((), dtype=loss_dtype(student, teacher))


def rkd_backward_fake(grad, student, teacher, teacher_grad):
    """Gradients shaped like the inputs; an empty (0,) teacher gradient unless teacher_grad."""
    return torch.empty_like(student), (
        torch.empty_like(teacher) if teacher_grad else teacher.new_empty((0,))
    )


def rkd_forward_backward_fake(student, teacher, teacher_grad):
    return rkd_forward_fake(student, teacher), *rkd_backward_fake(
        None, student, teacher, teacher_grad
    )


def register_rkd_autograd(forward_op, backward_op) -> None:
    """Autograd formula of an RKD forward op through its backward op."""

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, grad):
        student, teacher = ctx.saved_tensors
        teacher_grad = bool(ctx.needs_input_grad[1])
        grad_s, grad_t = backward_op(grad, student, teacher, teacher_grad)
        return (grad_s if ctx.needs_input_grad[0] else None), (grad_t if teacher_grad else None)

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)


def _register_rkd() -> None:
    torch.library.register_fake("fastkd::rkd_forward", rkd_forward_fake)
    torch.library.register_fake("fastkd::rkd_backward", rkd_backward_fake)
    torch.library.register_fake("fastkd::rkd_forward_backward", rkd_forward_backward_fake)
    register_rkd_autograd("fastkd::rkd_forward", torch.ops.fastkd.rkd_backward)
    for backend in ("cpu", "cuda"):  # CUDA kernels exist when built with a CUDA toolkit
        if _extension.has_kernel("rkd_forward", backend.upper()):
            register_kernels(
                "rkd",
                backend,
                torch.ops.fastkd.rkd_forward,
                torch.ops.fastkd.rkd_backward,
                torch.ops.fastkd.rkd_forward_backward,
            )


if _extension.loaded():
    _register_fkd()
    _register_srd()
    _register_rkd()
