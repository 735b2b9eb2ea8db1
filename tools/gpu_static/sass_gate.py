"""The CUDA kernels of ``fastkd/_C*.so``: per kernel and arch, resources and SASS counts.

The extension is built with SASS for sm_80 and sm_90 (``TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX"``);
``cuobjdump -res-usage`` gives registers, stack, shared and local memory, ``cuobjdump -sass``
the instructions (HMMA / HGMMA / LDSM / FFMA / LDG.E.128, LDL/STL inside loops).
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
from dataclasses import dataclass

from tools.gpu_static import machine_code


@dataclass
class CudaKernel:
    name: str  # short demangled name, e.g. "fkd_backward_kernel<__half>"
    arch: int
    res: machine_code.Resources
    sass: machine_code.SassStats


def find_extension(root: str = ".") -> str | None:
    """The built ``fastkd/_C*.so`` under ``root``, or None."""
    found = sorted(glob.glob(os.path.join(root, "fastkd", "_C*.so")))
    return found[0] if found else None


_NAMESPACES = re.compile(r"^(?:[\w]+::|\(anonymous namespace\)::)+")


def short_name(demangled: str) -> str:
    """``void fastkd::cuda::(anonymous namespace)::k<float>(args)`` -> ``k<float>``."""
    name = demangled.removeprefix("void ")
    name = _NAMESPACES.sub("", name)
    depth = 0
    for i, ch in enumerate(name):
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "(" and depth == 0:
            return name[:i]
    return name


def cuda_kernels(path: str) -> list[CudaKernel]:
    """Every kernel of every arch in the shared library at ``path``."""
    try:
        res, sass = machine_code.disassemble(path)
    except subprocess.CalledProcessError:  # a CPU-only build has no device code
        return []
    names = machine_code.demangle(sorted({f for _, f in res}))
    kernels = [
        CudaKernel(
            short_name(names.get(func, func)),
            arch,
            r,
            machine_code.SassStats.parse(sass.get((arch, func), "")),
        )
        for (arch, func), r in res.items()
    ]
    return sorted(kernels, key=lambda k: (k.name, k.arch))
