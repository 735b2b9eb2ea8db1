"""FKD in feature space (SPEC §1, "dual"): D x D Gram products instead of B x B kernels.

With A = normalize(fs) (B x Ds) and T the normalised teachers concatenated along columns and
scaled by 1/sqrt(E) (B x Dt), the loss needs S = ||A A^T - T T^T||_F^2 and its gradients
dS/dA = 4 X A, dS/dT = -4 X T with X = A A^T - T T^T (B x B, never formed).

**Three Grams** (SPEC §1; kept as :func:`three_grams`, the form to compare against)::

    S = ||A^T A||_F^2 - 2 ||A^T T||_F^2 + ||T^T T||_F^2
    dS/dA = 4 (A (A^T A) - T (T^T A)),   dS/dT = -4 (A (A^T T) - T (T^T T))

Each term is O(B^2) and they cancel down to S when the kernels agree: with unit roundoff u
the error of S is ~u B^2, so fp32 Grams lose everything at agreement 1e-3 and even float64
ones lose digits below 1e-5 (docs/dual.md).

**Sum and difference** (what this module computes, in float64 or fp32). Call the narrower of
A, T the matrix N (B x n) and the wider one W (B x w, w >= n); S is symmetric in the two, so
take X = N N^T - W W^T. Pair the first n columns::

    P = N + W_1,  Q = N - W_1   (W_1 = W[:, :n], B x n),   E = W[:, n:]   (B x (w - n))
    X = (P Q^T + Q P^T) / 2 - E E^T          (exact: N N^T - W_1 W_1^T = (P Q^T + Q P^T) / 2)
    S = (<P^T P, Q^T Q> + <Q^T P, P^T Q>) / 2 - 2 <E^T P, E^T Q> + ||E^T E||^2
    dS/dN   = P (Q^T P + Q^T Q) + Q (P^T P + P^T Q) - 2 E (E^T P + E^T Q)
    dS/dW_1 = P (Q^T Q - Q^T P) + Q (P^T Q - P^T P) + 2 E (E^T P - E^T Q)
    dS/dE   = -2 P (E^T Q)^T - 2 Q (E^T P)^T + 4 E (E^T E)

This is ``A A^T - T T^T = (P Q^T + Q P^T)/2`` for N padded with w - n zero columns, written
blockwise so the zero columns cost nothing: the six Grams cost 2B(3n^2 + 2n(w-n) + (w-n)^2)
flops, no more than the three Grams' 2B(3n^2 + 3n(w-n) + (w-n)^2). When the kernels agree,
Q and E are small, every Gram that carries them is small in proportion, and each term of S is
O(|Q|^2 + |E|^2): nothing large is subtracted, and S and the gradients keep ~u relative
accuracy. P, Q and E are formed in float64 from float64 normalisations and only then rounded
(rounding A and T first would already cost u of their difference); the O(D^2) sums of Gram
products are float64.

Q and E are small only if the features agree column by column. FKD compares kernels, and
features with equal kernels may differ by any rotation (a student and a teacher seldom share a
basis). So W may first be turned towards N by the orthogonal Procrustes rotation R (full SVD of
W^T N; :func:`procrustes`): W R R^T W^T = W W^T, so S and dS/dN do not change, while the pairing
residual becomes minimal. R is orthogonal to rounding only, so W R keeps W W^T to ~u absolute:
the relative error of S falls from ~u/d^2 to ~u/d for a kernel agreement d, while the gradient
stays at ~u/d, as with three Grams (a rotated basis cannot be stored closer than u). The turn
is taken only when it pays (a device-side ``where``), so features that already agree column by
column keep the exact pairing. It costs 2B w (n + w) flops and an SVD of w x w:
:data:`ALIGN` decides (default: for fp32 Grams only, where the three-Gram alternative fails).

Gram dtype (:func:`compute_dtype`): float64 for float64 inputs; else float64 where fp64 is
fast, fp32 elsewhere (:func:`dual_compute_dtype`, override :data:`COMPUTE_DTYPE`). fp32 GEMMs
run as IEEE fp32 on CUDA whatever torch's TF32 settings (:func:`ieee_fp32_matmul`). Accuracy
table and flop counts: docs/dual.md.
"""

