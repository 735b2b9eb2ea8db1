"""Backend selection: explicit, inspectable, never a silent fallback.

Backends:
  ``reference``  pure PyTorch (:mod:`fastkd.reference`), any device, O(B^2) memory; every op.
  ``cpu``        compiled C++ kernels (``fastkd._C``), CPU tensors.
  ``cuda``       compiled CUDA kernels (``fastkd._C``), CUDA tensors.
  ``triton``     Triton kernels (:mod:`fastkd.triton`), CUDA tensors, or CPU tensors when
                 ``TRITON_INTERPRET=1`` was set before Triton was imported (tests).
  ``auto``       the fastest available for the tensors' device: cuda > triton > reference on a
                 GPU, cpu > reference on the CPU. Triton's interpreter is never chosen by auto.

The ``backend`` argument of every loss wins; ``None`` means the ``FASTKD_BACKEND`` environment
variable, and when that is unset, ``auto``. Asking for a backend that cannot run the op on the
given device raises :class:`BackendUnavailableError` with the reason.

This module is the bottom of the dispatch layer: it imports no backend. Backend modules call
:func:`register_kernels` when they are imported (``fastkd.ops`` for ``cpu``/``cuda``,
``fastkd.triton`` for ``triton``); the registry imports them lazily, by name, the first time a
backend is resolved or listed (:data:`BACKEND_MODULES`).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

BACKENDS = ("reference", "cpu", "cuda", "triton")
ENV_VAR = "FASTKD_BACKEND"
# The ops of fastkd; the reference backend (fastkd.reference) implements all of them.
OPS = ("fkd", "sp", "rkd", "srd")
# Module whose import registers a backend's kernels (imported lazily: no import cycle).
BACKEND_MODULES = {"cpu": "fastkd.ops", "cuda": "fastkd.ops", "triton": "fastkd.triton"}
# Device type a compiled backend runs on (Triton's depends on the interpreter, see _devices).
_COMPILED_DEVICE = {"cpu": "cpu", "cuda": "cuda"}


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run this op on these tensors (the message says why)."""


@dataclass(frozen=True)
class Kernels:
    """Entry points of one op on one fused backend (usually ``torch.ops`` handles).

    ``forward`` computes the loss, ``backward`` the gradients for an upstream gradient.
    ``forward_backward`` (optional) returns the loss and its gradients in one pass; autograd
    Functions use it when the inputs require grad, so a training step sweeps the data once.
    """

    forward: Callable
    backward: Callable
    forward_backward: Callable | None = None


_KERNELS: dict[tuple[str, str], Kernels] = {}


def register_kernels(
    op: str,
    backend: str,
    forward: Callable,
    backward: Callable,
    forward_backward: Callable | None = None,
) -> None:
    """Called by each backend module, at import, for each op it implements."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}: add it to fastkd.registry.OPS first")
    if backend not in BACKEND_MODULES:
        raise ValueError(f"unknown fused backend {backend!r}, not one of {tuple(BACKEND_MODULES)}")
    _KERNELS[(op, backend)] = Kernels(forward, backward, forward_backward)


def kernels(op: str, backend: str) -> Kernels:
    """The registered kernels of ``op`` on ``backend`` (KeyError if none)."""
    return _KERNELS[(op, backend)]


def _load_backend_modules() -> None:
    for name in dict.fromkeys(BACKEND_MODULES.values()):
        try:
            importlib.import_module(name)
        except Exception:  # e.g. Triton missing or broken: reported by _status
            pass


def _interpreter_enabled() -> bool:
    return importlib.import_module("fastkd.validation").interpreter_enabled()


def _triton_status() -> tuple[bool, str]:
    try:
        importlib.import_module("fastkd.triton")
    except Exception as exc:  # triton missing or broken
        return False, f"Triton cannot be imported ({type(exc).__name__}: {exc})"
    if torch.cuda.is_available():
        return True, "Triton kernels on CUDA tensors"
    if _interpreter_enabled():
        return True, "Triton interpreter (TRITON_INTERPRET=1) on CPU tensors"
    return False, "Triton needs a CUDA device (or TRITON_INTERPRET=1 for CPU tensors)"


def _compiled_status(backend: str, op: str | None = None) -> tuple[bool, str]:
    """Status of a compiled backend; with ``op``, also whether that op's kernel was built."""
    extension = importlib.import_module("fastkd._extension")
    if not extension.loaded():
        return False, f"the compiled extension fastkd._C did not load ({extension.LOAD_ERROR})"
    key = backend.upper()
    ops = sorted({o for (o, b) in _KERNELS if b == backend})
    compiled = [o for o in ops if extension.has_kernel(f"{o}_forward", key)]
    if not compiled:
        why = "" if backend == "cpu" else " (built without a CUDA toolkit: FASTKD_BUILD_CUDA=1)"
        return False, f"no {key} kernels in fastkd._C{why}"
    if op is not None and op not in compiled:
        return False, f"no {key} kernel for {op!r} in fastkd._C (an older build: rebuild it)"
    if backend == "cuda" and not torch.cuda.is_available():
        return False, f"CUDA kernels compiled ({', '.join(compiled)}) but no CUDA device is visible"
    return True, f"compiled {key} kernels: {', '.join(compiled)}"


