"""Collectives for global-batch losses: group checks, the shape handshake, uneven gathers.

Every global loss starts with :func:`handshake`: ONE ``all_gather`` of a fixed-length int64
vector per rank (local batch size, a checksum of the widths/dtypes, the first widths, a flag
saying whether the local inputs passed validation). A width, dtype or validation problem on
any rank therefore raises on EVERY rank instead of leaving the others blocked in a collective
whose sizes no longer agree. Only on that error path does a second collective
(``all_gather_object``) fetch the per-rank details for the message.

The data collectives here carry no autograd: the losses of :mod:`fastkd.distributed` compute
their local gradients in the forward pass from reduced quantities (see each module), so their
backward passes communicate nothing. For user-written global losses, :func:`all_gather_with_grad`
and :func:`all_reduce_with_grad` are autograd-aware versions whose backward passes sum the
gradients over ranks; when every rank backpropagates the same global loss, a rank's own rows then
receive ``W x dL/dF_r``, which DDP's averaging turns into the single-process gradient.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Field slots of the handshake vector; the widths that follow are only for messages (the
# checksum compares all of them).
_OK, _OP, _BATCH, _CRC, _COUNT = range(5)
_SHOWN = 12  # fields carried verbatim after the header (the checksum covers the rest)

_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}
_OP_CODES = {"fkd": 1, "sp": 2, "rkd": 3, "srd": 4, "gather": 5, "reduce": 6}


# The shape handshake reads every rank's sizes on the host (data-dependent Python control flow),
# so dynamo cannot put a global loss in a graph: torch.compile runs it eagerly (one graph
# break), and fullgraph=True raises with this reason.
COMPILE_REASON = (
    "fastkd global-batch losses (global_batch=True) run eagerly: their shape handshake "
    "exchanges batch sizes on the host before the collectives"
)


class GlobalBatchError(ValueError):
    """Ranks disagree about the inputs of a global loss (widths, dtypes, counts) or one rank's
    inputs are invalid; raised on every rank with the per-rank details."""


def require_group(process_group=None):
    """The process group to use (None = the default group); a clear error if there is none.

    Raises ``RuntimeError`` when torch.distributed is unavailable or not initialised: a global
    loss never silently falls back to the local batch.
    """
    if not dist.is_available():
        raise RuntimeError(
            "global-batch losses need torch.distributed, which this PyTorch build lacks"
        )
    if not dist.is_initialized():
        raise RuntimeError(
            "global-batch losses need an initialised process group: call "
            "torch.distributed.init_process_group(...) first (e.g. launch with torchrun), or "
            "use the local loss"
        )
    return process_group if process_group is not None else dist.group.WORLD


def comm_device(group, like: torch.device) -> torch.device:
    """Device of the tensors a collective on ``group`` exchanges: the features' CUDA device under
    NCCL, the CPU otherwise (Gloo and the rest move host buffers)."""
    backend = str(dist.get_backend(group)).lower()
    if like.type == "cuda" and "nccl" in backend:
        return like
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def dtype_code(dtype: torch.dtype) -> int:
    return _DTYPE_CODES.get(dtype, 0)


@dataclass(frozen=True)
class Handshake:
    """Result of :func:`handshake`: this rank, the world size and every rank's local batch."""

    rank: int
    world_size: int
    batch_sizes: tuple[int, ...]

    @property
    def batch(self) -> int:
        """Global batch size B = sum of the local ones."""
        return sum(self.batch_sizes)

    @property
    def offset(self) -> int:
        """Row of the global batch where this rank's rows start (rank order)."""
        return sum(self.batch_sizes[: self.rank])

    @property
    def rows(self) -> slice:
        return slice(self.offset, self.offset + self.batch_sizes[self.rank])


