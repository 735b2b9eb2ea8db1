"""Executable theory of self-distillation with ground-truth targets (Borup & Andersen 2021).

The closed forms of ``fastkd.selfdistill`` are checked against a literal transcription of the
iteration (Eq. 3-5): step t solves KRR with ``torch.linalg.solve`` on the mixed targets
``alpha_t y + (1 - alpha_t) y^(t-1)``. The paper's lemma/theorems are asserted as stated (or as
sharpened in docs/selfdistill.md).
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch

from fastkd.selfdistill import (
    KernelRidgeSelfDistiller,
    SelfDistillationLoss,
    estimate_alpha,
    linear_kernel,
    rbf_kernel,
    self_distillation_loss,
)

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, g):
    return torch.randn(*shape, generator=g, dtype=F64)


def _rand(*shape, g):
    return torch.rand(*shape, generator=g, dtype=F64)


def _laplace(x1, x2):
    """A PSD kernel that is neither RBF nor linear, for the callable path."""
    return torch.exp(-torch.cdist(x1, x2, p=1.0))


def explicit_iteration(K, Kx, y, lam, alphas):
    """Literal Eq. (3)-(5): refit KRR each step to alpha y + (1 - alpha) y_prev.

    Returns (train predictions per step, new-input predictions per step, duals per step).
    """
    n = K.shape[0]
    M = K + lam * torch.eye(n, dtype=K.dtype)
    targets = y
    trains, news, duals = [], [], []
    for t in range(len(alphas) + 1):
        if t > 0:
            targets = alphas[t - 1] * y + (1 - alphas[t - 1]) * trains[-1]
        beta = torch.linalg.solve(M, targets)
        duals.append(beta)
        trains.append(K @ beta)
        news.append(Kx @ beta)
    return trains, news, duals


def _data(kind, n, d, p, seed):
    """Inputs, targets, a kernel spec for the distiller and the explicit (K, Kx) matrices."""
    g = _gen(seed)
    X = _randn(n, d, g=g)
    Xn = _randn(7, d, g=g)
    y = _randn(n, g=g) if p is None else _randn(n, p, g=g)
    if kind == "rbf":
        gamma = 0.3 + _rand(1, g=g).item()
        K, Kx = rbf_kernel(X, X, gamma), rbf_kernel(Xn, X, gamma)
        return KernelRidgeSelfDistiller("rbf", gamma=gamma, lam=0.1), X, Xn, y, K, Kx
    if kind == "linear":
        return KernelRidgeSelfDistiller("linear", lam=0.5), X, Xn, y, X @ X.T, Xn @ X.T
    if kind == "callable":
        K, Kx = _laplace(X, X), _laplace(Xn, X)
        return KernelRidgeSelfDistiller(_laplace, lam=0.2), X, Xn, y, K, Kx
    K, Kx = rbf_kernel(X, X, 0.7), rbf_kernel(Xn, X, 0.7)
    return KernelRidgeSelfDistiller("precomputed", lam=0.05), K, Kx, y, K, Kx


# ------------------------------------------------------------------ closed form == iteration


@pytest.mark.parametrize("kind", ["rbf", "linear", "callable", "precomputed"])
@pytest.mark.parametrize("n, d, p", [(1, 2, None), (3, 1, 2), (17, 3, None), (17, 2, 3)])
def test_closed_form_equals_explicit_iteration(kind, n, d, p):
    seed = zlib.crc32(repr((kind, n, d, p)).encode()) % 10_000
    model, X, Xn, y, K, Kx = _data(kind, n, d, p, seed)
    model.fit(X, y)
    alphas = _rand(5, g=_gen(seed + 1)).tolist()
    trains, news, duals = explicit_iteration(K, Kx, y, model.lam, alphas)

    got_train = model.train_predictions(alphas, all_steps=True)
    got_new = model.predict(Xn, alphas, all_steps=True)
    assert got_train.shape == (6, *y.shape)
    assert got_new.shape == (6, 7, *y.shape[1:])
    torch.testing.assert_close(got_train, torch.stack(trains), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(got_new, torch.stack(news), rtol=1e-9, atol=1e-10)
    # the last step alone, and every prefix, agree with the stacked result
    for t in range(6):
        torch.testing.assert_close(model.train_predictions(alphas[:t]), trains[t])
        torch.testing.assert_close(model.predict(Xn, alphas[:t]), news[t])
    torch.testing.assert_close(model.dual_coef(alphas), duals[-1], rtol=1e-8, atol=1e-10)


def test_predict_at_training_inputs_equals_train_predictions():
    g = _gen(3)
    X, y = _randn(13, 2, g=g), _randn(13, 2, g=g)
    model = KernelRidgeSelfDistiller("rbf", gamma=0.8, lam=0.3).fit(X, y)
    alphas = [0.1, 0.9, 0.4]
    torch.testing.assert_close(model.predict(X, alphas), model.train_predictions(alphas))
    torch.testing.assert_close(
        model.limit_predict(X, 0.3), model.limit_train_predictions(0.3), rtol=1e-9, atol=1e-10
    )


def test_alphas_outside_unit_interval_follow_the_iteration():
    # Unclipped Eq. 16 may return such weights; the recursion must still be the iteration.
    g = _gen(4)
    X, y = _randn(9, 2, g=g), _randn(9, g=g)
    model = KernelRidgeSelfDistiller("rbf", gamma=1.0, lam=0.2).fit(X, y)
    alphas = [1.7, -0.4, 0.5]
    K = rbf_kernel(X, X, 1.0)
    trains, _, _ = explicit_iteration(K, K, y, 0.2, alphas)
    torch.testing.assert_close(model.train_predictions(alphas), trains[-1])


def test_alphas_accepts_tensor_and_empty():
    g = _gen(5)
    X, y = _randn(6, 2, g=g), _randn(6, g=g)
    model = KernelRidgeSelfDistiller("rbf", gamma=1.0, lam=0.2).fit(X, y)
    K = rbf_kernel(X, X, 1.0)
    torch.testing.assert_close(
        model.train_predictions(), K @ torch.linalg.solve(K + 0.2 * torch.eye(6, dtype=F64), y)
    )
    a = torch.tensor([0.2, 0.6], dtype=torch.float32)
    expect = model.train_predictions([0.2, 0.6])
    assert not torch.equal(expect, model.train_predictions([0.6, 0.2]))  # order matters
    torch.testing.assert_close(model.train_predictions(a), expect, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(model.train_predictions(np.array([0.2, 0.6])), expect)
    # optimal_alphas output feeds straight back in
    chosen = model.optimal_alphas(X, y, tau=3)
    torch.testing.assert_close(
        model.train_predictions(chosen), model.train_predictions(chosen.tolist())
    )


# ----------------------------------------------------------------------------- rank deficiency


def _pinv_form_predictions(K, Kx, y, lam, alphas):
    """The paper's D^-1 form f(x) = kappa(x,X)^T V D^+ B^(t) V^T y, with a pseudo-inverse."""
    d, V = torch.linalg.eigh(K)
    tol = K.shape[0] * torch.finfo(F64).eps * d.abs().max() * 10
    d_plus = torch.where(d > tol, 1.0 / d.clamp_min(tol), torch.zeros_like(d))
    a = d.clamp_min(0) / (d.clamp_min(0) + lam)
    b = a
    for alpha in alphas:
        b = a * (alpha + (1 - alpha) * b)
    return Kx @ V @ ((d_plus * b)[:, None] * (V.T @ y.reshape(len(y), -1)))


