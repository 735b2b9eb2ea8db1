"""What the three op modules share: registering one op's fakes, autograd and kernels.

An op ``<op>`` has the same schemas in two namespaces: ``fastkd::<op>_*`` (C++ and CUDA,
declared in ``csrc/ops.cpp``) and ``fastkd_triton::<op>_*`` (Python custom ops of
:mod:`fastkd.triton`, declared with the schema strings of ``fastkd/ops/<op>.py``). What the
kernels do not provide is added here once for both: a fake (meta) kernel per op so
``torch.compile`` traces shapes without running it, an autograd formula so the forward op is
differentiable on its own, and the row of the backend table (:mod:`fastkd.registry`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from fastkd.registry import register_kernels


def register_op(
    namespace: str,
    op: str,
    *,
    fakes: Mapping[str, Callable],
    setup_context: Callable,
    backward: Callable,
    backends: Sequence[str],
    has_fused: Callable[[str], bool] = lambda backend: True,
) -> None:
    """Register ``namespace::<op>_<suffix>`` fakes, autograd and backend kernels.

    Args:
        fakes: suffix ("forward", "backward", "forward_backward") -> fake kernel. An op with a
            "forward_backward" fake has a fused forward-backward op.
        setup_context: ``setup_context(ctx, inputs, output)`` of the forward op.
        backward: ``backward(backward_op, ctx, *grads)``: the autograd formula of the forward
            op through ``backward_op`` (the namespace's ``<op>_backward``).
        backends: registry backends whose kernels are this namespace's ops.
        has_fused: whether a backend has the forward-backward kernel (optional per backend).
    """
    for suffix, fake in fakes.items():
        torch.library.register_fake(f"{namespace}::{op}_{suffix}", fake)
    handles = getattr(torch.ops, namespace)
    backward_op = getattr(handles, f"{op}_backward")

    def autograd_backward(ctx, *grads):
        return backward(backward_op, ctx, *grads)

    torch.library.register_autograd(
        f"{namespace}::{op}_forward", autograd_backward, setup_context=setup_context
    )
    fused = getattr(handles, f"{op}_forward_backward") if "forward_backward" in fakes else None
    for backend in backends:
        register_kernels(
            op,
            backend,
            getattr(handles, f"{op}_forward"),
            backward_op,
            fused if fused is not None and has_fused(backend) else None,
        )


def schema_of(op_handle) -> str:
    """An op's schema without its namespace, e.g. ``"rkd_forward(Tensor student, ...) -> ..."``
    (``torch.ops.fastkd.rkd_forward`` and ``torch.ops.fastkd_triton.rkd_forward`` must agree)."""
    return str(op_handle.default._schema).split("::", 1)[1]
