"""fastkd's fused losses as torchdistill (1.1.x) mid-level losses.

Importing this module registers, under namespaced keys that never replace torchdistill's own:

===========================  ==========================================================
key                          fastkd class (torchdistill counterpart)
===========================  ==========================================================
``fastkd.FKDLoss``           :class:`FKDLoss`, feature kernel distillation (none)
``fastkd.SPKDLoss``          :class:`SPKDLoss`, similarity preserving (``SPKDLoss``)
``fastkd.RKDLoss``           :class:`RKDLoss`, RKD distance + angle (``RKDLoss``)
``fastkd.SRDLoss``           :class:`SRDLoss`, SRD batch norm + LogSum + KL (``SRDLoss``)
``fastkd.SRDModelWrapper``   :class:`SRDModelWrapper`, pooling + projector, no batch norm
===========================  ==========================================================

A YAML config switches to them with its top-level ``dependencies`` entry and the ``key``::

    dependencies:
      - name: 'fastkd.integrations.torchdistill'
    ...
          criterion:
            key: 'fastkd.SPKDLoss'      # was 'SPKDLoss'

Each loss is built as ``Cls(**kwargs)`` from the config and called as
``forward(student_io_dict, teacher_io_dict, *args, **kwargs)`` with
``io_dict[module_path]['input' | 'output']`` filled by the config's ``forward_hook`` lists. Every
loss takes torchdistill's keyword arguments plus ``backend`` (``"auto"`` | ``"cpu"`` | ``"cuda"``
| ``"triton"`` | ``"reference"``; None reads ``$FASTKD_BACKEND``) and, where fastkd has one,
``algorithm``; ``global_batch`` / ``process_group`` are passed to the fastkd loss when this
fastkd's loss accepts them (torch.distributed global-batch losses) and are an error otherwise.
Features with more than two dimensions are flattened to (B, -1) as torchdistill does (SRD:
averaged over the trailing dimensions as torchdistill's ``SRDModelWrapper`` does).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

import fastkd

try:
    from torchdistill.losses.registry import MIDDLE_LEVEL_LOSS_DICT, register_mid_level_loss
    from torchdistill.models.registry import (
        AUXILIARY_MODEL_WRAPPER_DICT,
        register_auxiliary_model_wrapper,
    )
    from torchdistill.models.util import wrap_if_distributed
    from torchdistill.models.wrapper import AuxiliaryModelWrapper
except ImportError as err:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "fastkd.integrations.torchdistill needs torchdistill 1.1.x: "
        f"pip install fastkd[torchdistill] (import failed: {err})"
    ) from err

NORM_EPS = 1e-12  # F.normalize's eps, as torchdistill's SPKD/RKD losses use it
SRD_BN_EPS = 1e-4  # torchdistill's SRD configs: BatchNorm1d(eps=0.0001, affine=False)
ANGLE_BLOCK_ELEMENTS = 1 << 22  # anchors per RKD angle block: k * B^2 <= this (32 MiB in fp64)

__all__ = [
    "FKDLoss",
    "RKDLoss",
    "SPKDLoss",
    "SRDLoss",
    "SRDModelWrapper",
    "rkd_angle_loss",
    "sp_loss_l1_rows",
]


# ----------------------------------------------------------------------------- io_dict access


def _io(io_dict: Mapping, path: str, io: str, side: str) -> torch.Tensor:
    """``io_dict[path][io]`` with an error that says which forward hook is missing."""
    if path not in io_dict:
        raise KeyError(
            f"{side} io_dict has no module path {path!r} (hooked: {sorted(io_dict)}): add it to "
            f"the {side}'s forward_hook '{io}' list"
        )
    entry = io_dict[path]
    if io not in entry:
        raise KeyError(
            f"{side} io_dict[{path!r}] has no {io!r} (has {sorted(entry)}): add {path!r} to the "
            f"{side}'s forward_hook '{io}' list"
        )
    value = entry[io]
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"{side} io_dict[{path!r}][{io!r}] must be a tensor, got {type(value).__name__}"
        )
    return value


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B, D), as torchdistill's relational losses flatten."""
    return x.flatten(1) if x.dim() > 2 else x


