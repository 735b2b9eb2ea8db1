"""Emulator tests: the CUDA kernels of csrc/cuda run on the CPU emulator (tools/cuda_emulator)."""
