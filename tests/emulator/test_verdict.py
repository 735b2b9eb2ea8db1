"""The emulator's verdicts (tools/cuda_emulator/verdict.py) do not depend on the reference's
roundoff: a gradient that is zero in exact arithmetic (FKD at B = 1, RKD at B = 2) gets the same
verdict when the float64 reference is perturbed at the 1e-15 level, as another host's BLAS may
perturb it (issue 10), and a real error is still caught."""

import pytest
import torch

from tools.cuda_emulator import fkd, rkd, verdict


def _noise(x: torch.Tensor, size: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return x + size * (2 * torch.rand(x.shape, generator=gen, dtype=x.dtype) - 1)


def test_fkd_b1_verdict_ignores_reference_roundoff(emulator):
    case = fkd.CASES[0]
    assert (case.batch, case.teachers_grad, case.dtype) == (1, True, torch.float64)
    out = fkd.run(emulator("fkd"), case)
    loss, (g_student, g_teacher) = fkd.reference64(case)
    # The teacher gradient is zero in exact arithmetic (rho_S = rho_T = 1): its terms are not.
    assert g_teacher.abs().max().item() < 1e-15
    assert verdict.fkd_grad_terms(*fkd.make_inputs(case), case.kd, case.fr)[1] > 0.1
    for seed in range(3):
        noisy = (loss, [g_student, _noise(g_teacher, 1e-15, seed)])
        checks = fkd.verdicts(case, out, noisy)
        assert all(c.ok for c in checks), [str(c) for c in checks if not c.ok]
        # The old scale (the reference's largest entry) fails on that noise.
        old = verdict.relative_error(out.grads_fb[1], noisy[1][1], noisy[1][1].abs().max().item())
        assert old > fkd.GRAD_TOL[case.dtype]
    # A kernel error well above roundoff is still one.
    wrong = fkd.Outputs(
        out.loss, out.grads, out.loss_fb, [out.grads_fb[0], out.grads_fb[1] + 1e-9], 1
    )
    assert not all(c.ok for c in fkd.verdicts(case, wrong))


def test_rkd_b2_verdict_ignores_reference_roundoff(emulator):
    case = rkd.CASES[0]
    assert (case.batch, case.student_dtype) == (2, torch.float64)
    out = rkd.run(emulator("rkd"), case)
    loss, g_student, g_teacher = rkd.reference64(case)
    # B = 2: one distance per side, x = d_S / mu_S - d_T / mu_T = 0, so no gradient at all.
    assert max(g_student.abs().max().item(), g_teacher.abs().max().item()) < 1e-15
    # Roundoff of a float64 reference: a few ulps of the gradient's terms.
    terms = verdict.rkd_grad_terms(*rkd.make_inputs(case), case.grad)
    assert min(terms) > 0.01
    size = [4 * torch.finfo(torch.float64).eps * t for t in terms]
    for seed in range(3):
        noisy = (loss, _noise(g_student, size[0], seed), _noise(g_teacher, size[1], seed + 7))
        checks = rkd.verdicts(case, out, noisy)
        assert all(c.ok for c in checks), [str(c) for c in checks if not c.ok]
        old = verdict.relative_error(out.grads["fb"][0], noisy[1], noisy[1].abs().max().item())
        assert old > rkd.GRAD_TOL[case.student_dtype]
    grads = dict(out.grads, bwd=(out.grads["bwd"][0] + 1e-9, out.grads["bwd"][1]))
    wrong = rkd.Outputs(out.loss, out.loss_fb, grads, out.splits, out.launches)
    assert not all(c.ok for c in rkd.verdicts(case, wrong))


def test_grad_scale_is_the_reference_unless_it_cancels():
    ref = torch.tensor([3.0, -4.0], dtype=torch.float64)
    # Ordinary results: the reference's largest entry; the roundoff slack changes nothing.
    slack = verdict.roundoff(10.0, torch.float64)
    assert verdict.grad_scale(ref, 1e-12, slack=slack) == 4.0
    # A result that is zero in exact arithmetic: the slack (from the terms), not the noise.
    tiny = torch.tensor([1e-17, -3e-18], dtype=torch.float64)
    assert verdict.grad_scale(tiny, 1e-12, slack=slack) == pytest.approx(slack / 1e-12)
    assert verdict.grad_scale(tiny, 1e-5, terms=2.5) == 2.5


def test_relative_error_refuses_non_finite_and_inexact_zeros():
    want = torch.tensor([1.0, float("nan"), 2.0])
    assert verdict.relative_error(torch.tensor([1.0, float("nan"), 2.5]), want, 2.0) == 0.25
    assert verdict.relative_error(torch.tensor([1.0, 0.0, 2.0]), want, 2.0) == float("inf")
    assert verdict.relative_error(torch.tensor([float("inf"), 0.0]), torch.zeros(2), 1.0) == float(
        "inf"
    )
    assert verdict.relative_error(torch.zeros(3), torch.zeros(3), 0.0) == 0.0
    assert verdict.relative_error(torch.full((3,), 1e-30), torch.zeros(3), 0.0) == float("inf")


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_fkd_terms_bound_the_gradients(batch):
    """The terms are an upper bound of each gradient (so the slack never exceeds what a kernel
    sums), from the inputs alone: positive even where the gradient is exactly zero."""
    gen = torch.Generator().manual_seed(batch)
    student = torch.randn(batch, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    teachers = [torch.randn(batch, w, generator=gen, dtype=torch.float64) for w in (1, 6)]
    for t in teachers:
        t.requires_grad_()
    from fastkd import reference

    loss = reference.fkd_loss(student, teachers, 0.7, 0.2)
    grads = torch.autograd.grad(loss, [student, *teachers])
    terms = verdict.fkd_grad_terms(student.detach(), [t.detach() for t in teachers], 0.7, 0.2)
    for g, t in zip(grads, terms, strict=True):
        assert t > 0 and g.abs().max().item() <= t


@pytest.mark.parametrize("batch", [2, 3, 9])
def test_rkd_terms_bound_the_gradients(batch):
    from fastkd import reference

    gen = torch.Generator().manual_seed(batch)
    s = torch.randn(batch, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randn(batch, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    grads = torch.autograd.grad(reference.rkd_distance_loss(s, t), [s, t])
    terms = verdict.rkd_grad_terms(s.detach(), t.detach())
    for g, bound in zip(grads, terms, strict=True):
        assert bound > 0 and g.abs().max().item() <= bound