from __future__ import annotations

import contextlib
import math
import re

import torch
from torch.autograd.function import once_differentiable

from fastkd.losses._common import save_optional, scaled_optional
from fastkd.reference import NORM_EPS, loss_dtype

# Override of the Gram dtype for float16/bfloat16/float32 inputs: None (choose from the device,
# :func:`dual_compute_dtype`), torch.float64 or torch.float32 (the Grams' dtype; the form is
# the sum-difference one either way). float64 inputs always use float64 (SPEC §6).
COMPUTE_DTYPE: torch.dtype | None = None

# Whether the wider side is turned towards the narrower (orthogonal Procrustes) before the
# columns are paired: None (default) for fp32 Grams only, True / False always / never. Without
# it, features that agree only up to a rotation cancel like three Grams of the same dtype.
ALIGN: bool | None = None

# CUDA compute capabilities whose fp64 rate is >= 1/4 of fp32 (data-centre parts): P100
# (sm_60), V100 / Titan V (sm_70), A100 / A30 (sm_80), H100 / H200 / GH200 (sm_90), B200 /
# GB200 (sm_100). Every other one runs fp64 at 1/32-1/64 (sm_61, sm_75, sm_86, sm_89, sm_120,
# Jetson parts) or far below 1/4 (B300, sm_103).
FAST_FP64_CAPABILITIES = frozenset({(6, 0), (7, 0), (8, 0), (9, 0), (10, 0)})
# Export variants of those chips with fp64 cut to ~1 TFLOP/s (H20, H800: 1/40-1/60 of fp32).
_SLOW_FP64_NAMES = re.compile(r"\b(H20|H800)\b", re.IGNORECASE)
# ROCm architectures with fp64 at >= 1/2 of fp32: MI100 (gfx908), MI200 (gfx90a), MI300 (gfx94x),
# MI350 (gfx950). Radeon (RDNA) parts run fp64 at 1/16-1/32.
_FAST_FP64_GFX = re.compile(r"^gfx(908|90a|94\d|950)\b")


def dual_compute_dtype(device: torch.device | str, props=None) -> torch.dtype:
    """Gram dtype of the dual algorithm on ``device``: float64 where fp64 is fast, else float32.

    float64 on the CPU (and ``meta``); on CUDA, float64 when the fp64:fp32 throughput ratio is
    >= 1/4, judged from ``props`` (``torch.cuda.get_device_properties(device)`` when None):
    compute capability in :data:`FAST_FP64_CAPABILITIES` and not an fp64-cut export variant
    (name H20/H800), or on ROCm an Instinct architecture (``gcnArchName`` gfx908/90a/94x/950).
    float32 everywhere else (consumer and L4/L40-class GPUs, MPS, which has no float64, XPU).
    A pure function of ``device`` and ``props``: tests pass fake props (any object with
    ``major``, ``minor``, ``name`` and optionally ``gcnArchName``).
    """
    device = torch.device(device)
    if device.type in ("cpu", "meta"):
        return torch.float64
    if device.type != "cuda":
        return torch.float32
    if props is None:
        props = torch.cuda.get_device_properties(device)
    arch = getattr(props, "gcnArchName", "") or ""
    if arch.startswith("gfx"):
        return torch.float64 if _FAST_FP64_GFX.match(arch) else torch.float32
    fast = (props.major, props.minor) in FAST_FP64_CAPABILITIES
    return torch.float64 if fast and not _SLOW_FP64_NAMES.search(props.name) else torch.float32


def _auto_compute_dtype(device: torch.device) -> torch.dtype:
    return dual_compute_dtype(device)


# torch.compile calls this eagerly and keeps the answer (see fastkd.registry.resolve_backend).
_auto_compute_dtype._dynamo_marked_constant = True


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Gram dtype for these inputs: float64 for float64 inputs, else :data:`COMPUTE_DTYPE` or
    :func:`dual_compute_dtype` of the first input's device."""
    if any(t.dtype == torch.float64 for t in tensors):
        return torch.float64
    if COMPUTE_DTYPE is not None:
        return COMPUTE_DTYPE
    return _auto_compute_dtype(tensors[0].device)