@pytest.mark.parametrize("case", ["duplicates", "linear_n_gt_dim", "precomputed_rank1"])
def test_rank_deficient_kernel_is_finite_and_exact(case):
    g = _gen(11)
    if case == "duplicates":
        base = _randn(5, 2, g=g)
        X = torch.cat([base, base, base[:2]])  # 12 points, rank <= 5
        Xn = _randn(4, 2, g=g)
        model = KernelRidgeSelfDistiller("rbf", gamma=0.5, lam=1e-3)
        K, Kx = rbf_kernel(X, X, 0.5), rbf_kernel(Xn, X, 0.5)
    elif case == "linear_n_gt_dim":
        X, Xn = _randn(17, 3, g=g), _randn(4, 3, g=g)  # rank 3
        model = KernelRidgeSelfDistiller("linear", lam=1e-3)
        K, Kx = linear_kernel(X, X), linear_kernel(Xn, X)
    else:
        v = _randn(15, 1, g=g)
        K = v @ v.T  # rank 1
        Kx = _randn(4, 1, g=g) @ v.T
        X, Xn = K, Kx
        model = KernelRidgeSelfDistiller("precomputed", lam=1e-3)
    y = _randn(K.shape[0], g=g)
    assert int(torch.linalg.matrix_rank(K)) < K.shape[0]
    model.fit(X, y)
    assert float(model.eigenvalues.min()) >= 0.0  # roundoff negatives clamped
    alphas = [0.0, 0.3, 1.0, 0.05, 0.6]
    train = model.train_predictions(alphas, all_steps=True)
    new = model.predict(Xn, alphas, all_steps=True)
    assert torch.isfinite(train).all() and torch.isfinite(new).all()
    assert torch.isfinite(model.limit_predict(Xn, 0.2)).all()
    trains, news, _ = explicit_iteration(K, Kx, y, model.lam, alphas)
    torch.testing.assert_close(train, torch.stack(trains), rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(new, torch.stack(news), rtol=1e-7, atol=1e-9)
    # where D^-1 is needed (the paper's own form), a pseudo-inverse gives the same function
    pinv_new = _pinv_form_predictions(K, Kx, y, model.lam, alphas).squeeze(-1)
    torch.testing.assert_close(new[-1], pinv_new, rtol=1e-6, atol=1e-7)
    if case == "duplicates":  # identical inputs get identical predictions
        torch.testing.assert_close(train[:, :5], train[:, 5:10], rtol=1e-9, atol=1e-10)


def test_non_psd_precomputed_gram_is_rejected():
    g = _gen(12)
    Q, _ = torch.linalg.qr(_randn(6, 6, g=g))
    K = Q @ torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.5, 0.1, -0.5], dtype=F64)) @ Q.T
    with pytest.raises(ValueError, match="positive semi-definite"):
        KernelRidgeSelfDistiller("precomputed", lam=0.1).fit(K, _randn(6, g=g))