def handshake(
    op: str,
    group,
    device: torch.device,
    batch: int,
    fields: Sequence[tuple[str, int]],
    problem: BaseException | None = None,
    *,
    min_global_batch: int = 2,
) -> Handshake:
    """Exchange local batch sizes and check that every rank agrees on ``fields``.

    Args:
        op: name of the loss (only for messages and to catch ranks calling different losses).
        group: the process group. device: where the handshake vector lives (comm_device).
        batch: this rank's number of rows (0 if ``problem`` is set).
        fields: (name, int) pairs that must be equal on every rank (widths, dtype codes...).
        problem: the exception this rank's own validation raised, if any; it is re-raised here,
            AFTER the collective, so that the other ranks raise too instead of hanging.
        min_global_batch: the global batch must have at least this many rows.

    Returns:
        a :class:`Handshake`. Raises on every rank if a rank's inputs were invalid, if the
        fields differ between ranks (:class:`GlobalBatchError`) or the global batch is too small.
    """
    values = [int(v) for _, v in fields]
    crc = zlib.crc32(repr(values).encode())
    shown = (values + [-1] * _SHOWN)[:_SHOWN]
    header = [int(problem is None), _OP_CODES.get(op, 0), int(batch), crc, len(values)]
    vec = torch.tensor(header + shown, dtype=torch.int64, device=device)
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    out = [torch.empty_like(vec) for _ in range(world)]
    dist.all_gather(out, vec, group=group)
    table = torch.stack(out).cpu().tolist()

    bad_ranks = [r for r, row in enumerate(table) if row[_OK] == 0]
    if bad_ranks:
        # Error path only: fetch every rank's message so each rank can say what went wrong.
        messages: list = [None] * world
        own = None if problem is None else f"{type(problem).__name__}: {problem}"
        dist.all_gather_object(messages, own, group=group)
        if problem is not None:
            raise problem
        details = "; ".join(f"rank {r}: {messages[r]}" for r in bad_ranks)
        raise GlobalBatchError(f"global {op} loss: invalid inputs on other ranks ({details})")

    keys = [(row[_OP], row[_CRC], row[_COUNT], *row[_COUNT + 1 :]) for row in table]
    if any(k != keys[0] for k in keys):
        described: list = [None] * world
        dist.all_gather_object(described, dict(fields), group=group)
        lines = "; ".join(f"rank {r}: {described[r]}" for r in range(world))
        raise GlobalBatchError(
            f"global {op} loss: the ranks' inputs do not match (widths, dtypes and the number "
            f"of teachers must agree; only the batch size may differ): {lines}"
        )

    sizes = tuple(int(row[_BATCH]) for row in table)
    if sum(sizes) < min_global_batch:
        raise ValueError(
            f"global {op} loss needs a global batch of at least {min_global_batch} rows, got "
            f"{sum(sizes)} (local batch sizes {list(sizes)})"
        )
    return Handshake(rank=rank, world_size=world, batch_sizes=sizes)


def all_gather_rows(x: torch.Tensor, hs: Handshake, group) -> torch.Tensor:
    """Concatenation in rank order of every rank's ``x`` (B_r, ...) -> (B, ...); no autograd.

    Uneven batches: each rank pads to max(B_r) rows, one ``all_gather``, then the padding is
    dropped. The result is on ``x``'s device and dtype, identical on every rank.
    """
    device = comm_device(group, x.device)
    longest = max(hs.batch_sizes)
    buf = x.new_zeros((longest, *x.shape[1:]), device=device)
    buf[: x.shape[0]].copy_(x)
    parts = [torch.empty_like(buf) for _ in range(hs.world_size)]
    dist.all_gather(parts, buf, group=group)
    out = torch.cat([p[:n] for p, n in zip(parts, hs.batch_sizes, strict=True)])
    return out.to(x.device)


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """Sum over ranks of ``x`` (same shape everywhere, checked by the caller's handshake)."""
    device = comm_device(group, x.device)
    buf = x.to(device, copy=True) if x.device != device else x.clone()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    return buf.to(x.device)


def all_gather_many(tensors: Sequence[torch.Tensor], hs: Handshake, group) -> list[torch.Tensor]:
    """:func:`all_gather_rows` of several (B_r, D_i) tensors; one collective when they share a
    dtype (concatenated along columns), else one per tensor."""
    if len({t.dtype for t in tensors}) == 1 and all(t.dim() == 2 for t in tensors):
        widths = [t.shape[1] for t in tensors]
        joint = tensors[0] if len(tensors) == 1 else torch.cat(list(tensors), dim=1)
        return list(all_gather_rows(joint, hs, group).split(widths, dim=1))
    return [all_gather_rows(t, hs, group) for t in tensors]


