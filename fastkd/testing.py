"""Comparing a backend against the float64 reference: tolerances and a roundoff-free judgement.

Like :mod:`torch.testing`, this is what fastkd's own tests (``tests/harness.py``) and the CUDA
emulator's checkers (``tools/cuda_emulator``) judge every kernel with; it imports only torch and
:mod:`fastkd.reference`.

* :data:`TOL`: the one tolerance table, input dtype -> :class:`Tol` (value rtol, gradient tol),
  with entries keyed ``(op, dtype)`` where the CUDA kernels (as the emulator runs them) are held
  to a different gradient tolerance (:func:`tolerance`).
* :func:`reference64`: the float64 oracle, a loss and the gradient of each input that requires
  grad, for an upstream gradient ``grad_out``.
* :func:`fkd_terms`, :func:`sp_terms`, :func:`rkd_terms`, :func:`srd_terms`: the size of the
  terms each op's value and each gradient entry are summed from, float64, from the inputs.
* The judgement (:func:`allowed_error`, :func:`error_ratio`, :func:`assert_close`): an entry
  passes when

      |got - want| <= rounding(want -> got.dtype) + max(tol * max |want|, ULPS eps terms)

  ``rounding`` is what storing the result in its dtype costs whatever a kernel does; ``terms``
  comes from the inputs (never from the computed difference, nor from the reference's own
  result), ``eps`` is the machine epsilon of the accumulation dtype. Where the result is of the
  size of its terms the second term is far below the first and the tolerance stays ``tol``.
  Where the result cancels to zero in exact arithmetic (FKD's teacher gradient at B = 1, width 1,
  zero rows, RKD at B = 2, SRD's train-mode gradient at B = 2, identical inputs) the reference is
  only roundoff (1e-17 or 0 depending on the host's BLAS) and the error is judged against
  ``ULPS`` roundings of the terms instead: host-independent, and still tight.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fastkd import reference

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64

__all__ = [
    "TOL",
    "ULPS",
    "Tol",
    "accumulation_eps",
    "allowed_error",
    "assert_close",
    "error_ratio",
    "fkd_terms",
    "reference64",
    "rkd_terms",
    "rounding_error",
    "sp_terms",
    "srd_terms",
    "tolerance",
]

# ------------------------------------------------------------------------------------ tolerances


@dataclass(frozen=True)
class Tol:
    """Relative tolerance of the loss value and of the gradients."""

    value: float
    grad: float


# dtype keys, every backend: float64: the kernels compute in float64. float32: float32
# accumulation. float16/bfloat16: the inputs are exact in float32, so the loss keeps float32
# accuracy; a gradient may take four roundings in the input dtype (tensor-core backends round the
# difference tile and the normalised rows to it before the second product) on top of its own.
# (op, dtype) keys: the CUDA kernels as tools/cuda_emulator checks them, where they are held to
# another tolerance: FKD's float64 and half gradients are tighter (no rounded tiles there); RKD's
# float16 gradient goes through float16 distances (looser), its bfloat16 one is tighter; SRD's
# half gradients are one rounding of a float32 result.
TOL: dict = {
    F64: Tol(1e-10, 1e-10),
    F32: Tol(1e-5, 1e-5),
    F16: Tol(1e-5, 4 * torch.finfo(F16).eps),
    BF16: Tol(1e-5, 4 * torch.finfo(BF16).eps),
    ("fkd", F64): Tol(1e-12, 1e-12),
    ("fkd", F16): Tol(1e-5, 2e-3),
    ("fkd", BF16): Tol(1e-5, 1e-2),
    ("rkd", F16): Tol(1e-5, 1e-2),
    ("rkd", BF16): Tol(1e-5, 1e-2),
    ("srd", F16): Tol(1e-5, 3e-3),
    ("srd", BF16): Tol(1e-5, 2e-2),
}
ULPS = 16.0  # roundings of its terms that a correct kernel may leave in a cancelling result


def tolerance(dtype: torch.dtype, op: str | None = None) -> Tol:
    """``TOL[(op, dtype)]`` where the table has it, else ``TOL[dtype]``."""
    return TOL.get((op, dtype), TOL[dtype])


def accumulation_eps(dtype: torch.dtype) -> float:
    """Machine epsilon of the arithmetic for ``dtype`` inputs (float64, else float32)."""
    return torch.finfo(reference.accumulation_dtype(dtype)).eps


# ------------------------------------------------------------------------------------ judgement


def rounding_error(want: torch.Tensor, dtype: torch.dtype) -> float:
    """max |round(want, dtype) - want|: what returning ``want`` in ``dtype`` costs."""
    w = want.detach().double()
    return (w.to(dtype).double() - w).abs().max().item() if w.numel() else 0.0


def allowed_error(
    want: torch.Tensor, out_dtype, dtype, tol: float, terms: float | torch.Tensor = 0.0
) -> torch.Tensor:
    """The error accepted for each entry of the float64 ``want`` (module docstring): the result
    is returned in ``out_dtype``, ``dtype`` is the inputs', ``terms`` a number or a tensor of
    ``want``'s size."""
    w = want.detach().double().cpu()
    largest = w.abs().max().item() if w.numel() else 0.0
    if isinstance(terms, torch.Tensor):
        terms = terms.detach().double().cpu().reshape(w.shape)
    slack = ULPS * accumulation_eps(dtype) * torch.as_tensor(terms, dtype=F64)
    return rounding_error(w, out_dtype) + torch.clamp(slack, min=tol * largest).expand(w.shape)