# ------------------------------------------------------------------------- Lemma 4.2 (diag B)


def _model_with_eigs(a_values, lam=1.0, seed=0):
    """A precomputed-kernel distiller whose A = D (D + lam I)^-1 has the given diagonal."""
    a = torch.tensor(a_values, dtype=F64)
    d = lam * a / (1 - a)
    Q, _ = torch.linalg.qr(_randn(len(a), len(a), g=_gen(seed)))
    K = Q @ torch.diag(d) @ Q.T
    model = KernelRidgeSelfDistiller("precomputed", lam=lam).fit(K, _randn(len(a), g=_gen(seed)))
    return model, model.diag_B()  # eigh order (ascending), = sorted a


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.8])
def test_lemma_4_2_diag_B_in_unit_interval_and_strictly_decreasing(alpha):
    g = _gen(21)
    X = _randn(17, 2, g=g)
    model = KernelRidgeSelfDistiller("rbf", gamma=0.5, lam=0.3).fit(X, _randn(17, g=g))
    B = model.diag_B([alpha] * 8, all_steps=True)  # (9, n)
    a = model.diag_B()
    assert ((B >= 0) & (B <= 1)).all()
    assert (B <= a + 1e-15).all()  # never above the first step
    diffs = B[1:] - B[:-1]
    assert (diffs <= 1e-16).all()
    # strict where the decrease stays above roundoff: b_2 - b_1 = -a (1 - alpha)(1 - a)
    big = a > 0.2
    assert big.sum() >= 3 and (diffs[:, big] < 0).all()
    # closed form of the scalar recursion b_t = b* + (a(1-alpha))^(t-1) (a - b*)
    b_star = alpha * a / (1 - a * (1 - alpha))
    for t in range(9):
        expect = b_star + (a * (1 - alpha)) ** t * (a - b_star)
        torch.testing.assert_close(B[t], expect, rtol=1e-10, atol=1e-14)


def test_lemma_4_2_alpha_one_and_varying_alphas():
    g = _gen(22)
    X = _randn(11, 3, g=g)
    model = KernelRidgeSelfDistiller("rbf", gamma=0.2, lam=0.4).fit(X, _randn(11, g=g))
    a = model.diag_B()
    B1 = model.diag_B([1.0] * 5, all_steps=True)
    torch.testing.assert_close(B1, a.expand(6, -1), rtol=0, atol=0)
    # for a varying sequence in [0, 1] the entries stay in [0, A] (monotonicity needs fixed alpha)
    alphas = _rand(12, g=g).tolist()
    B = model.diag_B(alphas, all_steps=True)
    assert ((B >= 0) & (B <= a + 1e-15)).all()


# ----------------------------------------------------------------- Theorem 4.3 (ratios R_k)


def _ratios(B):
    """R_k^(tau) = B_kk^(tau) / B_11^(tau), with index 1 the largest eigenvalue (last in eigh)."""
    return B / B[..., -1:]


