"""Loads the compiled extension ``fastkd._C`` and reports what it contains.

Importing ``fastkd._C`` runs its ``TORCH_LIBRARY`` registrations: the ``torch.ops.fastkd.*``
schemas, CPU kernels, and CUDA kernels when the build had a CUDA toolkit. A missing or broken
build is not fatal: the reference backend still works and the error is reported by
``fastkd.available_backends()``.
"""

from __future__ import annotations

import torch

try:
    from fastkd import _C  # noqa: F401

    LOAD_ERROR: str | None = None
except ImportError as exc:  # not built, or built against another torch
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"


def loaded() -> bool:
    return LOAD_ERROR is None


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``fastkd::<op>`` has a kernel registered for ``dispatch_key`` ("CPU"/"CUDA")."""
    if not loaded():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastkd::{op}", dispatch_key)
