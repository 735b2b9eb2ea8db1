"""A stand-in Triton driver: compile for a chosen NVIDIA arch on a machine without a GPU.

``kernel.warmup(*args, grid=(1,))`` specialises and compiles through Triton's real pipeline
(TTIR -> TTGIR -> LLVM -> PTX -> cubin with ptxas) and never launches, so all it asks the active
driver for is the current device and stream (cache keys) and the target. The device id is the
arch number, so each arch gets its own per-device binder and kernel cache inside every
``JITFunction`` (they are keyed by device and hold the target they were built for).

Triton must run compiled, not interpreted: ``TRITON_INTERPRET`` has to be unset before Triton is
first imported (the CLI removes it; the tests run the gate in a subprocess).
"""

from __future__ import annotations

import os

from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.runtime.driver import driver

ARCHS = (80, 90)


class StandInDriver(DriverBase):
    """Answers what compilation needs; anything that would touch a device raises."""

    def __init__(self, arch: int):
        super().__init__()
        self.arch = int(arch)

    @classmethod
    def is_active(cls) -> bool:
        return True

    def map_python_to_cpp_type(self, ty: str) -> str:
        return ty

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self) -> int:
        return self.arch  # distinct per arch: JITFunction caches binders per device

    def get_current_stream(self, device: int) -> int:
        return 0

    def get_active_torch_device(self):
        raise RuntimeError("the stand-in driver compiles only; there is no device")

    def get_benchmarker(self):
        raise RuntimeError("the stand-in driver compiles only; there is nothing to time")


def use_arch(arch: int) -> None:
    """Make Triton compile for sm_<arch> from now on (no device needed)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("TRITON_INTERPRET is set: unset it before Triton is imported")
    driver.set_active(StandInDriver(arch))