def test_theorem_4_3_alpha_one_ratios_constant():
    g = _gen(31)
    model = KernelRidgeSelfDistiller("rbf", gamma=2.0, lam=0.5).fit(
        _randn(9, 1, g=g), _randn(9, g=g)
    )
    R = _ratios(model.diag_B([1.0] * 6, all_steps=True))
    torch.testing.assert_close(R, R[0].expand_as(R), rtol=0, atol=0)


def test_theorem_4_3_alpha_zero_ratios_are_powers():
    # alpha = 0 (Mobahi et al.): B^(tau) = A^tau, so R^(tau) = (R^(1))^tau -> 0 for d_k < d_1.
    model, a = _model_with_eigs([0.05, 0.3, 0.5, 0.51, 0.9])
    R = _ratios(model.diag_B([0.0] * 7, all_steps=True))
    for t in range(8):
        torch.testing.assert_close(R[t], R[0] ** (t + 1), rtol=1e-12, atol=0)
    assert (R[1:, :-1] < R[:-1, :-1]).all()  # strictly decreasing for every k with d_k < d_1


@pytest.mark.parametrize("alpha", [0.04, 0.25, 0.5, 0.9])
def test_theorem_4_3_ratios_below_first_step(alpha):
    # For alpha in [0, 1): R_k^(tau) <= R_k^(1), strictly for 0 < d_k < d_1 (tau >= 2).
    g = _gen(int(alpha * 100))
    model = KernelRidgeSelfDistiller("rbf", gamma=1.5, lam=0.1).fit(
        _randn(15, 2, g=g), _randn(15, g=g)
    )
    B = model.diag_B([alpha] * 10, all_steps=True)
    keep = model.diag_B() > 1e-6  # ratios of numerically-zero entries are meaningless
    R = _ratios(B)[:, keep]
    assert (R[1:, :-1] < R[0, :-1]).all()
    # and the limit ratio of Thm 4.5 is positive and still below R^(1)
    R_inf = _ratios(model.limit_diag_B(alpha))[keep]
    assert (R_inf[:-1] > 0).all() and (R_inf[:-1] < R[0, :-1]).all()


def test_theorem_4_3_ratio_is_not_monotone_for_small_alpha():
    # The theorem compares with step 1 only: for 0 < alpha < 1 the ratio can dip and recover.
    model, a = _model_with_eigs([0.27, 0.64])
    R = _ratios(model.diag_B([0.04] * 6, all_steps=True))[:, 0]
    assert R[2] < R[1] < R[0] and R[5] > R[3]
    assert (R[1:] < R[0]).all()


# ------------------------------------------------------------------------- Theorem 4.5 limit


@pytest.mark.parametrize("alpha", [0.05, 0.3, 1.0])
def test_theorem_4_5_limit_equals_many_steps(alpha):
    g = _gen(41)
    X, Xn, y = _randn(17, 2, g=g), _randn(5, 2, g=g), _randn(17, 2, g=g)
    lam = 0.5
    model = KernelRidgeSelfDistiller("rbf", gamma=0.7, lam=lam).fit(X, y)
    steps = [alpha] * 600
    torch.testing.assert_close(
        model.train_predictions(steps), model.limit_train_predictions(alpha), rtol=1e-9, atol=1e-11
    )
    torch.testing.assert_close(
        model.predict(Xn, steps), model.limit_predict(Xn, alpha), rtol=1e-9, atol=1e-11
    )
    # the closed limit is KRR with amplified regularisation lam / alpha
    K, Kx = rbf_kernel(X, X, 0.7), rbf_kernel(Xn, X, 0.7)
    beta = torch.linalg.solve(K + lam / alpha * torch.eye(17, dtype=F64), y)
    torch.testing.assert_close(model.limit_train_predictions(alpha), K @ beta)
    torch.testing.assert_close(model.limit_predict(Xn, alpha), Kx @ beta)
    # and the literal iteration converges to it too
    trains, news, _ = explicit_iteration(K, Kx, y, lam, [alpha] * 300)
    torch.testing.assert_close(trains[-1], K @ beta, rtol=1e-8, atol=1e-10)


def test_alpha_zero_collapses_to_zero():
    g = _gen(42)
    X, Xn, y = _randn(17, 1, g=g), _randn(6, 1, g=g), _randn(17, g=g)
    model = KernelRidgeSelfDistiller("rbf", gamma=1.0, lam=0.5).fit(X, y)
    a_max = float(model.diag_B().max())
    preds = model.train_predictions([0.0] * 150, all_steps=True)
    norms = preds.norm(dim=1)
    assert (norms[1:] < norms[:-1]).all()
    bound = torch.tensor([a_max ** (t + 1) for t in range(151)], dtype=F64) * y.norm()
    assert (norms <= bound * (1 + 1e-12)).all()
    assert float(norms[-1]) < 1e-3 * float(norms[0])
    assert float(model.predict(Xn, [0.0] * 1000).abs().max()) < 1e-12
    with pytest.raises(ValueError, match="alpha"):
        model.limit_predict(Xn, 0.0)


