"""Triton backend. Importing this package imports Triton and registers its kernels.

One module per op (:mod:`fastkd.triton.fkd`, :mod:`fastkd.triton.rkd`, :mod:`fastkd.triton.srd`):
kernels, host code and the ``fastkd_triton::<op>_*`` custom ops, whose schemas, fakes and
autograd come from :mod:`fastkd.ops`; :mod:`fastkd.triton._common` holds what they share.
Tests run these kernels on CPU tensors through Triton's interpreter: ``TRITON_INTERPRET=1``
must be set before Triton is first imported.
"""

from __future__ import annotations

import triton  # noqa: F401  (an ImportError here marks the backend unavailable)

# Importing the op modules registers their "triton" kernels.
from fastkd.triton import fkd, rkd, srd
from fastkd.validation import interpreter_enabled

__all__ = ["fkd", "interpreter_enabled", "rkd", "srd"]
