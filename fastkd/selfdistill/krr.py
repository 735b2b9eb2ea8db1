"""Kernel ridge regression self-distillation in closed form (SPEC section 4) and Eq. 16.

:class:`KernelRidgeSelfDistiller` runs every distillation step from one eigendecomposition;
:func:`estimate_alpha` is the closed-form step weight, shared with the network side.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from fastkd.selfdistill.kernels import KernelArg, linear_kernel, rbf_kernel
from fastkd.validation import check_alphas, check_finite_tensor, check_real, check_tensor


class KernelRidgeSelfDistiller:
    """Closed-form iterated self-distillation of kernel ridge regression (SPEC section 4).

    Step 1 is ordinary KRR, ``beta^(1) = (K + lam I)^-1 y``. Step ``t >= 2`` refits KRR to the
    targets ``alpha_t y + (1 - alpha_t) y^(t-1)`` where ``y^(t-1)`` are the previous step's
    training predictions. Everything is computed from one ``torch.linalg.eigh`` of ``K``
    (eigenvalues below zero from roundoff are clamped to 0; ``D`` is never inverted).

    A sequence of weights is always passed as ``alphas = (alpha^(2), ..., alpha^(tau))``, so
    ``len(alphas) = tau - 1`` and an empty sequence means step 1 (plain KRR).

    Args:
        kernel: ``"rbf"`` (``exp(-gamma ||x - x'||^2)``), ``"linear"`` (``<x, x'>``), a callable
            ``kernel(X1, X2) -> (m1, m2) Gram`` on 2-D tensors, or ``"precomputed"`` (then
            ``fit`` takes the (n, n) Gram matrix and prediction methods take (m, n)
            cross-Gram matrices ``kappa(X_new, X)``).
        gamma: RBF parameter (> 0); ``None`` means ``1 / n_features``. Only for ``"rbf"``.
        lam: ridge regularisation ``lambda``, finite and > 0.
        dtype: ``torch.float64`` (default) or ``torch.float32``; inputs are converted.
        device: where to compute (default: the device of the data passed to ``fit``).
    """

    def __init__(
        self,
        kernel: KernelArg = "rbf",
        gamma: float | None = None,
        lam: float = 1.0,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ) -> None:
        if isinstance(kernel, str):
            if kernel not in ("rbf", "linear", "precomputed"):
                raise ValueError(
                    f"kernel must be 'rbf', 'linear', 'precomputed' or a callable, got {kernel!r}"
                )
        elif not callable(kernel):
            raise TypeError(f"kernel must be a string or a callable, got {type(kernel).__name__}")
        if gamma is not None:
            if kernel != "rbf":
                raise ValueError("gamma only applies to kernel='rbf'")
            gamma = check_real(gamma, "gamma")
            if gamma <= 0:
                raise ValueError(f"gamma must be > 0, got {gamma}")
        lam = check_real(lam, "lam")
        if lam <= 0:
            raise ValueError(f"lam must be > 0, got {lam}")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.kernel = kernel
        self.gamma = gamma
        self.lam = lam
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else None
        self._fitted = False

    # ------------------------------------------------------------------------------ fitting

    def fit(self, X: torch.Tensor, y: torch.Tensor) -> KernelRidgeSelfDistiller:
        """Eigendecompose the training Gram matrix once.

        Args:
            X: (n, d) training inputs, or the (n, n) Gram matrix for ``kernel="precomputed"``.
            y: (n,) or (n, p) training targets (finite).

        Returns:
            ``self``.
        """
        check_tensor(X, "X")
        if X.dim() != 2:
            raise ValueError(f"X must be 2-D (n, d), got shape {tuple(X.shape)}")
        if X.shape[0] == 0 or X.shape[1] == 0:
            raise ValueError(f"X must not be empty, got shape {tuple(X.shape)}")
        check_tensor(y, "y")
        if y.dim() not in (1, 2):
            raise ValueError(f"y must be 1-D (n,) or 2-D (n, p), got shape {tuple(y.shape)}")
        if y.shape[0] != X.shape[0]:
            raise ValueError(f"y has {y.shape[0]} rows but X has {X.shape[0]}")
        if y.numel() == 0:
            raise ValueError(f"y must not be empty, got shape {tuple(y.shape)}")
        device = self.device if self.device is not None else X.device
        X = X.to(device=device, dtype=self.dtype)
        y = y.to(device=device, dtype=self.dtype)
        check_finite_tensor(X, "X")
        check_finite_tensor(y, "y")
        n = X.shape[0]

        if self.kernel == "precomputed":
            if X.shape != (n, n):
                raise ValueError(
                    f"with kernel='precomputed', X must be the square (n, n) Gram matrix, "
                    f"got shape {tuple(X.shape)}"
                )
            K = X
            scale = K.abs().max()
            if bool((K - K.T).abs().max() > math.sqrt(torch.finfo(self.dtype).eps) * scale):
                raise ValueError("the precomputed Gram matrix X must be symmetric")
            self._X = None
        else:
            self._gamma_fit = self.gamma if self.gamma is not None else 1.0 / X.shape[1]
            self._X = X
            K = self._gram(X, X, "kernel(X, X)")

        K = 0.5 * (K + K.T)  # exact symmetry for eigh
        evals, evecs = torch.linalg.eigh(K)
        # A PSD kernel has eigenvalues >= 0; roundoff gives ~ -n eps |K|. Clamp those, but a
        # clearly negative eigenvalue means the "kernel" is not PSD and the theory breaks.
        tol = 100.0 * n * torch.finfo(self.dtype).eps * float(evals.abs().max())
        if float(evals.min()) < -tol:
            raise ValueError(
                f"the Gram matrix is not positive semi-definite (smallest eigenvalue "
                f"{float(evals.min()):.3e}); kernel must be a PSD kernel"
            )
        self._d = evals.clamp_min(0.0)
        self._V = evecs
        self._a = self._d / (self._d + self.lam)  # diag of A, in [0, 1)
        self._y_is_1d = y.dim() == 1
        y2 = y.reshape(n, -1)
        self._Vty = evecs.T @ y2  # (n, p): targets in the eigenbasis
        self._n, self._p = n, y2.shape[1]
        self._device = device
        self._fitted = True
        return self

    # ----------------------------------------------------------------------------- internals

    def _require_fit(self) -> None:
        if not self._fitted:
            raise RuntimeError("call fit(X, y) before using the distiller")

    def _gram(self, X1: torch.Tensor, X2: torch.Tensor, what: str) -> torch.Tensor:
        if self.kernel == "rbf":
            return rbf_kernel(X1, X2, self._gamma_fit)
        if self.kernel == "linear":
            return linear_kernel(X1, X2)
        G = self.kernel(X1, X2)
        if not isinstance(G, torch.Tensor):
            raise TypeError(f"{what} must return a torch.Tensor, got {type(G).__name__}")
        if G.shape != (X1.shape[0], X2.shape[0]):
            raise ValueError(
                f"{what} must return shape {(X1.shape[0], X2.shape[0])}, got {tuple(G.shape)}"
            )
        G = G.to(device=self._device_or(X1), dtype=self.dtype)
        check_finite_tensor(G, what)
        return G

    def _device_or(self, x: torch.Tensor) -> torch.device:
        return self.device if self.device is not None else x.device

    def _cross_gram(self, X_new: object, name: str) -> torch.Tensor:
        """kappa(X_new, X): (m, n)."""
        check_tensor(X_new, name)
        if X_new.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(X_new.shape)}")
        if X_new.shape[0] == 0:
            raise ValueError(f"{name} must not be empty, got shape {tuple(X_new.shape)}")
        X_new = X_new.to(device=self._device, dtype=self.dtype)
        check_finite_tensor(X_new, name)
        if self.kernel == "precomputed":
            if X_new.shape[1] != self._n:
                raise ValueError(
                    f"with kernel='precomputed', {name} must be the (m, n) cross-Gram matrix "
                    f"kappa(X_new, X_train) with n = {self._n}, got shape {tuple(X_new.shape)}"
                )
            return X_new
        if X_new.shape[1] != self._X.shape[1]:
            raise ValueError(
                f"{name} has {X_new.shape[1]} features but the training X has {self._X.shape[1]}"
            )
        return self._gram(X_new, self._X, f"kernel({name}, X)")

    def _b_steps(self, alphas: list[float]) -> list[torch.Tensor]:
        """[diag B^(1), ..., diag B^(tau)], each (n,)."""
        b = self._a
        out = [b]
        for alpha in alphas:
            b = self._a * (alpha + (1.0 - alpha) * b)
            out.append(b)
        return out

    def _c_steps(self, alphas: list[float]) -> list[torch.Tensor]:
        """[diag C^(1), ..., diag C^(tau)]: C^(1) = I, C^(t) = alpha_t I + (1-alpha_t) B^(t-1)."""
        bs = self._b_steps(alphas)
        out = [torch.ones_like(self._a)]
        for alpha, b_prev in zip(alphas, bs[:-1], strict=True):
            out.append(alpha + (1.0 - alpha) * b_prev)
        return out

    def _shape_out(self, pred: torch.Tensor) -> torch.Tensor:
        """(..., m, p) -> (..., m) for 1-D training targets."""
        return pred.squeeze(-1) if self._y_is_1d else pred

    # --------------------------------------------------------------------------- public API

    @property
    def eigenvalues(self) -> torch.Tensor:
        """(n,) eigenvalues ``D`` of K in ascending order (``eigh`` order), clamped to >= 0."""
        self._require_fit()
        return self._d

    @property
    def eigenvectors(self) -> torch.Tensor:
        """(n, n) orthonormal eigenvectors ``V`` (columns), matching :attr:`eigenvalues`."""
        self._require_fit()
        return self._V

    def diag_B(
        self, alphas: Sequence[float] | torch.Tensor = (), all_steps: bool = False
    ) -> torch.Tensor:
        """Diagonal of ``B^(tau)`` in the eigenbasis (ascending-eigenvalue order).

        ``B^(1) = D (D + lam I)^-1``; ``B^(t) = A (alpha_t I + (1 - alpha_t) B^(t-1))``.

        Args:
            alphas: (alpha^(2), ..., alpha^(tau)); empty for step 1.
            all_steps: if True return every step 1..tau.

        Returns:
            (n,) tensor, or (tau, n) when ``all_steps``.
        """
        self._require_fit()
        bs = self._b_steps(check_alphas(alphas))
        return torch.stack(bs) if all_steps else bs[-1]

    def train_predictions(
        self, alphas: Sequence[float] | torch.Tensor = (), all_steps: bool = False
    ) -> torch.Tensor:
        """Training predictions ``y^(tau) = V B^(tau) V^T y``.

        Args:
            alphas: (alpha^(2), ..., alpha^(tau)); empty for step 1.
            all_steps: if True return every step 1..tau stacked on a leading axis.

        Returns:
            (n,) or (n, p) like the training ``y`` (with a leading ``tau`` axis if
            ``all_steps``), in the distiller's dtype/device.
        """
        self._require_fit()
        bs = self._b_steps(check_alphas(alphas))
        if not all_steps:
            bs = bs[-1:]
        preds = torch.stack([self._V @ (b[:, None] * self._Vty) for b in bs])
        return self._shape_out(preds if all_steps else preds[0])

    def dual_coef(self, alphas: Sequence[float] | torch.Tensor = ()) -> torch.Tensor:
        """KRR coefficients ``beta^(tau) = V (D + lam I)^-1 C^(tau) V^T y``: (n,) or (n, p).

        ``f_tau(x) = kappa(x, X)^T beta^(tau)``.
        """
        self._require_fit()
        c = self._c_steps(check_alphas(alphas))[-1]
        return self._shape_out(self._V @ ((c / (self._d + self.lam))[:, None] * self._Vty))

    def predict(
        self,
        X_new: torch.Tensor,
        alphas: Sequence[float] | torch.Tensor = (),
        all_steps: bool = False,
    ) -> torch.Tensor:
        """Predictions ``f_tau(x) = kappa(x, X)^T V (D + lam I)^-1 C^(tau) V^T y`` at new inputs.

        Args:
            X_new: (m, d) inputs, or the (m, n) cross-Gram ``kappa(X_new, X)`` when
                ``kernel="precomputed"``.
            alphas: (alpha^(2), ..., alpha^(tau)); empty for step 1.
            all_steps: if True return every step 1..tau stacked on a leading axis.

        Returns:
            (m,) or (m, p) like the training ``y`` (leading ``tau`` axis if ``all_steps``).
        """
        self._require_fit()
        cs = self._c_steps(check_alphas(alphas))
        KV = self._cross_gram(X_new, "X_new") @ self._V  # (m, n)
        if not all_steps:
            cs = cs[-1:]
        preds = torch.stack([KV @ ((c / (self._d + self.lam))[:, None] * self._Vty) for c in cs])
        return self._shape_out(preds if all_steps else preds[0])

    def _check_limit_alpha(self, alpha: object) -> float:
        alpha = check_real(alpha, "alpha")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(
                f"alpha must be in (0, 1] for the infinite-step limit, got {alpha} "
                "(alpha = 0 repeated converges to the zero function)"
            )
        return alpha

    def limit_diag_B(self, alpha: float) -> torch.Tensor:
        """Diagonal of ``B^(inf) = alpha D (alpha D + lam I)^-1`` (Theorem 4.5), shape (n,)."""
        self._require_fit()
        alpha = self._check_limit_alpha(alpha)
        return alpha * self._d / (alpha * self._d + self.lam)

    def limit_train_predictions(self, alpha: float) -> torch.Tensor:
        """``y^(inf) = K (K + (lam / alpha) I)^-1 y`` for a fixed ``alpha`` in (0, 1] (Thm 4.5).

        Returns (n,) or (n, p) like the training ``y``.
        """
        b = self.limit_diag_B(alpha)
        return self._shape_out(self._V @ (b[:, None] * self._Vty))

    def limit_predict(self, X_new: torch.Tensor, alpha: float) -> torch.Tensor:
        """Limit function ``kappa(x, X)^T (K + (lam / alpha) I)^-1 y`` at new inputs.

        It is KRR with the amplified regularisation ``lam / alpha`` (Theorem 4.5).
        ``X_new`` as in :meth:`predict`; returns (m,) or (m, p).
        """
        self._require_fit()
        alpha = self._check_limit_alpha(alpha)
        KV = self._cross_gram(X_new, "X_new") @ self._V
        w = alpha / (alpha * self._d + self.lam)  # = 1 / (d + lam / alpha), finite at d = 0
        return self._shape_out(KV @ (w[:, None] * self._Vty))

    def optimal_alphas(
        self, X_val: torch.Tensor, y_val: torch.Tensor, tau: int, clip: bool = True
    ) -> torch.Tensor:
        """Step-wise optimal weights ``(alpha*_2, ..., alpha*_tau)`` (Eq. 16, Algorithm 1).

        At step ``t`` the previous steps use the already chosen ``alpha*_2..alpha*_{t-1}``.
        Predictions are linear in ``alpha_t``: ``f_t = alpha_t y1 + (1 - alpha_t) y0`` on the
        validation inputs with ``y1 = f_t(alpha_t = 1)`` (the step-1 fit) and
        ``y0 = f_t(alpha_t = 0)``, so the validation squared error is minimised by
        ``alpha*_t = <u, y_val - y0>_F / ||u||_F^2``, ``u = y1 - y0`` (see
        :func:`estimate_alpha`, which also defines the ``u = 0`` case).

        Args:
            X_val: (m, d) validation inputs (or (m, n) cross-Gram if precomputed).
            y_val: (m,) or (m, p) validation targets, same layout as the training ``y``.
            tau: total number of steps (>= 1); ``tau - 1`` weights are returned.
            clip: clip each ``alpha*_t`` to [0, 1] before it is used for later steps.

        Returns:
            (tau - 1,) tensor in the distiller's dtype/device; pass it as ``alphas``.
        """
        self._require_fit()
        if isinstance(tau, bool) or not isinstance(tau, numbers.Integral):
            raise TypeError(f"tau must be an int, got {type(tau).__name__}")
        if tau < 1:
            raise ValueError(f"tau must be >= 1, got {tau}")
        KV = self._cross_gram(X_val, "X_val") @ self._V
        check_tensor(y_val, "y_val")
        want = (KV.shape[0],) if self._y_is_1d else (KV.shape[0], self._p)
        if tuple(y_val.shape) != want:
            raise ValueError(
                f"y_val must have shape {want} (rows of X_val, layout of training y), "
                f"got {tuple(y_val.shape)}"
            )
        y_val = y_val.to(device=self._device, dtype=self.dtype).reshape(KV.shape[0], -1)
        check_finite_tensor(y_val, "y_val")
        inv = 1.0 / (self._d + self.lam)
        y1 = KV @ (inv[:, None] * self._Vty)  # alpha_t = 1: the step-1 fit, for every t
        b = self._a
        chosen = []
        for _ in range(tau - 1):
            y0 = KV @ ((b * inv)[:, None] * self._Vty)  # alpha_t = 0: C^(t) = B^(t-1)
            alpha = estimate_alpha(y_val, y1, y0, clip=clip)
            chosen.append(alpha)
            b = self._a * (alpha + (1.0 - alpha) * b)
        return torch.tensor(chosen, dtype=self.dtype, device=self._device)


def estimate_alpha(
    val_targets: torch.Tensor,
    val_pred_alpha1: torch.Tensor,
    val_pred_alpha0: torch.Tensor,
    clip: bool = True,
) -> float:
    """Closed-form optimal distillation weight (Eq. 16; paper Section 5 for networks).

    The step-t model trained with weight ``alpha`` predicts ``alpha Y1 + (1 - alpha) Y0`` where
    ``Y1`` (``alpha = 1``: trained on ground truth only) and ``Y0`` (``alpha = 0``: trained on
    the teacher only) are its predictions on validation inputs. This is exact for KRR and a
    linearisation for networks. The minimiser of ``||Y - (alpha Y1 + (1 - alpha) Y0)||_F^2`` is::

        alpha* = <u, Y - Y0>_F / ||u||_F^2,    u = Y1 - Y0

    Degenerate case: if ``||u||_F <= 64 eps max(||Y1||_F, ||Y0||_F)`` (zero, or pure roundoff)
    every alpha gives the same predictions, and ``1.0`` (train on ground truth only, i.e. no
    distillation) is returned.

    Args:
        val_targets: validation targets ``Y``, any shape (n, ...), n >= 1.
        val_pred_alpha1: ``Y1``, same shape.
        val_pred_alpha0: ``Y0``, same shape.
        clip: clip the result to [0, 1] (the paper's admissible range).

    Returns:
        Python float. Computed in float64 whatever the input dtype.
    """
    names = ("val_targets", "val_pred_alpha1", "val_pred_alpha0")
    ts = [val_targets, val_pred_alpha1, val_pred_alpha0]
    for name, t in zip(names, ts, strict=True):
        check_tensor(t, name)
        if t.dim() == 0 or t.numel() == 0:
            raise ValueError(f"{name} must be a non-empty tensor with a batch axis")
        if t.shape != ts[0].shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but val_targets has {tuple(ts[0].shape)}"
            )
        if t.device != ts[0].device:
            raise ValueError(f"{name} is on {t.device} but val_targets is on {ts[0].device}")
    y, y1, y0 = (t.detach().to(torch.float64) for t in ts)
    for name, t in zip(names, (y, y1, y0), strict=True):
        check_finite_tensor(t, name)
    u = y1 - y0
    uu = float(u.square().sum())
    scale = max(float(y1.norm()), float(y0.norm()))
    if math.sqrt(uu) <= 64.0 * torch.finfo(torch.float64).eps * scale:
        return 1.0
    alpha = float((u * (y - y0)).sum()) / uu
    return min(max(alpha, 0.0), 1.0) if clip else alpha