# -------------------------------------------------------------------------- optimal alpha*


def _val_mse(K, Kv, y, yv, lam, alphas):
    _, news, _ = explicit_iteration(K, Kv, y, lam, alphas)
    return float((news[-1] - yv).square().sum())


@pytest.mark.parametrize("p", [None, 2])
def test_optimal_alpha_beats_every_alpha_on_a_grid(p):
    g = _gen(51 if p is None else 52)
    f = (lambda x: torch.sin(3 * x).sum(1)) if p is None else (lambda x: torch.sin(3 * x))
    X, Xv = _rand(17, 2, g=g) * 2, _rand(23, 2, g=g) * 2
    y = f(X) + 0.4 * _randn(*f(X).shape, g=g)
    yv = f(Xv) + 0.4 * _randn(*f(Xv).shape, g=g)
    lam, gamma = 0.05, 4.0
    model = KernelRidgeSelfDistiller("rbf", gamma=gamma, lam=lam).fit(X, y)
    K, Kv = rbf_kernel(X, X, gamma), rbf_kernel(Xv, X, gamma)
    grid = torch.linspace(-1.0, 2.0, 601).tolist()
    for clip in (False, True):
        chosen = model.optimal_alphas(Xv, yv, tau=5, clip=clip).tolist()
        assert len(chosen) == 4
        for t in range(4):
            prefix = chosen[:t]  # Algorithm 1: earlier steps use the earlier alpha*
            best = _val_mse(K, Kv, y, yv, lam, prefix + [chosen[t]])
            cands = [a for a in grid if 0 <= a <= 1] if clip else grid
            others = [_val_mse(K, Kv, y, yv, lam, prefix + [a]) for a in cands[::6]]
            assert best <= min(others) * (1 + 1e-12)
            if clip:
                assert 0.0 <= chosen[t] <= 1.0


def test_estimate_alpha_equals_krr_alpha_star():
    g = _gen(53)
    X, Xv = _randn(17, 3, g=g), _randn(11, 3, g=g)
    y, yv = _randn(17, 2, g=g), _randn(11, 2, g=g)
    model = KernelRidgeSelfDistiller("rbf", gamma=0.3, lam=0.2).fit(X, y)
    chosen = model.optimal_alphas(Xv, yv, tau=4, clip=False).tolist()
    for t in range(3):
        prefix = chosen[:t]
        y1 = model.predict(Xv, prefix + [1.0])
        y0 = model.predict(Xv, prefix + [0.0])
        assert estimate_alpha(yv, y1, y0, clip=False) == pytest.approx(chosen[t], rel=1e-10)
        # the Frobenius least-squares solution, computed independently
        u, r = (y1 - y0).reshape(-1, 1), (yv - y0).reshape(-1)
        ls = torch.linalg.lstsq(u, r).solution.item()
        assert estimate_alpha(yv, y1, y0, clip=False) == pytest.approx(ls, rel=1e-10)


def test_estimate_alpha_clip_and_degenerate():
    g = _gen(54)
    y0 = _randn(6, 3, g=g)
    u = _randn(6, 3, g=g)
    for target_alpha in (-0.7, 0.35, 1.8):
        yv = y0 + target_alpha * u  # exactly representable optimum
        assert estimate_alpha(yv, y0 + u, y0, clip=False) == pytest.approx(target_alpha)
        clipped = estimate_alpha(yv, y0 + u, y0)
        assert clipped == pytest.approx(min(max(target_alpha, 0.0), 1.0))
    # u = 0: every alpha is equally good; documented answer is 1.0 (no distillation)
    assert estimate_alpha(_randn(6, 3, g=g), y0, y0.clone()) == 1.0
    assert estimate_alpha(_randn(4, g=g), torch.zeros(4), torch.zeros(4), clip=False) == 1.0
    # float32 and non-contiguous inputs
    yv, y1, yz = _randn(5, 4, g=g), _randn(5, 4, g=g), _randn(5, 4, g=g)
    ref = estimate_alpha(yv, y1, yz, clip=False)
    got = estimate_alpha(yv.T.float().T, y1.float(), yz.float(), clip=False)
    assert got == pytest.approx(ref, rel=1e-5)


