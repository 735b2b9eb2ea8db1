"""Op registration layer: fake kernels, autograd and backend-table rows of each op.

One module per op (:mod:`fastkd.ops.fkd`, :mod:`fastkd.ops.rkd`, :mod:`fastkd.ops.srd`) holds
its schemas, fakes and autograd formula once, for both the compiled ``torch.ops.fastkd`` ops and
the Triton ``torch.ops.fastkd_triton`` ops. Importing this package registers the compiled ops
(when ``fastkd._C`` loaded) as the ``cpu`` and ``cuda`` backends; :mod:`fastkd.triton` registers
its own ops through the same modules.
"""

from __future__ import annotations

from fastkd import _extension
from fastkd.ops import fkd, rkd, srd

COMPILED_BACKENDS = ("cpu", "cuda")
COMPILED_NAMESPACE = "fastkd"


def _has_fused(op: str):
    def has_fused(backend: str) -> bool:
        return _extension.has_kernel(f"{op}_forward_backward", backend.upper())

    return has_fused


if _extension.loaded():
    fkd.register(COMPILED_NAMESPACE, COMPILED_BACKENDS, has_fused=_has_fused("fkd"))
    rkd.register(COMPILED_NAMESPACE, COMPILED_BACKENDS)
    srd.register(COMPILED_NAMESPACE, COMPILED_BACKENDS)

__all__ = ["COMPILED_BACKENDS", "COMPILED_NAMESPACE", "fkd", "rkd", "srd"]