def _pooled(x: torch.Tensor) -> torch.Tensor:
    """(B, C, ...) -> (B, C) by averaging the trailing dims, as torchdistill's SRDModelWrapper."""
    while x.dim() > 2:
        x = x.mean(-1)
    return x


def _collective_kwargs(fn, global_batch: bool, process_group, what: str) -> dict:
    """``global_batch``/``process_group`` for ``fn`` if requested and accepted, else an error."""
    if not global_batch and process_group is None:
        return {}
    params = inspect.signature(fn).parameters
    if "global_batch" not in params:
        raise NotImplementedError(
            f"{what}: this fastkd's {getattr(fn, '__qualname__', fn)} has no global_batch= "
            "argument (global-batch losses under torch.distributed are not installed)"
        )
    kwargs = {"global_batch": bool(global_batch)}
    if process_group is not None:
        kwargs["process_group"] = process_group
    return kwargs


def _check_reduction(reduction: str, allowed: tuple[str, ...], what: str) -> str:
    if reduction not in allowed:
        raise ValueError(f"{what}: reduction must be one of {allowed}, got {reduction!r}")
    return reduction


# ----------------------------------------------------------------------------- FKD


class FKDLoss(nn.Module):
    """Feature kernel distillation (:func:`fastkd.fkd_loss`) as a torchdistill mid-level loss.

    ``loss = kd_weight * mean_ij (rho_S - rho_T)_ij^2 + fr_weight * mean(fs^2)`` with
    ``rho = normalize(f) normalize(f)^T`` and rho_T averaged over the teachers.

    Args:
        student_output_path: student module path; its (B, ...) tensor is flattened to (B, Ds).
        teacher_output_path: teacher module path, or a list of paths (an ensemble: one kernel per
            path, averaged); each (B, ...) tensor is flattened to (B, Dt_e). Widths may differ.
        kd_weight, fr_weight: weights of the kernel term and the feature regulariser.
        student_module_io, teacher_module_io: ``'output'`` (default) or ``'input'`` of the modules
            (e.g. ``'fc'`` with ``'input'`` gives ResNets' pooled penultimate features).
        backend, algorithm: as in :func:`fastkd.fkd_loss`.
        global_batch, process_group: passed to :func:`fastkd.fkd_loss` when it accepts them.
    """

    def __init__(
        self,
        student_output_path: str,
        teacher_output_path: str | Sequence[str],
        kd_weight: float = 1.0,
        fr_weight: float = 0.0,
        student_module_io: str = "output",
        teacher_module_io: str = "output",
        backend: str | None = None,
        algorithm: str = "auto",
        global_batch: bool = False,
        process_group=None,
        **kwargs,
    ):
        super().__init__()
        self.student_output_path = student_output_path
        if isinstance(teacher_output_path, str):
            self.teacher_output_paths = [teacher_output_path]
            self.ensemble = False
        else:
            self.teacher_output_paths = list(teacher_output_path)
            self.ensemble = True
            if not self.teacher_output_paths:
                raise ValueError("teacher_output_path: the list of teacher paths is empty")
        self.student_module_io = student_module_io
        self.teacher_module_io = teacher_module_io
        # Validates the weights and the algorithm name now, not at the first step.
        self.fkd = fastkd.FKDLoss(kd_weight, fr_weight, backend=backend, algorithm=algorithm)
        self.collective = _collective_kwargs(
            fastkd.fkd_loss, global_batch, process_group, "fastkd.FKDLoss"
        )

    def forward(self, student_io_dict, teacher_io_dict, *args, **kwargs):
        student = _flat(
            _io(student_io_dict, self.student_output_path, self.student_module_io, "student")
        )
        teachers = [
            _flat(_io(teacher_io_dict, path, self.teacher_module_io, "teacher"))
            for path in self.teacher_output_paths
        ]
        return fastkd.fkd_loss(
            student,
            teachers if self.ensemble else teachers[0],
            self.fkd.kd_weight,
            self.fkd.fr_weight,
            backend=self.fkd.backend,
            algorithm=self.fkd.algorithm,
            **self.collective,
        )

    def extra_repr(self) -> str:
        return (
            f"student={self.student_output_path!r}, teachers={self.teacher_output_paths!r}, "
            f"{self.fkd.extra_repr()}"
        )