def test_optimal_alphas_tau_one_is_empty_and_kernel_too_flat_gives_one():
    g = _gen(55)
    X, y = _randn(5, 1, g=g), _randn(5, g=g)
    model = KernelRidgeSelfDistiller("rbf", gamma=1.0, lam=0.1).fit(X, y)
    assert model.optimal_alphas(X, y, tau=1).shape == (0,)
    # validation inputs far from all training inputs: kappa(X_val, X) = 0, so u = 0
    far = torch.full((3, 1), 1e3, dtype=F64)
    assert model.optimal_alphas(far, _randn(3, g=g), tau=3).tolist() == [1.0, 1.0]


# ---------------------------------------------------------------------------- multi-output


def test_multi_output_equals_per_column_fits():
    g = _gen(61)
    X, Xn, y = _randn(17, 2, g=g), _randn(5, 2, g=g), _randn(17, 3, g=g)
    alphas = [0.3, 0.0, 0.7]
    multi = KernelRidgeSelfDistiller("rbf", gamma=0.6, lam=0.2).fit(X, y)
    for j in range(3):
        single = KernelRidgeSelfDistiller("rbf", gamma=0.6, lam=0.2).fit(X, y[:, j])
        assert single.predict(Xn, alphas).shape == (5,)
        torch.testing.assert_close(multi.predict(Xn, alphas)[:, j], single.predict(Xn, alphas))
        torch.testing.assert_close(
            multi.train_predictions(alphas)[:, j], single.train_predictions(alphas)
        )
        torch.testing.assert_close(
            multi.limit_predict(Xn, 0.4)[:, j], single.limit_predict(Xn, 0.4)
        )


def test_float32_and_default_gamma():
    g = _gen(62)
    X, y = _randn(10, 4, g=g), _randn(10, g=g)
    m64 = KernelRidgeSelfDistiller("rbf", lam=0.3).fit(X, y)
    m32 = KernelRidgeSelfDistiller("rbf", lam=0.3, dtype=torch.float32).fit(X.float(), y.float())
    out = m32.train_predictions([0.5, 0.5])
    assert out.dtype == torch.float32
    torch.testing.assert_close(
        out.double(), m64.train_predictions([0.5, 0.5]), rtol=1e-4, atol=1e-5
    )
    # default gamma = 1 / n_features
    K = rbf_kernel(X, X, 0.25)
    expect = K @ torch.linalg.solve(K + 0.3 * torch.eye(10, dtype=F64), y)
    torch.testing.assert_close(m64.train_predictions(), expect)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    g = _gen(63)
    X, Xn, y = _randn(17, 2, g=g), _randn(5, 2, g=g), _randn(17, 2, g=g)
    cpu = KernelRidgeSelfDistiller("rbf", gamma=0.5, lam=0.1).fit(X, y)
    gpu = KernelRidgeSelfDistiller("rbf", gamma=0.5, lam=0.1, device="cuda").fit(X, y)
    torch.testing.assert_close(gpu.predict(Xn, [0.2, 0.4]).cpu(), cpu.predict(Xn, [0.2, 0.4]))
    torch.testing.assert_close(
        gpu.optimal_alphas(Xn, y[:5], 3).cpu(), cpu.optimal_alphas(Xn, y[:5], 3)
    )


# ------------------------------------------------------------------------------ NN loss


@pytest.mark.parametrize("shape", [(1,), (5,), (7, 3), (3, 2, 4)])
@pytest.mark.parametrize("alpha", [0.0, 0.37, 1.0])
def test_loss_equals_formula(shape, alpha):
    g = _gen(71)
    f, y, yt = _randn(*shape, g=g), _randn(*shape, g=g), _randn(*shape, g=g)
    n = shape[0]
    total = alpha / 2 * (f - y).square().sum() + (1 - alpha) / 2 * (f - yt).square().sum()
    torch.testing.assert_close(self_distillation_loss(f, y, yt, alpha, reduction="sum"), total)
    torch.testing.assert_close(self_distillation_loss(f, y, yt, alpha), total / n)
    per = self_distillation_loss(f, y, yt, alpha, reduction="none")
    assert per.shape == (n,)
    for i in range(n):
        expect = alpha / 2 * (f[i] - y[i]).square().sum()
        expect = expect + (1 - alpha) / 2 * (f[i] - yt[i]).square().sum()
        torch.testing.assert_close(per[i], expect)
    module = SelfDistillationLoss(alpha, reduction="sum")
    torch.testing.assert_close(module(f, y, yt), total)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_loss_gradients(reduction):
    g = _gen(72)
    alpha = 0.3
    f = _randn(6, 3, g=g).requires_grad_()
    y = _randn(6, 3, g=g)
    yt = _randn(6, 3, g=g).requires_grad_()
    self_distillation_loss(f, y, yt, alpha, reduction=reduction).backward()
    scale = 1.0 if reduction == "sum" else 1.0 / 6
    # d/df = alpha (f - Y) + (1 - alpha)(f - Yt) = f - (alpha Y + (1 - alpha) Yt)
    target = alpha * y + (1 - alpha) * yt.detach()
    torch.testing.assert_close(f.grad, scale * (f.detach() - target))
    torch.testing.assert_close(yt.grad, scale * (1 - alpha) * (yt.detach() - f.detach()))
    assert torch.autograd.gradcheck(
        lambda a, b, c: self_distillation_loss(a, b, c, 0.6, reduction=reduction),
        (_randn(4, 2, g=g).requires_grad_(), _randn(4, 2, g=g).requires_grad_(), _randn(4, 2, g=g)),
    )