@contextlib.contextmanager
def ieee_fp32_matmul(device: torch.device):
    """Full-fp32 (IEEE, no TF32) cuBLAS GEMMs inside the block, whatever torch's global TF32
    settings; restores them after. It reads and restores ``fp32_precision`` (torch >= 2.9), which
    leaves a legacy ``allow_tf32`` setting readable; older torch has only ``allow_tf32``. The
    flag is process-wide. A no-op off CUDA."""
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    name, ieee = ("fp32_precision", "ieee")
    try:
        old = matmul.fp32_precision
    except AttributeError:
        name, ieee = ("allow_tf32", False)
        old = matmul.allow_tf32
    setattr(matmul, name, ieee)
    try:
        yield
    finally:
        setattr(matmul, name, old)


def normalize_rows(
    x: torch.Tensor, dtype: torch.dtype, scale: float = 1.0, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(scale * x_i / max(||x_i||, eps), 1 / max(||x_i||, eps), sum ||x_i||^2)`` in ``dtype``.

    Shapes (B, D), (B, 1) and (). ``out`` may be a (B, D) column slice of a wider buffer. The
    cast, the norms and the scaling are three passes over one (B, D) buffer (mixed-dtype
    torch ops would allocate a cast copy each).
    """
    a = x.to(dtype, copy=True) if out is None else out.copy_(x)
    norms = torch.linalg.vector_norm(a, dim=1, keepdim=True)
    inv_norm = norms.clamp_min(NORM_EPS).reciprocal_()
    a.mul_(inv_norm * scale if scale != 1.0 else inv_norm)
    return a, inv_norm, norms.square().sum()


def normalize_backward_(grad_a, a, inv_norm, out, scale_a=1.0, input_weight=0.0):
    """Chain rule of a = scale_a * normalize(x), in place on ``grad_a``, cast into ``out``:
    ``dx_i = (g_i - (g_i . â_i) â_i) / max(||x_i||, eps) + input_weight * x_i`` with
    â = a / scale_a. The input term uses x_i = â_i / inv_norm_i, so the whole epilogue is one
    row dot product and two in-place passes."""
    dot = torch.einsum("ij,ij->i", grad_a, a).unsqueeze(1)  # no (B, D) temporary
    coef = dot * inv_norm * (-1.0 / (scale_a * scale_a))
    if input_weight != 0.0:
        coef += input_weight / (scale_a * inv_norm)
    grad_a.mul_(inv_norm).addcmul_(a, coef)
    return out.copy_(grad_a)


def _teacher_matrix(teachers, dtype):
    """Normalised teachers side by side, scaled by 1/sqrt(E): (B, sum Dt_e), without a cat."""
    scale = 1.0 / math.sqrt(len(teachers))
    t = teachers[0].new_empty(
        (teachers[0].shape[0], sum(x.shape[1] for x in teachers)), dtype=dtype
    )
    inv, col = [], 0
    for te in teachers:
        _, inv_e, _ = normalize_rows(te, dtype, scale, out=t[:, col : col + te.shape[1]])
        inv.append(inv_e)
        col += te.shape[1]
    return t, inv


def three_grams(a, t, scale_a, scale_t, need_a, need_t):
    """S = ||A^T A||^2 - 2 ||A^T T||^2 + ||T^T T||^2 and ``scale_a * dS/dA``,
    ``scale_t * dS/dT`` (None unless needed), all in the dtype of a (B, Ds) and t (B, Dt).

    The scale factors go into the small D x D operands and the products accumulate in the GEMM
    (``addmm_``): each gradient is two GEMMs. Exact in exact arithmetic, but the terms cancel
    near agreement (module docstring); the tests and docs/dual.md compare against it."""
    gram_s, cross, gram_t = a.T @ a, a.T @ t, t.T @ t
    total = gram_s.square().sum() - 2.0 * cross.square().sum() + gram_t.square().sum()
    grad_a = grad_t = None
    if need_a:  # 4 (A (A^T A) - T (T^T A))
        grad_a = torch.mm(t, cross.T * (-4.0 * scale_a)).addmm_(a, gram_s * (4.0 * scale_a))
    if need_t:  # -4 (A (A^T T) - T (T^T T))
        grad_t = torch.mm(a, cross * (-4.0 * scale_t)).addmm_(t, gram_t * (4.0 * scale_t))
    return total, grad_a, grad_t


def _residual(narrow, wide):
    """||N - W_1||^2 + ||W_2||^2 (0-dim, in their dtype): how far the paired columns are apart."""
    n = narrow.shape[1]
    return (narrow - wide[:, :n]).square().sum() + wide[:, n:].square().sum()


def procrustes(narrow, wide, dtype=torch.float32):
    """Turn ``wide`` (B, w; float64) towards ``narrow`` (B, n <= w; float64) by an orthogonal
    R (w x w) computed and applied in ``dtype``: returns ``(W R, R - I)`` as (float64 (B, w),
    ``dtype`` (w, w)), or ``(W, 0)`` when turning does not pay (below).

    R = U [V^T, 0; 0, I] from the full SVD W^T N = U Sigma V^T maximises tr(N^T (W R)_1), so
    it minimises the residual r = ||N - (W R)_1||^2 + ||(W R)_2||^2 (r_0 unturned, r_1
    turned). After one Newton-Schulz step R is orthogonal to ``dtype`` rounding; W R =
    W + W (R - I) is summed in float64 with a ``dtype`` GEMM for the correction, and keeps
    W W^T to ~u ||W||^2 (u the unit roundoff). The Grams of Q cost ~u ||P||^2 r of S either
    way, the turn ~u ||W|| ||P|| sqrt(r_1) more, so W is turned only if
    r_1 + sqrt(||W||^2 r_1) < r_0: a device-side ``where``, no host sync. Features that
    already agree column by column (r_0 ~ r_1) keep the exact pairing. NaN/Inf in the inputs
    leave the residuals NaN, so W is kept and the NaN reaches the loss; they are zeroed in
    W^T N, which the SVD must not see."""
    n = narrow.shape[1]
    wide_c = wide.to(dtype)
    cross = torch.nan_to_num(wide_c.T @ narrow.to(dtype), nan=0.0, posinf=0.0, neginf=0.0)
    u, _, vh = torch.linalg.svd(cross)  # u (w, w), vh (n, n)
    rot = torch.cat((u[:, :n] @ vh, u[:, n:]), dim=1)
    # One Newton-Schulz step R (3I - R^T R) / 2: the SVD's factors are orthogonal to ~20u only
    # (measured, w = 32..512), one step brings R to the ~5u of a GEMM (4 w^3 flops).
    defect = rot.T @ rot
    defect.diagonal().sub_(1.0)
    rot = rot.addmm(rot, defect, alpha=-0.5)
    rot.diagonal().sub_(1.0)
    turned = wide + (wide_c @ rot).to(wide.dtype)
    r_1 = _residual(narrow, turned)
    better = r_1 + torch.sqrt(wide.square().sum() * r_1) < _residual(narrow, wide)
    return torch.where(better, turned, wide), rot * better


def _dot(x, y):
    """<x, y>_F in float64 (D x D operands: O(D^2), negligible)."""
    return torch.sum(x.double() * y.double())


def sum_difference(a, t, scale_a, scale_t, need_a, need_t, dtype=torch.float32, align=True):
    """S = ||A A^T - T T^T||_F^2 (0-dim float64) and ``scale_a * dS/dA``, ``scale_t * dS/dT``
    ((B, Ds), (B, Dt) in ``dtype``, or None) from ``dtype`` GEMMs without cancellation.

    a (B, Ds) and t (B, Dt) are the float64 normalised features. The narrower is N, the wider
    W; with ``align`` W is first turned towards N (:func:`procrustes`); then P = N + W_1,
    Q = N - W_1 and E = W_2 are formed in float64, rounded to ``dtype``, and S and the
    gradients are the six Grams' formulas of the module docstring. fp32 GEMMs are IEEE fp32
    (:func:`ieee_fp32_matmul`)."""
    swap = a.shape[1] > t.shape[1]
    narrow, wide = (t, a) if swap else (a, t)
    scale_n, scale_w = (scale_t, scale_a) if swap else (scale_a, scale_t)
    need_n, need_w = (need_t, need_a) if swap else (need_a, need_t)
    n = narrow.shape[1]
    with ieee_fp32_matmul(a.device):
        rot = None
        if align:
            wide, rot = procrustes(narrow, wide, dtype)
        p = (narrow + wide[:, :n]).to(dtype)
        q = (narrow - wide[:, :n]).to(dtype)
        e = wide[:, n:].to(dtype)
        gpp, gqq, gqp = p.T @ p, q.T @ q, q.T @ p
        gep, geq, gee = e.T @ p, e.T @ q, e.T @ e
        total = 0.5 * (_dot(gpp, gqq) + _dot(gqp, gqp.T)) - 2.0 * _dot(gep, geq) + _dot(gee, gee)
        grad_n = grad_w = None
        if need_n:
            s = scale_n
            grad_n = torch.mm(p, (gqp + gqq) * s)
            grad_n.addmm_(q, (gpp + gqp.T) * s).addmm_(e, (gep + geq) * (-2.0 * s))
        if need_w:
            s = scale_w
            paired = torch.mm(p, (gqq - gqp) * s)
            paired.addmm_(q, (gqp.T - gpp) * s).addmm_(e, (gep - geq) * (2.0 * s))
            extra = torch.mm(e, gee * (4.0 * s))
            extra.addmm_(p, geq.T * (-2.0 * s)).addmm_(q, gep.T * (-2.0 * s))
            grad_w = torch.cat((paired, extra), dim=1)
            if rot is not None:  # d/dW of S(N, W R) = (dS/d(W R)) R^T, R = I + rot
                grad_w = torch.addmm(grad_w, grad_w, rot.T)
    return (total, grad_w, grad_n) if swap else (total, grad_n, grad_w)


class FKDDualFunction(torch.autograd.Function):
    """Autograd Function of the feature-space FKD loss.

    ``apply(kd_weight, fr_weight, student, *teachers)`` with student (B, Ds) and teachers
    (B, Dt_e), any floating dtype; returns the 0-dim loss in float32 (float64 for float64
    inputs), gradients in each input's dtype. The Grams are the sum-difference form in float64
    or fp32 (:func:`compute_dtype`); the normalisations and their chain rule are float64
    (O(B D)). Once the Grams exist the gradients cost two or three more B x D x D products,
    so the forward pass computes them for the inputs that require grad and the backward pass
    only scales them (no second normalisation of the inputs).
    """

    @staticmethod
    def forward(ctx, kd_weight: float, fr_weight: float, student, *teachers):
        out_dtype = loss_dtype(student, *teachers)
        dtype = compute_dtype(student, *teachers)
        b, ds = student.shape
        needs = ctx.needs_input_grad[2:]
        a, inv_s, student_sq = normalize_rows(student, torch.float64)
        t, inv_t = _teacher_matrix(teachers, torch.float64)
        root = math.sqrt(len(teachers))
        # dL/dA = kd/B^2 dS/dA; dL/d(normalised teacher) = dL/dT / sqrt(E) (T = [T_e] / sqrt(E))
        scale_a, scale_t = kd_weight / (b * b), kd_weight / (b * b * root)
        align = dtype != torch.float64 if ALIGN is None else ALIGN
        total, grad_a, grad_t = sum_difference(
            a, t, scale_a, scale_t, needs[0], any(needs[1:]), dtype, align
        )
        loss = kd_weight * total.clamp_min(0.0) / (b * b)
        if fr_weight != 0.0:
            loss = loss + fr_weight * student_sq / (b * ds)
        grads = [None] * (1 + len(teachers))
        if needs[0]:
            grads[0] = normalize_backward_(
                grad_a.to(torch.float64),
                a,
                inv_s,
                torch.empty_like(student),
                input_weight=fr_weight * 2.0 / (b * ds),
            )
        if grad_t is not None:
            grad_t = grad_t.to(torch.float64)
            col = 0
            for e, te in enumerate(teachers):
                cols = slice(col, col + te.shape[1])
                if needs[1 + e]:
                    grads[1 + e] = normalize_backward_(
                        grad_t[:, cols], t[:, cols], inv_t[e], torch.empty_like(te), 1.0 / root
                    )
                col += te.shape[1]
        save_optional(ctx, grads)
        return loss.to(out_dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        return None, None, *scaled_optional(ctx, grad)