class _GatheredLoss(torch.autograd.Function):
    """``apply(loss_fn, hs, group, *local)``: ``loss_fn`` on the gathered global batch.

    Every rank gathers the inputs and evaluates the same loss on the same global batch (the
    whole computation is redundant across ranks). The gradient with respect to the gathered
    inputs is then identical on every rank, so the sum over ranks that an autograd-aware gather
    would form in backward is ``W`` times our own copy: this rank's rows get ``W x dL/dF_r``
    (SPEC §5) with no backward collective. Gradients are computed in the forward pass (the
    fused kernels produce them in the same sweep as the loss); backward only scales them. This
    assumes every rank backpropagates the same upstream gradient into the loss, as it does when
    every rank runs the same training step.
    """

    @staticmethod
    def forward(ctx, loss_fn, hs: Handshake, group, *local):
        needs = ctx.needs_input_grad[3:]
        gathered = all_gather_many(local, hs, group)
        leaves = [g.detach().requires_grad_(bool(n)) for g, n in zip(gathered, needs, strict=True)]
        with torch.enable_grad():
            loss = loss_fn(*leaves)
        ctx.present = [bool(n) for n in needs]
        grads = []
        if any(needs) and loss.requires_grad:
            wanted = [leaf for leaf, n in zip(leaves, needs, strict=True) if n]
            full = torch.autograd.grad(loss, wanted, allow_unused=True)
            for leaf, g in zip(wanted, full, strict=True):
                g = torch.zeros_like(leaf) if g is None else g
                grads.append(g[hs.rows] * hs.world_size)
        else:
            ctx.present = [False] * len(needs)
        ctx.save_for_backward(*grads)
        return loss.detach()

    @staticmethod
    def backward(ctx, grad):
        saved = iter(ctx.saved_tensors)
        out = []
        for present in ctx.present:
            g = next(saved) if present else None
            out.append(None if g is None else g * grad.to(g.dtype))
        return None, None, None, *out


def gathered_loss(loss_fn, hs: Handshake, group, *local: torch.Tensor) -> torch.Tensor:
    """``loss_fn(*gathered)`` on the global batch, differentiable w.r.t. the local tensors with
    the contract's scaling (see :class:`_GatheredLoss`). ``local`` are (B_r, D_i) tensors."""
    return _GatheredLoss.apply(loss_fn, hs, group, *local)


class _AllGatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, hs: Handshake, x):
        ctx.group, ctx.hs = group, hs
        return all_gather_rows(x, hs, group)

    @staticmethod
    def backward(ctx, grad):
        # d(sum over ranks of each rank's loss)/dx_r: every rank's gradient on our rows.
        total = all_reduce_sum(grad.contiguous(), ctx.group)
        return None, None, total[ctx.hs.rows].clone()


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, x):
        ctx.group = group
        return all_reduce_sum(x, group)

    @staticmethod
    def backward(ctx, grad):
        return None, all_reduce_sum(grad.contiguous(), ctx.group)


def _tensor_problem(x: object, name: str) -> BaseException | None:
    if not isinstance(x, torch.Tensor):
        return TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.numel() == 0:
        return ValueError(f"{name} must be a non-empty tensor with a batch dimension")
    return None


def all_gather_with_grad(x: torch.Tensor, process_group=None) -> torch.Tensor:
    """Autograd-aware uneven all_gather: (B_r, ...) on each rank -> (B, ...) in rank order.

    Backward sums the gradient over ranks (one ``all_reduce`` of (B, ...)) and returns this
    rank's rows, so every rank must call backward through it. If every rank backpropagates the
    same global loss L, a rank's rows get ``W x dL/dx_r``: with DDP's averaging the parameter
    gradients equal the single-process ones (SPEC §5). The trailing dims and dtype must agree
    across ranks (checked, error on every rank).
    """
    group = require_group(process_group)
    problem = _tensor_problem(x, "x")
    device = comm_device(group, x.device) if problem is None else comm_device(group, _cpu())
    fields = [] if problem else [("dtype", dtype_code(x.dtype)), *_dims(x)]
    hs = handshake(
        "gather", group, device, 0 if problem else x.shape[0], fields, problem, min_global_batch=1
    )
    return _AllGatherRows.apply(group, hs, x)


def all_reduce_with_grad(x: torch.Tensor, process_group=None) -> torch.Tensor:
    """Autograd-aware sum over ranks; backward sums the incoming gradients over ranks too.

    Shapes and dtypes must agree across ranks (checked by a handshake first, so a mismatch is an
    error on every rank rather than a hang or a garbled sum).
    """
    group = require_group(process_group)
    problem = (
        _tensor_problem(x, "x") if not (isinstance(x, torch.Tensor) and x.dim() == 0) else None
    )
    device = comm_device(group, x.device) if problem is None else comm_device(group, _cpu())
    fields = [] if problem else [("dtype", dtype_code(x.dtype)), ("ndim", x.dim()), *_dims(x, 0)]
    handshake("reduce", group, device, 1, fields, problem, min_global_batch=1)
    return _AllReduceSum.apply(group, x)


def _dims(x: torch.Tensor, start: int = 1) -> list[tuple[str, int]]:
    return [(f"dim {i}", int(n)) for i, n in enumerate(x.shape) if i >= start]


def _cpu() -> torch.device:
    return torch.device("cpu")