def test_loss_minimiser_and_dtypes():
    g = _gen(73)
    y, yt = _randn(5, 2, g=g), _randn(5, 2, g=g)
    alpha = 0.8
    f_star = alpha * y + (1 - alpha) * yt
    base = self_distillation_loss(f_star, y, yt, alpha)
    for _ in range(5):
        assert self_distillation_loss(f_star + 1e-3 * _randn(5, 2, g=g), y, yt, alpha) > base
    half = self_distillation_loss(y.half(), yt.half(), y.half(), 0.5)
    assert half.dtype == torch.float32
    assert self_distillation_loss(y.float(), yt.float(), y.float(), 0.5).dtype == torch.float32
    mixed = self_distillation_loss(y.float(), yt, y.float(), 0.5)
    assert mixed.dtype == F64
    nan = self_distillation_loss(torch.full((2, 2), float("nan")), y[:2], yt[:2], 0.5)
    assert torch.isnan(nan)  # NaN propagates, never raises
    strided = _randn(3, 8, g=g)[:, ::2]
    torch.testing.assert_close(
        self_distillation_loss(strided, y[:3, :1].expand(3, 4), yt[:3, :1].expand(3, 4), 0.5),
        self_distillation_loss(
            strided.contiguous(),
            y[:3, :1].expand(3, 4).contiguous(),
            yt[:3, :1].expand(3, 4).contiguous(),
            0.5,
        ),
    )


# ------------------------------------------------------------------------------ bad input


def _fitted():
    g = _gen(81)
    return KernelRidgeSelfDistiller("rbf", gamma=1.0, lam=0.1).fit(
        _randn(4, 2, g=g), _randn(4, g=g)
    )


