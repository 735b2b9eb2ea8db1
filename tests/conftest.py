"""Test session set-up. Triton's interpreter must be chosen before Triton is first imported, so
the Triton kernels run on CPU tensors here, whatever the host has (tests/harness.py puts every
interpreter case on the CPU). ``make test-gpu`` sets TRITON_INTERPRET=0 and runs the ``gpu``
tests: compiled Triton and the CUDA kernels on the GPU."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