def _status(backend: str, op: str | None = None) -> tuple[bool, str]:
    if backend == "reference":
        return True, "pure PyTorch, any device"
    if backend == "triton":
        return _triton_status()
    return _compiled_status(backend, op)


def _device(backend: str) -> str:
    """The device type that ``backend`` runs on in this process."""
    if backend == "triton":
        return "cpu" if _interpreter_enabled() else "cuda"
    return _COMPILED_DEVICE[backend]


def available_backends() -> dict[str, dict[str, object]]:
    """What this install can run: ``{backend: {"available", "detail", "ops"}}``.

    ``available`` is a bool, ``detail`` the reason in words, ``ops`` the sorted ops it
    implements (the reference backend: all of :data:`OPS`).
    """
    _load_backend_modules()
    report = {}
    for backend in BACKENDS:
        ok, detail = _status(backend)
        if backend == "reference":
            ops = sorted(OPS)
        else:
            ops = sorted({op for (op, b) in _KERNELS if b == backend})
        report[backend] = {"available": ok, "detail": detail, "ops": ops}
    return report


def resolve_backend(op: str, backend: str | None, device: torch.device) -> str:
    """The backend that will run ``op`` on ``device``: validated, never a silent fallback.

    Under ``torch.compile`` the choice is made once at trace time and baked into the graph
    (changing ``$FASTKD_BACKEND`` later does not recompile): see the marker below.
    """
    device_type = device.type
    requested = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    if not isinstance(requested, str):
        raise TypeError(f"backend must be a string or None, got {type(requested).__name__}")
    requested = requested.strip().lower()
    if requested not in BACKENDS + ("auto",):
        source = "backend" if backend is not None else f"${ENV_VAR}"
        raise ValueError(f"{source}={requested!r} is not one of {BACKENDS + ('auto',)}")
    if requested == "reference":
        return "reference"
    _load_backend_modules()
    if requested == "auto":
        order = ("cuda", "triton") if device_type == "cuda" else ("cpu",)
        for candidate in order:
            if (op, candidate) in _KERNELS and _status(candidate, op)[0]:
                return candidate
        return "reference"
    if (op, requested) not in _KERNELS:
        raise BackendUnavailableError(f"backend {requested!r} has no kernel for {op!r}")
    ok, detail = _status(requested, op)
    if not ok:
        raise BackendUnavailableError(f"backend {requested!r} is unavailable: {detail}")
    wanted = _device(requested)
    if device_type != wanted:
        raise BackendUnavailableError(
            f"backend {requested!r} runs on {wanted} tensors here, got {device_type}"
        )
    return requested


# torch.compile must not trace the resolution (it imports modules and reads the environment)
# but call it eagerly and keep the answer as a constant. torch.compiler.assume_constant_result
# does nothing but set this marker; it is spelt out because that function imports torch._dynamo,
# which costs seconds at `import fastkd` and imports Triton before a test session can choose its
# interpreter. The fullgraph compile tests fail if the marker stops working.
resolve_backend._dynamo_marked_constant = True
