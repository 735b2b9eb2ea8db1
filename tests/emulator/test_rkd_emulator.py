"""The CUDA RKD distance kernels (csrc/cuda/rkd.cu, unchanged) on the CPU emulator under
AddressSanitizer + UBSan match the float64 reference: the three ops, every case of
tools/cuda_emulator/rkd.py."""

import pytest

from tools.cuda_emulator import rkd

from .cases import case_params, failures


@pytest.mark.parametrize("case", case_params(rkd.CASES))
def test_rkd_kernels_match_the_reference(emulator, case):
    out = rkd.run(emulator("rkd"), case)
    checks = rkd.verdicts(case, out)
    assert all(c.ok for c in checks), failures(checks)
    if case.splits:
        assert out.splits == case.splits