X4, Y4 = torch.zeros(4, 2, dtype=F64), torch.zeros(4, dtype=F64)
T3 = torch.zeros(3, 2)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: KernelRidgeSelfDistiller(lam=0.0), ValueError, "^lam must be > 0"),
        (lambda: KernelRidgeSelfDistiller(lam=-1.0), ValueError, "^lam must be > 0"),
        (lambda: KernelRidgeSelfDistiller(lam=float("nan")), ValueError, "^lam must be finite"),
        (lambda: KernelRidgeSelfDistiller(lam="1"), TypeError, "^lam must be a real"),
        (lambda: KernelRidgeSelfDistiller(gamma=0.0), ValueError, "gamma"),
        (lambda: KernelRidgeSelfDistiller("linear", gamma=1.0), ValueError, "gamma"),
        (lambda: KernelRidgeSelfDistiller("poly"), ValueError, "kernel"),
        (lambda: KernelRidgeSelfDistiller(3), TypeError, "kernel"),
        (lambda: KernelRidgeSelfDistiller(dtype=torch.int64), TypeError, "dtype"),
        (lambda: KernelRidgeSelfDistiller().fit(torch.zeros(4), Y4), ValueError, "^X must be 2-D"),
        (lambda: KernelRidgeSelfDistiller().fit(X4, torch.zeros(3)), ValueError, "^y has 3 rows"),
        (
            lambda: KernelRidgeSelfDistiller().fit(X4, torch.zeros(4, 1, 1)),
            ValueError,
            "^y must be",
        ),
        (
            lambda: KernelRidgeSelfDistiller().fit(torch.zeros(0, 2), torch.zeros(0)),
            ValueError,
            "^X must not be empty",
        ),
        (lambda: KernelRidgeSelfDistiller().fit(X4, Y4.long()), TypeError, "^y must be a floating"),
        (
            lambda: KernelRidgeSelfDistiller().fit(X4.numpy(), Y4),
            TypeError,
            "^X must be a torch.Tensor",
        ),
        (
            lambda: KernelRidgeSelfDistiller().fit(X4, torch.tensor([0.0, float("inf"), 0, 0])),
            ValueError,
            "^y contains NaN or Inf",
        ),
        (lambda: KernelRidgeSelfDistiller("precomputed").fit(X4, Y4), ValueError, "square"),
        (
            lambda: KernelRidgeSelfDistiller("precomputed").fit(torch.triu(torch.ones(4, 4)), Y4),
            ValueError,
            "symmetric",
        ),
        (
            lambda: KernelRidgeSelfDistiller(lambda a, b: a @ b.T[:, :1]).fit(X4, Y4),
            ValueError,
            "kernel",
        ),
        (lambda: KernelRidgeSelfDistiller().train_predictions(), RuntimeError, "fit"),
        (lambda: _fitted().train_predictions([0.5, float("nan")]), ValueError, r"alphas\[1\]"),
        (lambda: _fitted().train_predictions("0.5"), TypeError, "alphas"),
        (lambda: _fitted().diag_B(torch.zeros(2, 2)), ValueError, "alphas"),
        (lambda: _fitted().predict(torch.zeros(3, 5), [0.5]), ValueError, "X_new"),
        (lambda: _fitted().predict(torch.zeros(3), [0.5]), ValueError, "X_new"),
        (lambda: _fitted().predict(torch.zeros(0, 2)), ValueError, "X_new"),
        (lambda: _fitted().limit_predict(T3, 0.0), ValueError, r"^alpha must be in \(0, 1\]"),
        (lambda: _fitted().limit_train_predictions(1.5), ValueError, r"^alpha must be in \(0, 1\]"),
        (lambda: _fitted().limit_train_predictions(None), TypeError, "^alpha must be a real"),
        (lambda: _fitted().optimal_alphas(T3, torch.zeros(4), 3), ValueError, "y_val"),
        (lambda: _fitted().optimal_alphas(T3, torch.zeros(3), 0), ValueError, "tau"),
        (lambda: _fitted().optimal_alphas(T3, torch.zeros(3), 2.0), TypeError, "tau"),
        (
            lambda: _fitted().optimal_alphas(T3, torch.full((3,), float("nan")), 2),
            ValueError,
            "y_val",
        ),
        (
            lambda: estimate_alpha(torch.zeros(3), torch.zeros(4), torch.zeros(3)),
            ValueError,
            "val_pred_alpha1",
        ),
        (
            lambda: estimate_alpha(torch.zeros(0), torch.zeros(0), torch.zeros(0)),
            ValueError,
            "val_targets",
        ),
        (
            lambda: estimate_alpha(torch.zeros(2), torch.zeros(2), torch.tensor([0.0, math.inf])),
            ValueError,
            "val_pred_alpha0",
        ),
        (
            lambda: self_distillation_loss(T3, T3, torch.zeros(2, 2), 0.5),
            ValueError,
            "teacher_outputs",
        ),
        (lambda: self_distillation_loss(T3, T3[:, :1], T3, 0.5), ValueError, "targets"),
        (
            lambda: self_distillation_loss(T3, T3, T3, float("inf")),
            ValueError,
            "^alpha must be finite",
        ),
        (lambda: self_distillation_loss(T3, T3, T3, 0.5, reduction="avg"), ValueError, "reduction"),
        (lambda: self_distillation_loss(T3.long(), T3, T3, 0.5), TypeError, "outputs"),
        (
            lambda: self_distillation_loss(
                torch.zeros(0, 2), torch.zeros(0, 2), torch.zeros(0, 2), 0.5
            ),
            ValueError,
            "outputs",
        ),
        (
            lambda: self_distillation_loss(
                torch.tensor(1.0), torch.tensor(1.0), torch.tensor(1.0), 0.5
            ),
            ValueError,
            "outputs",
        ),
        (lambda: SelfDistillationLoss(alpha=True), TypeError, "^alpha must be a real"),
        (
            lambda: self_distillation_loss(T3, T3.to("meta"), T3, 0.5),
            ValueError,
            "^targets is on meta",
        ),
        (lambda: rbf_kernel(torch.zeros(2, 3), torch.zeros(2, 2), 1.0), ValueError, "x2"),
        (lambda: linear_kernel(torch.zeros(2), torch.zeros(2, 2)), ValueError, "x1"),
    ],
)
def test_bad_input_raises_naming_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
