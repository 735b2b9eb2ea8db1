"""The emulator's verdicts (fastkd.testing's judgement) do not depend on the reference's
roundoff: a gradient that is zero in exact arithmetic (FKD at B = 1, RKD at B = 2) gets the same
verdict when the float64 reference is perturbed at the 1e-15 level, as another host's BLAS may
perturb it (issue 10), and a real error is still caught."""

import pytest
import torch

from fastkd import reference, testing
from tools.cuda_emulator import fkd, rkd

F64 = torch.float64


def _noise(x: torch.Tensor, size, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return x + size * (2 * torch.rand(x.shape, generator=gen, dtype=x.dtype) - 1)


def test_fkd_b1_verdict_ignores_reference_roundoff(emulator):
    case = fkd.CASES[0]
    assert (case.batch, case.teachers_grad, case.dtype) == (1, True, F64)
    out = fkd.run(emulator("fkd"), case)
    loss, (g_student, g_teacher) = fkd.expected(case)
    # The teacher gradient is zero in exact arithmetic (rho_S = rho_T = 1): its terms are not.
    assert g_teacher.abs().max().item() < 1e-15
    student, teachers = fkd.make_inputs(case)
    assert testing.fkd_terms(student, teachers, case.kd, case.fr)[1][1].min().item() > 0.01
    tol = testing.tolerance(case.dtype, "fkd").grad
    for seed in range(3):
        noisy = (loss, [g_student, _noise(g_teacher, 1e-15, seed)])
        checks = fkd.verdicts(case, out, noisy)
        assert all(c.ok for c in checks), [str(c) for c in checks if not c.ok]
        # Without the terms (the reference's largest entry as the scale) that noise fails.
        assert testing.error_ratio(out.grads_fb[1], noisy[1][1], case.dtype, tol) > 1.0
    # A kernel error well above roundoff is still one.
    wrong = fkd.Outputs(
        out.loss, out.grads, out.loss_fb, [out.grads_fb[0], out.grads_fb[1] + 1e-9], 1
    )
    assert not all(c.ok for c in fkd.verdicts(case, wrong))


def test_rkd_b2_verdict_ignores_reference_roundoff(emulator):
    case = rkd.CASES[0]
    assert (case.batch, case.student_dtype) == (2, F64)
    out = rkd.run(emulator("rkd"), case)
    loss, g_student, g_teacher = rkd.expected(case)
    # B = 2: one distance per side, x = d_S / mu_S - d_T / mu_T = 0, so no gradient at all.
    assert max(g_student.abs().max().item(), g_teacher.abs().max().item()) < 1e-15
    # Roundoff of a float64 reference: a few ulps of the gradient's terms, entry by entry.
    terms = testing.rkd_terms(*rkd.make_inputs(case), case.grad)[1]
    assert min(t.min().item() for t in terms) > 0.01
    size = [4 * torch.finfo(F64).eps * t for t in terms]
    tol = testing.tolerance(case.student_dtype, "rkd").grad
    for seed in range(3):
        noisy = (loss, _noise(g_student, size[0], seed), _noise(g_teacher, size[1], seed + 7))
        checks = rkd.verdicts(case, out, noisy)
        assert all(c.ok for c in checks), [str(c) for c in checks if not c.ok]
        assert testing.error_ratio(out.grads["fb"][0], noisy[1], F64, tol) > 1.0
    grads = dict(out.grads, bwd=(out.grads["bwd"][0] + 1e-9, out.grads["bwd"][1]))
    wrong = rkd.Outputs(out.loss, out.loss_fb, grads, out.splits, out.launches)
    assert not all(c.ok for c in rkd.verdicts(case, wrong))


def test_error_ratio_is_the_judgement():
    want = torch.tensor([3.0, -4.0], dtype=F64)
    # Ordinary results: tol times the largest entry; the terms' slack changes nothing.
    assert testing.error_ratio(want + 2e-12, want, F64, 1e-12, 10.0) == pytest.approx(0.5, rel=1e-3)
    # A result that is zero in exact arithmetic: judged on ULPS roundings of its terms.
    tiny = torch.tensor([1e-17, -3e-18], dtype=F64)
    slack = testing.ULPS * torch.finfo(F64).eps * 2.0
    ratio = testing.error_ratio(tiny + slack / 2, tiny, F64, 1e-12, 2.0)
    assert ratio == pytest.approx(0.5, rel=1e-3)
    # Terms entry by entry: the entry with small terms gets a small slack.
    per_entry = torch.tensor([2.0, 1e-3], dtype=F64)
    assert testing.error_ratio(tiny + slack / 2, tiny, F64, 1e-12, per_entry) > 1.0


def test_error_ratio_refuses_non_finite_and_inexact_zeros():
    want = torch.tensor([1.0, float("nan"), 2.0], dtype=F64)
    assert testing.error_ratio(torch.tensor([1.0, float("nan"), 2.0]), want, F64, 1e-10) == 0.0
    assert testing.error_ratio(torch.tensor([1.0, 0.0, 2.0]), want, F64, 1e-10) == float("inf")
    inf_got = torch.tensor([float("inf"), 0.0])
    assert testing.error_ratio(inf_got, torch.zeros(2, dtype=F64), F64, 1.0) == float("inf")
    assert testing.error_ratio(torch.zeros(3), torch.zeros(3, dtype=F64), F64, 1e-5) == 0.0
    got = torch.full((3,), 1e-30, dtype=F64)
    assert testing.error_ratio(got, torch.zeros(3, dtype=F64), F64, 1e-5) == float("inf")
    assert testing.error_ratio(torch.zeros(2), torch.zeros(3, dtype=F64), F64, 1.0) == float("inf")


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_fkd_terms_bound_the_gradients(batch):
    """The terms bound each gradient entry (so the slack never exceeds what a kernel sums), from
    the inputs alone: positive even where the gradient is exactly zero."""
    gen = torch.Generator().manual_seed(batch)
    student = torch.randn(batch, 4, generator=gen, dtype=F64)
    teachers = [torch.randn(batch, w, generator=gen, dtype=F64) for w in (1, 6)]
    _, grads = testing.reference64(
        lambda s, *ts: reference.fkd_loss(s, list(ts), 0.7, 0.2), [student, *teachers]
    )
    terms = testing.fkd_terms(student, teachers, 0.7, 0.2)[1]
    for g, t in zip(grads, terms, strict=True):
        assert t.min().item() > 0 and bool((g.abs() <= t).all())


@pytest.mark.parametrize("batch", [2, 3, 9])
def test_rkd_terms_bound_the_gradients(batch):
    gen = torch.Generator().manual_seed(batch)
    s = torch.randn(batch, 3, generator=gen, dtype=F64)
    t = torch.randn(batch, 5, generator=gen, dtype=F64)
    _, grads = testing.reference64(reference.rkd_distance_loss, [s, t])
    terms = testing.rkd_terms(s, t)[1]
    for g, bound in zip(grads, terms, strict=True):
        assert bound.min().item() > 0 and bool((g.abs() <= bound).all())