def _compare(got, want, dtype, tol, terms):
    """(|got - want|, allowed, finite mask), or None when the shapes or the non-finite entries
    (NaN where NaN, Inf where Inf) differ."""
    g, w = got.detach().double().cpu(), want.detach().double().cpu()
    finite = torch.isfinite(w)
    if g.shape != w.shape or not torch.equal(torch.isfinite(g), finite):
        return None
    if not torch.equal(g[~finite].isnan(), w[~finite].isnan()):
        return None
    allowed = allowed_error(w.where(finite, 0.0), got.dtype, dtype, tol, terms)
    return (g - w).abs().where(finite, 0.0), allowed, finite


def error_ratio(
    got: torch.Tensor,
    want: torch.Tensor,
    dtype,
    tol: float,
    terms: float | torch.Tensor = 0.0,
) -> float:
    """max over entries of |got - want| / :func:`allowed_error`: the judgement as one number,
    passing when <= 1 (inf where shapes or non-finite entries differ; an entry allowed no error
    passes only when exact)."""
    cmp = _compare(got, want, dtype, tol, terms)
    if cmp is None:
        return float("inf")
    err, allowed, _ = cmp
    if not err.numel():
        return 0.0
    ratio = torch.where(err == 0, 0.0, err / allowed)  # 0/0 is a pass, x/0 is inf
    return ratio.max().item()


def assert_close(
    got: torch.Tensor,
    want: torch.Tensor,
    dtype,
    tol: float,
    terms: float | torch.Tensor = 0.0,
    what: str = "",
) -> None:
    """``got`` (any dtype, any device) matches the float64 ``want``: same shape, NaN and Inf
    where ``want`` has them, and every finite error within :func:`allowed_error`."""
    g, w = got.detach().double().cpu(), want.detach().double().cpu()
    assert g.shape == w.shape, f"{what}: shape {tuple(g.shape)} != {tuple(w.shape)}"
    cmp = _compare(got, want, dtype, tol, terms)
    assert cmp is not None, f"{what}: non-finite entries differ (NaN/Inf)"
    err, allowed, finite = cmp
    excess = (err - allowed).where(finite, -1.0)
    if excess.numel() and excess.max().item() > 0:
        i = int(excess.flatten().argmax())
        e, ok = err.flatten()[i].item(), allowed.flatten()[i].item()
        scale = w.where(finite, 0.0).abs().max().item()
        raise AssertionError(
            f"{what}: error {e:.3g} > allowed {ok:.3g} at flat index {i} (max|want| {scale:.3g})"
        )


# ------------------------------------------------------------------------------------ reference


