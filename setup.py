"""Build of the ``fastkd._C`` extension (C++ CPU kernels, plus CUDA kernels when possible).

CUDA kernels are compiled whenever torch is a CUDA build and nvcc is found; no GPU is needed.
Environment:
  FASTKD_BUILD_CUDA=1  a missing CUDA toolkit is an error (CI sets it); =0 skips CUDA.
  CUDA_HOME            toolkit root; default: /usr/local/cuda if it exists, else nvcc's parent.
  TORCH_CUDA_ARCH_LIST default "8.0;9.0+PTX" when unset (no GPU to detect on build machines).
  MAX_JOBS             parallel compile jobs (ninja).
"""

import glob
import os
import shutil

from setuptools import setup


def _resolve_cuda_home() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return home
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None


_want_cuda = os.environ.get("FASTKD_BUILD_CUDA", "auto").lower()
_cuda_home = _resolve_cuda_home() if _want_cuda != "0" else None
if _cuda_home:
    # torch.utils.cpp_extension reads CUDA_HOME at import time; its own guess (/usr/local) fails
    # to link cudart on machines where nvcc lives in /usr/local/cuda.
    os.environ["CUDA_HOME"] = _cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

_build_cuda = bool(_cuda_home) and torch.version.cuda is not None
if _want_cuda == "1" and not _build_cuda:
    raise RuntimeError(
        "FASTKD_BUILD_CUDA=1 but CUDA kernels cannot be built: "
        + ("no nvcc found (set CUDA_HOME)" if not _cuda_home else "torch is not a CUDA build")
    )

_root = os.path.dirname(os.path.abspath(__file__))
_include = [os.path.join(_root, "csrc", "include")]
# -fopenmp: ATen's at::parallel_for is an inline template that runs serially unless the
# extension itself is compiled with OpenMP (libgomp resolves to the copy torch already loaded).
_cxx_flags = ["-O3", "-fopenmp"]
_link_flags = ["-fopenmp"]
_sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))

if _build_cuda:
    _sources += sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
    extension = CUDAExtension(
        "fastkd._C",
        _sources,
        include_dirs=_include,
        define_macros=[("FASTKD_WITH_CUDA", "1")],
        extra_compile_args={
            "cxx": _cxx_flags,
            "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"],
        },
        extra_link_args=_link_flags,
    )
else:
    extension = CppExtension(
        "fastkd._C",
        _sources,
        include_dirs=_include,
        extra_compile_args={"cxx": _cxx_flags},
        extra_link_args=_link_flags,
    )

setup(
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
