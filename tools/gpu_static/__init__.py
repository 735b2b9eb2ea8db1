"""Static GPU gate: compile every kernel for sm_80 and sm_90 without a GPU and check the code.

* :mod:`.driver` installs a stand-in Triton driver whose target is ``GPUTarget("cuda", arch,
  32)``, so ``kernel.warmup(..., grid=(1,))`` runs Triton's real compiler without launching.
* :mod:`.triton_gate` enumerates the Triton kernels in every configuration the dispatcher can
  choose and compiles them.
* :mod:`.sass_gate` disassembles the CUDA kernels of ``fastkd/_C*.so``.
* :mod:`.machine_code` reads PTX / SASS / resource usage into numbers.
* :mod:`.report` turns the numbers into verdicts and ``docs/gpu-static.md``.

Run ``python -m tools.gpu_static --help`` from the repository root.
"""