def reference64(
    loss_fn: Callable,
    tensors: Sequence[torch.Tensor],
    requires_grad: Sequence[bool] | None = None,
    grad_out: float = 1.0,
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """The oracle: ``loss_fn(*float64 leaves)`` (a :mod:`fastkd.reference` call) and the
    gradient of each input times ``grad_out`` (None where ``requires_grad`` says no)."""
    flags = list(requires_grad) if requires_grad is not None else [True] * len(tensors)
    leaves = [t.detach().double().requires_grad_(r) for t, r in zip(tensors, flags, strict=True)]
    loss = loss_fn(*leaves)
    wanted = [x for x in leaves if x.requires_grad]
    upstream = torch.tensor(grad_out, dtype=F64, device=loss.device)
    grads = iter(torch.autograd.grad(loss, wanted, upstream) if wanted else ())
    return loss.detach(), [next(grads).detach() if r else None for r in flags]


# ------------------------------------------------------------------------------ the op's terms


def _normalized(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_i / max(|x_i|, eps), 1 / max(|x_i|, eps)) per row, float64."""
    x = x.double()
    inv = 1.0 / x.norm(dim=1, keepdim=True).clamp_min(reference.NORM_EPS)
    return x * inv, inv


def fkd_terms(
    student: torch.Tensor,
    teachers: Sequence[torch.Tensor],
    kd_weight: float,
    fr_weight: float,
    grad_out: float = 1.0,
) -> tuple[float, list[torch.Tensor]]:
    """Sizes of the terms of the FKD loss and of each gradient entry (SPEC §1), float64.

    ``student`` (B, D_S), ``teachers`` E tensors (B, D_e). d x_i = (G_i - (G_i . a_i) a_i) / |x_i|
    with G = (4 kd / B^2)(rho_S - rho_T) A (the student: A its normalised rows; teacher e: -1/E
    times that with its own rows): bounded with |rho_S| + |rho_T| in place of the difference,
    which is what cancels (to 0 at B = 1). Returns (value terms, [student (B, D_S), teacher
    (B, D_e)...]).
    """
    s, ts = student.double(), [t.double() for t in teachers]
    kd, fr = kd_weight, fr_weight
    b = s.shape[0]
    a, inv_s = _normalized(s)
    hats = [_normalized(t) for t in ts]
    k_abs = (a @ a.T).abs() + sum((h @ h.T).abs() for h, _ in hats) / len(ts)
    scale = abs(grad_out) * abs(kd) * 4.0 / b**2

    def side(rows, inv, share):
        g = share * scale * (k_abs @ rows.abs())
        along = (g * rows.abs()).sum(1, keepdim=True)
        return (g + along * rows.abs()) * inv

    grad_s = side(a, inv_s, 1.0) + abs(grad_out * fr) * 2.0 * s.abs() / s.numel()
    grad_ts = [side(h, inv, 1.0 / len(ts)) for h, inv in hats]
    value = abs(kd) * k_abs.square().mean().item() + abs(fr) * s.square().mean().item()
    return value, [grad_s, *grad_ts]


def sp_terms(
    student: torch.Tensor, teacher: torch.Tensor, grad_out: float = 1.0
) -> tuple[float, list[torch.Tensor]]:
    """Sizes of the terms of the SP loss and gradients (SPEC §2), float64, from the inputs.

    dL/dGhat_S = -2 (Ghat_T - Ghat_S) / B^2, bounded by U = 2 (|Ghat_T| + |Ghat_S|) / B^2; the
    row normalisation's backward (U_i - (U_i . Ghat_i) Ghat_i) / n_i and G = F F^T's
    (V + V^T) F are bounded term by term.
    """
    fs, ft = student.double().flatten(1), teacher.double().flatten(1)
    b = fs.shape[0]

    def gram(f):
        g = f @ f.T
        n = g.norm(dim=1, keepdim=True).clamp_min(reference.NORM_EPS)
        return g / n, n

    (gs, ns), (gt, nt) = gram(fs), gram(ft)
    u = 2.0 * (gs.abs() + gt.abs()) / b**2

    def side(f, gh, n):
        v = (u + (u * gh.abs()).sum(1, keepdim=True) * gh.abs()) / n
        return abs(grad_out) * ((v + v.T) @ f.abs())

    value = (gs.abs() + gt.abs()).square().mean().item()
    return value, [side(fs, gs, ns), side(ft, gt, nt)]


RKD_CLAMP = 1e-12  # the clamp of the squared distance (SPEC §2)


def rkd_terms(
    student: torch.Tensor, teacher: torch.Tensor, grad_out: float = 1.0, dtype=F64
) -> tuple[float, list[torch.Tensor]]:
    """Sizes of the terms of the RKD distance loss and gradients (SPEC §2), float64; ``dtype``
    is the inputs' (it sets the rounding of the distances in the value's bound).

    With x = d_S/mu_S - d_T/mu_T and a = d_S/mu_S + d_T/mu_T, the distances' rounding moves x by
    about eps a: the gradient's error comes through the slope min(a, 1) (not min(|x|, 1): x
    cancels to 0 at B = 2), the mean normalisation C = sum min(a, 1) d / (mu^2 B^2 P), and
    |f_i - f_j| / d_ij <= 1. The loss moves by min(|x|, 1) eps a + (eps a)^2 / 2 (the second
    order is all that is left at B = 2, where x = 0 and the loss 0 exactly).
    """
    fs, ft = student.double().flatten(1), teacher.double().flatten(1)
    b = fs.shape[0]
    off = ~torch.eye(b, dtype=torch.bool, device=fs.device)

    def dist(f):
        sq = f.square().sum(1)
        q = (sq[:, None] + sq[None, :]).sub_(f @ f.T, alpha=2.0).clamp_min_(RKD_CLAMP)
        d = q.sqrt().mul_(off)
        return d, d.sum() / (d > 0).sum(), (q > RKD_CLAMP) & off

    (d_s, mu_s, pass_s), (d_t, mu_t, pass_t) = dist(fs), dist(ft)
    a = (d_s / mu_s).add_(d_t / mu_t)  # zero on the diagonal
    slope = a.clamp_max(1.0)

    def side(f, d, mu, passes):
        c = (slope * d).sum() / (mu**2 * b**2 * off.sum())
        w = (slope / (mu * b**2) + c) * passes  # symmetric: the (i, j) and (j, i) terms
        return abs(grad_out) * 4.0 * w.sum(1, keepdim=True).expand(b, f.shape[1])

    x_abs = (d_s / mu_s - d_t / mu_t).abs()
    delta = ULPS * accumulation_eps(dtype) * a
    value = (x_abs.clamp_max(1.0) * a + delta * a / 2).mean().item()
    return value, [side(fs, d_s, mu_s, pass_s), side(ft, d_t, mu_t, pass_t)]


def srd_terms(
    student: torch.Tensor,
    teacher: torch.Tensor,
    p: float,
    eps: float = reference.SRD_EPS,
    training: bool = True,
    running: Sequence[torch.Tensor] | None = None,
    grad_out: float = 1.0,
) -> tuple[float, list]:
    """Sizes of the terms of the SRD loss and gradients (SPEC §3), float64, from the inputs;
    ``running`` (mean_s, var_s, mean_t, var_t) for eval mode.

    g = dL/ds = p |d|^(p-1) sign(d) / S. Training: dz = (g - mean_b g - s mean_b(g s)) rstd,
    which cancels to O(eps / var) of its terms at B = 2 (every column normalises to +-1), so
    it is bounded term by term; eval: dz = g rstd. The loss log S: its absolute error is the
    relative error of S, bounded by p |d|^(p-1) (|s| + |t|) + |d|^p over S. Identical inputs
    (S = 0) have no terms: their loss is log(tiny) and their gradient zero, exactly.
    """
    zs, zt = student.double(), teacher.double()
    if training:
        stats = [(z.mean(0), z.var(0, unbiased=False)) for z in (zs, zt)]
    else:
        rm_s, rv_s, rm_t, rv_t = (b.double() for b in running)
        stats = [(rm_s, rv_s), (rm_t, rv_t)]
    rstd = [(v + eps).rsqrt() for _, v in stats]
    s, t = ((z - m) * r for z, (m, _), r in zip((zs, zt), stats, rstd, strict=True))
    d = (s - t).abs()
    total = d.pow(p).sum()
    if total.item() == 0.0:
        return 0.0, [0.0, 0.0]
    g = p * d.pow(p - 1) / total
    value = ((g * (s.abs() + t.abs())).sum() + 1.0).item()

    def side(n, r):
        if not training:
            return g * r
        return (g + g.mean(0) + n.abs() * (g * n).abs().mean(0)) * r

    return value, [abs(grad_out) * side(s, rstd[0]), abs(grad_out) * side(t, rstd[1])]