# ----------------------------------------------------------------------------- SP


def sp_loss_l1_rows(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """SP with torchdistill 1.1.x's row normalisation: ``F.normalize(G, 1)``, i.e. p = 1.

    student (B, ...), teacher (B, ...) are flattened to (B, D); ``G = F F^T``, each row divided
    by ``max(sum_j |G_ij|, 1e-12)``; returns ``(1/B^2) sum (G_T - G_S)^2`` (0-dim, float32, or
    float64 if an input is float64). Eager PyTorch with two B x B matrices: fastkd's fused and
    dual SP compute the paper's L2 rows, which this convention does not share.
    """
    for name, x in (("student", student), ("teacher", teacher)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{name} must be a floating torch.Tensor")
        if x.dim() < 2 or x.shape[0] < 2 or x.numel() == 0:
            raise ValueError(f"{name} must be (B, ...) with B >= 2, got {tuple(x.shape)}")
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"teacher has batch size {teacher.shape[0]} but student has {student.shape[0]}"
        )
    dtype = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
    fs = student.flatten(1).to(dtype)
    ft = teacher.flatten(1).to(dtype)
    gs = F.normalize(fs @ fs.T, p=1.0, dim=1, eps=NORM_EPS)
    gt = F.normalize(ft @ ft.T, p=1.0, dim=1, eps=NORM_EPS)
    b = fs.shape[0]
    return (gt - gs).square().sum() / (b * b)


SP_ROW_NORMS = ("l2", "torchdistill")


class SPKDLoss(nn.Module):
    """Similarity-preserving KD (Tung & Mori 2019) as a torchdistill mid-level loss.

    ``G = F F^T`` of the flattened (B, D) features, rows normalised, ``sum (G_T - G_S)^2`` divided
    by B^2 (``reduction='batchmean'``) or not (``'sum'``).

    Args:
        student_output_path, teacher_output_path, reduction: as torchdistill's ``SPKDLoss``
            (torchdistill returns the plain sum for any reduction other than 'batchmean'; this
            class accepts 'batchmean' and 'sum' only).
        row_norm: ``'l2'`` (default): the paper's and RepDistiller's L2 rows, computed by
            :func:`fastkd.sp_loss` (``algorithm`` as there: ``'dual'`` needs no B x B matrix).
            ``'torchdistill'``: torchdistill 1.1.x's ``F.normalize(G, 1)`` (p = 1 rows), which
            reproduces its value exactly (eager, :func:`sp_loss_l1_rows`).
        student_module_io, teacher_module_io: ``'output'`` (default) or ``'input'``.
        backend, algorithm, global_batch, process_group: as in :func:`fastkd.sp_loss` (row_norm
            'l2' only).
    """

    def __init__(
        self,
        student_output_path: str,
        teacher_output_path: str,
        reduction: str = "batchmean",
        row_norm: str = "l2",
        student_module_io: str = "output",
        teacher_module_io: str = "output",
        backend: str | None = None,
        algorithm: str = "auto",
        global_batch: bool = False,
        process_group=None,
        **kwargs,
    ):
        super().__init__()
        self.student_output_path = student_output_path
        self.teacher_output_path = teacher_output_path
        self.reduction = _check_reduction(reduction, ("batchmean", "sum"), "fastkd.SPKDLoss")
        if row_norm not in SP_ROW_NORMS:
            raise ValueError(f"row_norm must be one of {SP_ROW_NORMS}, got {row_norm!r}")
        self.row_norm = row_norm
        self.student_module_io = student_module_io
        self.teacher_module_io = teacher_module_io
        self.sp = fastkd.SPLoss(backend=backend, algorithm=algorithm)
        self.collective = _collective_kwargs(
            fastkd.sp_loss, global_batch, process_group, "fastkd.SPKDLoss"
        )
        if self.collective and row_norm != "l2":
            raise NotImplementedError("fastkd.SPKDLoss: global_batch needs row_norm='l2'")

    def forward(self, student_io_dict, teacher_io_dict, *args, **kwargs):
        student = _io(student_io_dict, self.student_output_path, self.student_module_io, "student")
        teacher = _io(teacher_io_dict, self.teacher_output_path, self.teacher_module_io, "teacher")
        if self.row_norm == "torchdistill":
            loss = sp_loss_l1_rows(student, teacher)
            batch = student.shape[0]
        else:
            loss = fastkd.sp_loss(
                student,
                teacher,
                backend=self.sp.backend,
                algorithm=self.sp.algorithm,
                **self.collective,
            )
            batch = _global_rows(student, self.collective)
        return loss if self.reduction == "batchmean" else loss * (batch * batch)

    def extra_repr(self) -> str:
        return (
            f"student={self.student_output_path!r}, teacher={self.teacher_output_path!r}, "
            f"reduction={self.reduction!r}, row_norm={self.row_norm!r}, "
            f"backend={self.sp.backend!r}, algorithm={self.sp.algorithm!r}"
        )


def _global_rows(x: torch.Tensor, collective: dict) -> int:
    """B of the loss: the local rows, or the sum over ranks under global_batch."""
    if not collective.get("global_batch"):
        return x.shape[0]
    import torch.distributed as dist  # only reached when the distributed losses exist

    rows = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    dist.all_reduce(rows, group=collective.get("process_group"))
    return int(rows.item())


# ----------------------------------------------------------------------------- RKD


def _angle_block(gram: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Cosines of RKD's angle term for anchors a in [start, stop): (k, B, B).

    ``out[a, b, c] = <e_ab, e_ac>`` with ``e_ab = normalize(f_b - f_a)``, from the Gram matrix
    alone: ``<f_b - f_a, f_c - f_a> = G_bc - G_ab - G_ac + G_aa`` and
    ``|f_b - f_a|^2 = G_bb - 2 G_ab + G_aa``. ``b == a`` is the zero vector, which F.normalize
    maps to zero, so its row and column are 0.
    """
    rows = gram[start:stop]  # (k, B): G_ab
    diag = gram.diagonal()
    anchor_diag = diag[start:stop]  # G_aa
    anchors = torch.arange(start, stop, device=gram.device)
    cols = torch.arange(gram.shape[0], device=gram.device)
    is_anchor = cols[None, :] == anchors[:, None]
    dist_sq = diag[None, :] - 2.0 * rows + anchor_diag[:, None]
    # clamp: sqrt(max(d2, eps^2)) = max(|e|, eps) as F.normalize, and a finite derivative at 0
    norm = dist_sq.clamp_min(NORM_EPS * NORM_EPS).sqrt()
    inv = torch.where(is_anchor, torch.zeros_like(norm), 1.0 / norm)
    dots = gram[None] - rows[:, :, None] - rows[:, None, :] + anchor_diag[:, None, None]
    return dots * inv[:, :, None] * inv[:, None, :]


def _angle_blocks(batch: int, block: int | None):
    step = block if block is not None else max(1, ANGLE_BLOCK_ELEMENTS // (batch * batch))
    for start in range(0, batch, step):
        yield start, min(start + step, batch)


def _centred_gram(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # The angles are translation invariant; centring keeps G_bb - 2 G_ab + G_aa from cancelling.
    centred = x - x.mean(0, keepdim=True)
    return centred, centred @ centred.T


class _RKDAngleFunction(torch.autograd.Function):
    """Sum over a, b, c of smooth_l1(angle_S, angle_T) (beta 1) in blocks of anchors.

    Forward and backward each hold one (k, B, B) block at a time; backward recomputes the blocks
    and accumulates dL/dG (B x B), then dL/dF = (dL/dG + dL/dG^T) F. The teacher gets no gradient
    (torchdistill computes its angles under no_grad).
    """

    @staticmethod
    def forward(ctx, student, teacher, block):
        dtype = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
        fs, gs = _centred_gram(student.detach().flatten(1).to(dtype))
        _, gt = _centred_gram(teacher.detach().flatten(1).to(dtype))
        total = gs.new_zeros(())
        for start, stop in _angle_blocks(gs.shape[0], block):
            total += F.smooth_l1_loss(
                _angle_block(gs, start, stop),
                _angle_block(gt, start, stop),
                reduction="sum",
                beta=1.0,
            )
        ctx.block = block
        ctx.student_meta = (student.shape, student.dtype)
        ctx.save_for_backward(fs, gs, gt)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        fs, gs, gt = ctx.saved_tensors
        grad_gram = torch.zeros_like(gs)
        with torch.enable_grad():
            for start, stop in _angle_blocks(gs.shape[0], ctx.block):
                gram = gs.detach().requires_grad_(True)
                part = F.smooth_l1_loss(
                    _angle_block(gram, start, stop),
                    _angle_block(gt, start, stop),
                    reduction="sum",
                    beta=1.0,
                )
                grad_gram += torch.autograd.grad(part, gram)[0]
        grad_fs = (grad_gram + grad_gram.T) @ fs
        grad_fs = grad_fs - grad_fs.mean(0, keepdim=True)  # back through the centring
        shape, dtype = ctx.student_meta
        return (grad_fs * grad.to(grad_fs.dtype)).to(dtype).reshape(shape), None, None


def rkd_angle_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    reduction: str = "mean",
    *,
    block: int | None = None,
) -> torch.Tensor:
    """RKD angle loss (Park et al. 2019) in torchdistill's convention, O(B^2) memory.

    student (B, ...), teacher (B, ...) flattened to (B, D). For every anchor a,
    ``angle[a, b, c] = <normalize(f_b - f_a), normalize(f_c - f_a)>`` (F.normalize, eps 1e-12);
    the loss is ``smooth_l1(angle_S, angle_T)`` (beta 1) over the B^3 triples, averaged
    (``'mean'``) or summed (``'sum'``). torchdistill builds (B, B, D) difference tensors; here
    the cosines come from the Gram matrix of the centred features, ``O(B^2 D + B^3)`` time and
    O(B^2 + block * B^2) memory (``block`` anchors at a time, default so that a block holds
    about 4M elements). The teacher gets no gradient. Returns a 0-dim tensor, float32 (float64
    if an input is float64).
    """
    _check_reduction(reduction, ("mean", "sum"), "rkd_angle_loss")
    for name, x in (("student", student), ("teacher", teacher)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{name} must be a floating torch.Tensor")
        if x.dim() < 2 or x.shape[0] < 2 or x.numel() == 0:
            raise ValueError(f"{name} must be (B, ...) with B >= 2, got {tuple(x.shape)}")
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"teacher has batch size {teacher.shape[0]} but student has {student.shape[0]}"
        )
    if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
        raise ValueError(f"block must be a positive int or None, got {block!r}")
    total = _RKDAngleFunction.apply(student, teacher, block)
    b = student.shape[0]
    return total / (b**3) if reduction == "mean" else total


class RKDLoss(nn.Module):
    """Relational KD (Park et al. 2019) as a torchdistill mid-level loss.

    ``dist_factor * distance + angle_factor * angle`` on the flattened (B, D) features, the
    teacher side without gradient, as torchdistill's ``RKDLoss``. The distance term is fastkd's
    fused :func:`fastkd.rkd_distance_loss` (O(B D) memory on the cpu/cuda/triton backends); the
    angle term is :func:`rkd_angle_loss` (eager PyTorch through Gram matrices, O(B^2) memory
    instead of torchdistill's (B, B, D) tensors). A factor of None or 0 drops its term.

    Args:
        student_output_path, teacher_output_path, dist_factor, angle_factor, reduction: as
            torchdistill's ``RKDLoss`` (reduction of the smooth-L1 terms: 'mean' or 'sum').
        student_module_io, teacher_module_io: ``'output'`` (default) or ``'input'``.
        backend: of the distance term, as in :func:`fastkd.rkd_distance_loss`.
        angle_block: anchors per block of the angle term (None: automatic).
        global_batch, process_group: passed to the distance term when it accepts them (the
            angle term has no global-batch form: use angle_factor 0 with global_batch).
    """

    def __init__(
        self,
        student_output_path: str,
        teacher_output_path: str,
        dist_factor: float | None = 1.0,
        angle_factor: float | None = 2.0,
        reduction: str = "mean",
        student_module_io: str = "output",
        teacher_module_io: str = "output",
        backend: str | None = None,
        angle_block: int | None = None,
        global_batch: bool = False,
        process_group=None,
        **kwargs,
    ):
        super().__init__()
        self.student_output_path = student_output_path
        self.teacher_output_path = teacher_output_path
        self.dist_factor = dist_factor
        self.angle_factor = angle_factor
        self.reduction = _check_reduction(reduction, ("mean", "sum"), "fastkd.RKDLoss")
        self.student_module_io = student_module_io
        self.teacher_module_io = teacher_module_io
        self.backend = backend
        self.angle_block = angle_block
        self.collective = _collective_kwargs(
            fastkd.rkd_distance_loss, global_batch, process_group, "fastkd.RKDLoss"
        )
        if self.collective and self.angle_factor:
            raise NotImplementedError(
                "fastkd.RKDLoss: the angle term has no global-batch form; set angle_factor: 0"
            )

    def forward(self, student_io_dict, teacher_io_dict, *args, **kwargs):
        student = _flat(
            _io(student_io_dict, self.student_output_path, self.student_module_io, "student")
        )
        teacher = _flat(
            _io(teacher_io_dict, self.teacher_output_path, self.teacher_module_io, "teacher")
        ).detach()
        loss = 0
        if self.dist_factor:
            dist = fastkd.rkd_distance_loss(
                student, teacher, backend=self.backend, **self.collective
            )
            if self.reduction == "sum":
                rows = _global_rows(student, self.collective)
                dist = dist * (rows * rows)
            loss = loss + self.dist_factor * dist
        if self.angle_factor:
            angle = rkd_angle_loss(student, teacher, self.reduction, block=self.angle_block)
            loss = loss + self.angle_factor * angle
        return loss

    def extra_repr(self) -> str:
        return (
            f"student={self.student_output_path!r}, teacher={self.teacher_output_path!r}, "
            f"dist_factor={self.dist_factor}, angle_factor={self.angle_factor}, "
            f"reduction={self.reduction!r}, backend={self.backend!r}"
        )


# ----------------------------------------------------------------------------- SRD


class SRDLoss(nn.Module):
    """SRD (Miles & Mikolajczyk 2024) as a torchdistill mid-level loss, batch norm included.

    ``loss = feat_factor * log(sum |s - t|^p) + KL(softmax(t_logits/T) || softmax(s_logits/T))``
    where s and t are the student's and teacher's features batch-normalised (no affine, eps
    1e-4, each side its own statistics) by :class:`fastkd.SRDLoss`, fused with the LogSum. Point
    the feature paths at the batch norm's *input* (the projector output): the running statistics
    live in this loss, so the models need no norm layer (:class:`SRDModelWrapper`, or the
    ``norm_layer`` input of torchdistill's ``SRDModelWrapper``). Features of more than two
    dimensions are averaged over the trailing ones, as torchdistill's wrapper pools.

    With the defaults (feat_factor 2) the value equals torchdistill's ``SRDLoss``, which computes
    ``2 * log(sum |s - t|^p) + KL`` on its norm layers' outputs, given the same batch-norm
    statistics: the batch's in train mode, the same running ones in eval mode (``.eval()``).
    fastkd's own ``srd_loss`` is the LogSum alone, without the 2.

    Args:
        student_feature_module_path, student_feature_module_io,
        teacher_feature_module_path, teacher_feature_module_io: the (B, D) features (BN inputs).
        student_linear_module_path, student_linear_module_io,
        teacher_linear_module_path, teacher_linear_module_io: the logits of the KL term (path
            '.' is the model's output); None for the student path drops the KL term.
        exponent: p >= 1 (torchdistill's default 1; its configs and the paper use 4).
        temperature, reduction: of the KL term (``nn.KLDivLoss(reduction=...)``), as torchdistill.
        feat_factor: weight of the LogSum (torchdistill's 2).
        eps, momentum: of the batch norm (1e-4, 0.1).
        num_features: D, to create the running statistics now; None creates them at the first
            call. They move to the features' device when it differs.
        backend: as in :func:`fastkd.srd_loss`.
        global_batch, process_group: passed to :class:`fastkd.SRDLoss` when it accepts them
            (global batch statistics, like nn.SyncBatchNorm).
    """

    def __init__(
        self,
        student_feature_module_path: str,
        student_feature_module_io: str,
        teacher_feature_module_path: str,
        teacher_feature_module_io: str,
        student_linear_module_path: str | None,
        student_linear_module_io: str,
        teacher_linear_module_path: str | None,
        teacher_linear_module_io: str,
        exponent: float = 1.0,
        temperature: float = 1.0,
        reduction: str = "batchmean",
        feat_factor: float = 2.0,
        eps: float = SRD_BN_EPS,
        momentum: float | None = 0.1,
        num_features: int | None = None,
        backend: str | None = None,
        global_batch: bool = False,
        process_group=None,
        **kwargs,
    ):
        super().__init__()
        self.student_feature = (student_feature_module_path, student_feature_module_io)
        self.teacher_feature = (teacher_feature_module_path, teacher_feature_module_io)
        self.student_logits = (student_linear_module_path, student_linear_module_io)
        self.teacher_logits = (teacher_linear_module_path, teacher_linear_module_io)
        self.exponent = float(exponent)
        self.temperature = float(temperature)
        self.feat_factor = float(feat_factor)
        self.criterion = nn.KLDivLoss(reduction=reduction)
        self.srd_kwargs = {"p": self.exponent, "eps": eps, "momentum": momentum}
        self.backend = backend
        self.collective = _collective_kwargs(
            fastkd.SRDLoss.__init__, global_batch, process_group, "fastkd.SRDLoss"
        )
        self.srd = None if num_features is None else self._make_srd(num_features, None, None)

    def _make_srd(self, width, device, dtype) -> fastkd.SRDLoss:
        return fastkd.SRDLoss(
            width,
            width,
            projector=False,
            backend=self.backend,
            device=device,
            dtype=dtype,
            **self.srd_kwargs,
            **self.collective,
        )

    def forward(self, student_io_dict, teacher_io_dict, *args, **kwargs):
        zs = _pooled(_io(student_io_dict, *self.student_feature, "student"))
        zt = _pooled(_io(teacher_io_dict, *self.teacher_feature, "teacher"))
        if self.srd is None:
            stats_dtype = torch.float64 if zs.dtype == torch.float64 else torch.float32
            self.srd = self._make_srd(zs.shape[1], zs.device, stats_dtype)
            self.srd.train(self.training)
        elif self.srd.running_mean_s is not None and self.srd.running_mean_s.device != zs.device:
            self.srd.to(zs.device)  # torchdistill builds criteria on the CPU
        loss = self.feat_factor * self.srd(zs, zt)
        if self.student_logits[0] is not None:
            s_logits = _io(student_io_dict, *self.student_logits, "student")
            t_logits = _io(teacher_io_dict, *self.teacher_logits, "teacher")
            loss = loss + self.criterion(
                torch.log_softmax(s_logits / self.temperature, dim=1),
                torch.softmax(t_logits / self.temperature, dim=1),
            )
        return loss

    def extra_repr(self) -> str:
        return (
            f"student={self.student_feature!r}, teacher={self.teacher_feature!r}, "
            f"exponent={self.exponent}, temperature={self.temperature}, "
            f"feat_factor={self.feat_factor}, backend={self.backend!r}"
        )


class SRDModelWrapper(AuxiliaryModelWrapper):
    """Auxiliary model wrapper for :class:`SRDLoss`: pooling and projector, no batch norm.

    Like torchdistill's ``SRDModelWrapper`` without its ``norm_layer``: ``secondary_forward``
    averages ``io_dict[input_module['path']][input_module['io']]`` over its trailing dims to
    (B, C) and runs ``projector`` on it: ``nn.Linear(**linear_kwargs)`` (the student's trainable
    projector) or ``nn.Identity()`` (the teacher). Hook ``'projector'`` output on both sides and
    give those paths to ``fastkd.SRDLoss``; also hook the input module so that its tensor is in
    the io_dict.
    """

    def __init__(
        self,
        input_module: Mapping,
        device,
        device_ids,
        distributed,
        linear_kwargs: Mapping | None = None,
        teacher_model=None,
        student_model=None,
        find_unused_parameters=None,
        norm_kwargs=None,
        **kwargs,
    ):
        super().__init__()
        if norm_kwargs is not None:
            raise ValueError(
                "fastkd.SRDModelWrapper has no norm layer (fastkd.SRDLoss owns the batch norm): "
                "drop norm_kwargs"
            )
        if teacher_model is None:
            student_model = wrap_if_distributed(
                student_model, device, device_ids, distributed, find_unused_parameters
            )
        self.model = teacher_model if teacher_model is not None else student_model
        self.input_module_path = input_module["path"]
        self.input_module_io = input_module["io"]
        if isinstance(linear_kwargs, Mapping):
            self.projector = wrap_if_distributed(
                nn.Linear(**linear_kwargs), device, device_ids, distributed
            )
        else:
            self.projector = nn.Identity()

    def forward(self, x):
        return self.model(x)

    def secondary_forward(self, io_dict):
        z = _io(io_dict, self.input_module_path, self.input_module_io, "wrapped model")
        self.projector(_pooled(z))


# ----------------------------------------------------------------------------- registration

MID_LEVEL_LOSSES = {
    "fastkd.FKDLoss": FKDLoss,
    "fastkd.SPKDLoss": SPKDLoss,
    "fastkd.RKDLoss": RKDLoss,
    "fastkd.SRDLoss": SRDLoss,
}
MODEL_WRAPPERS = {"fastkd.SRDModelWrapper": SRDModelWrapper}


def _register(table: dict, register, entries: dict) -> None:
    """Registers each entry once; a key held by something not from this module is an error.

    Re-importing (or reloading) this module re-registers its own classes and nothing else.
    """
    for key, cls in entries.items():
        held = table.get(key)
        if held is cls:
            continue
        if held is not None and getattr(held, "__module__", None) != __name__:
            raise RuntimeError(
                f"torchdistill key {key!r} is already registered to {held!r}; fastkd does not "
                "replace it"
            )
        register(cls, key=key)


_register(MIDDLE_LEVEL_LOSS_DICT, register_mid_level_loss, MID_LEVEL_LOSSES)
_register(AUXILIARY_MODEL_WRAPPER_DICT, register_auxiliary_model_wrapper, MODEL_WRAPPERS)
