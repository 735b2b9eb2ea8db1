"""The CUDA SRD kernels (csrc/cuda/srd.cu, unchanged) on the CPU emulator under AddressSanitizer +
UBSan match the float64 reference: loss, batch statistics and gradients, every case of
tools/cuda_emulator/srd.py."""

import pytest

from tools.cuda_emulator import srd

from .cases import case_params, failures


@pytest.mark.parametrize("case", case_params(srd.CASES))
def test_srd_kernels_match_the_reference(emulator, case):
    out = srd.run(emulator("srd"), case)
    checks = srd.verdicts(case, out)
    assert all(c.ok for c in checks), failures(checks)
    if case.splits:
        assert out.splits == case.splits
