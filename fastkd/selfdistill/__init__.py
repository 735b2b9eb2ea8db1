"""Self-distillation with ground-truth targets (Borup & Andersen, NeurIPS 2021), SPEC section 4.

Two halves:

* :class:`KernelRidgeSelfDistiller` -- the paper's kernel ridge regression (KRR) analysis made
  executable. Step 1 fits KRR to the targets ``y``; step ``t >= 2`` refits to the mixed targets
  ``alpha_t y + (1 - alpha_t) y^(t-1)``. From ONE eigendecomposition ``K = V D V^T`` every step,
  the infinite-step limit and the step-wise optimal weights follow in closed form::

      A = D (D + lam I)^-1,   B^(1) = A,   B^(t) = A (alpha_t I + (1 - alpha_t) B^(t-1))
      y^(t)      = V B^(t) V^T y                                       (training predictions)
      f_t(x)     = kappa(x, X)^T V (D + lam I)^-1 C^(t) V^T y          (new inputs)
      C^(1) = I, C^(t) = alpha_t I + (1 - alpha_t) B^(t-1)               (no D^-1 anywhere)
      y^(inf)    = K (K + (lam / alpha) I)^-1 y,   alpha in (0, 1]     (Theorem 4.5)
      alpha*_t   = <u, y_val - y0>_F / ||u||_F^2,  u = y1 - y0          (Eq. 16, Algorithm 1)

  All matrices in the eigenbasis are diagonal, so every step costs O(n p) after the O(n^3)
  eigendecomposition, and a rank-deficient ``K`` is harmless (``D`` is never inverted).

* The neural-network side (paper Section 5): :func:`self_distillation_loss`,
  :class:`SelfDistillationLoss` and the closed-form weight estimate :func:`estimate_alpha`.

Conventions: ``rbf`` is ``exp(-gamma ||x - x'||^2)`` (the scikit-learn convention). The paper
writes its illustrative kernel width as ``gamma = 1/80`` in the convention
``exp(-||x - x'||^2 / gamma)``, which is ``gamma = 80`` here (see ``docs/selfdistill.md``).

Step weights ``alpha_t`` may be any finite real number in the recursion and in the loss: Eq. 16
without clipping can return values outside [0, 1], and the step objective stays a strongly convex
quadratic (its curvature is ``alpha + (1 - alpha) = 1``). The paper's guarantees (Lemma 4.2,
Theorem 4.3) assume ``alpha_t`` in [0, 1]; the limit (Theorem 4.5) requires ``alpha`` in (0, 1].

Layout: :mod:`.kernels` (Gram matrices), :mod:`.krr` (the KRR distiller and
:func:`estimate_alpha`), :mod:`.loss` (the network loss); argument checks come from
:mod:`fastkd.validation`, like every other loss's.
"""

from fastkd.selfdistill.kernels import linear_kernel, rbf_kernel
from fastkd.selfdistill.krr import KernelRidgeSelfDistiller, estimate_alpha
from fastkd.selfdistill.loss import SelfDistillationLoss, self_distillation_loss

__all__ = [
    "KernelRidgeSelfDistiller",
    "SelfDistillationLoss",
    "estimate_alpha",
    "linear_kernel",
    "rbf_kernel",
    "self_distillation_loss",
]
