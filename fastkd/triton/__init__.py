"""Triton backend. Importing this package imports Triton and registers its kernels.

Tests run these kernels on CPU tensors through Triton's interpreter: ``TRITON_INTERPRET=1``
must be set before Triton is first imported.
"""

from __future__ import annotations

import os

import triton  # noqa: F401  (an ImportError here marks the backend unavailable)


def interpreter_enabled() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Importing the op modules registers their "triton" kernels.
from fastkd.triton import fkd, rkd, srd  # noqa: E402, F401
