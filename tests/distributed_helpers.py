"""Worker side of tests/test_distributed.py: every scenario of one world size, run inside ONE
spawned gloo group (process start-up costs seconds). Each rank builds the same global data from
a per-scenario seed, runs the global loss on its own rows and compares with the float64
reference (fastkd.reference) on the concatenated batch, computed by autograd in this process.
Most scenarios go through the public losses with ``global_batch=True`` (functional and
Module); the rest call :mod:`fastkd.distributed` directly. Failures are collected per scenario
and sent back to the parent through a queue."""

from __future__ import annotations

import copy
import datetime
import os
import traceback
import zlib

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import fastkd
from fastkd import SRDLoss, available_backends, reference
from fastkd import distributed as fd

F64 = torch.float64


class Ctx:
    def __init__(self, rank: int, world: int, sizes: tuple[int, ...]):
        self.rank, self.world, self.sizes = rank, world, sizes
        self.batch = sum(sizes)
        start = sum(sizes[:rank])
        self.rows = slice(start, start + sizes[rank])

    def generator(self, name: str) -> torch.Generator:
        return torch.Generator().manual_seed(zlib.crc32(name.encode()))

    def features(self, gen, width: int) -> torch.Tensor:
        """(B, width) float64 with row scales spread over two decades (normalisation matters)."""
        scale = torch.logspace(-1, 1, self.batch, dtype=F64)[
            torch.randperm(self.batch, generator=gen)
        ]
        return torch.randn(self.batch, width, generator=gen, dtype=F64) * scale[:, None]


def assert_close(actual, expected, rtol, what, scale=None):
    """|actual - expected| <= rtol * scale elementwise, scale = max |expected| (not roundoff)."""
    expected = expected.to(F64)
    actual = actual.detach().to(F64)
    if scale is None:
        scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    if not err <= rtol * max(scale, 1e-300):
        raise AssertionError(f"{what}: max error {err:.3e} > {rtol:.1e} x scale {scale:.3e}")


def assert_same_on_all_ranks(value: torch.Tensor, what: str):
    mine = value.detach().to(F64).reshape(1)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, mine)
    values = [p.item() for p in parts]
    if any(v != values[0] for v in values):
        raise AssertionError(f"{what}: loss differs between ranks: {values}")


TOL = {F64: 1e-10, torch.float32: 2e-4}


def check_function(ctx: Ctx, name, global_fn, ref_fn, widths, dtype, ensemble=False):
    """Value on every rank = reference on the concatenation; this rank's feature gradients =
    W x the reference gradient on its rows (student and every teacher)."""
    gen = ctx.generator(name)
    full = [ctx.features(gen, w).to(dtype) for w in widths]  # rounded once to dtype
    local = [x[ctx.rows].clone().requires_grad_() for x in full]
    student, teachers = local[0], local[1:]
    loss = global_fn(student, teachers if ensemble else teachers[0])
    loss.backward()
    ref_in = [x.to(F64).requires_grad_() for x in full]
    ref = ref_fn(ref_in[0], ref_in[1:] if ensemble else ref_in[1])
    ref.backward()
    tol = TOL[dtype]
    assert loss.dtype == (F64 if dtype == F64 else torch.float32), f"{name}: dtype {loss.dtype}"
    assert_close(loss, ref, tol, f"{name} value")
    assert_same_on_all_ranks(loss, name)
    for i, (x, r) in enumerate(zip(local, ref_in, strict=True)):
        scale = ctx.world * r.grad.abs().max().item()
        assert_close(x.grad, ctx.world * r.grad[ctx.rows], tol, f"{name} grad[{i}]", scale)


def mlp(din: int, dout: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(din, 9), nn.Tanh(), nn.Linear(9, dout)).to(F64)


def compare_grads(model: nn.Module, single: nn.Module, what: str) -> None:
    """Parameter gradients to 1e-10 of the largest single-process gradient: some are zero in
    exact arithmetic (a last bias under a shift-invariant loss), so the scale is the model's."""
    scale = max(q.grad.abs().max().item() for q in single.parameters())
    for (pname, p), q in zip(model.named_parameters(), single.parameters(), strict=True):
        assert_close(p.grad, q.grad, 1e-10, f"{what} grad of {pname}", scale)


def check_ddp(ctx: Ctx, name, global_fn, ref_fn, din, widths, ensemble=False):
    """DDP-averaged parameter gradients = one process's gradients on the concatenated batch."""
    gen = ctx.generator(name)
    x = ctx.features(gen, din)
    teachers = [ctx.features(gen, w) for w in widths[1:]]
    model = mlp(din, widths[0], seed=7)
    single = copy.deepcopy(model)
    ddp = DDP(model)
    local_t = [t[ctx.rows] for t in teachers]
    loss = global_fn(ddp(x[ctx.rows]), local_t if ensemble else local_t[0])
    loss.backward()
    ref = ref_fn(single(x), teachers if ensemble else teachers[0])
    ref.backward()
    assert_close(loss, ref, 1e-12, f"{name} DDP value")
    compare_grads(model, single, f"{name} DDP")


def expect_error(ctx: Ctx, name, call, kind, text):
    try:
        call()
    except kind as exc:
        if text not in str(exc):
            raise AssertionError(f"{name}: message {exc!s} lacks {text!r}") from exc
        return
    raise AssertionError(f"{name}: no {kind.__name__} on rank {ctx.rank}")


def scenarios(ctx: Ctx):
    """(name, thunk) pairs; every rank runs the same list in the same order."""
    out = []
    ds, dt, ens = 6, 5, (5, 3)
    for dtype in (F64, torch.float32):
        tag = "f64" if dtype == F64 else "f32"
        for algo in ("tiled", "dual"):
            for ensemble in (False, True):
                widths = (ds, *ens) if ensemble else (ds, dt)

                def fkd(s, t, algo=algo):
                    return fastkd.fkd_loss(
                        s, t, 0.7, 0.3, algorithm=algo, backend="cpu", global_batch=True
                    )

                fkd_module = fastkd.FKDLoss(
                    0.7, 0.3, algorithm=algo, backend="cpu", global_batch=True
                )

                def fkd_ref(s, t):
                    return reference.fkd_loss(s, t, 0.7, 0.3)

                name = f"fkd-{algo}-{'ens' if ensemble else 'one'}-{tag}"
                out.append(
                    (
                        name,
                        lambda n=name, f=fkd, w=widths, d=dtype, e=ensemble: check_function(
                            ctx, n, f, fkd_ref, w, d, e
                        ),
                    )
                )
                if dtype == F64:
                    out.append(
                        (
                            name + "-ddp",
                            lambda n=name, f=fkd_module, w=widths, e=ensemble: check_ddp(
                                ctx, n, f, fkd_ref, 4, w, e
                            ),
                        )
                    )
        out.append(
            (
                f"sp-{tag}",
                lambda d=dtype, t=tag: check_function(
                    ctx, f"sp-{t}", sp_global, reference.sp_loss, (ds, dt), d
                ),
            )
        )
        out.append(
            (
                f"rkd-{tag}",
                lambda d=dtype, t=tag: check_function(
                    ctx, f"rkd-{t}", rkd_cpu, reference.rkd_distance_loss, (ds, dt), d
                ),
            )
        )
        out.append((f"srd-{tag}", lambda d=dtype: check_srd_function(ctx, d, public=d == F64)))
    out.append(
        (
            "fkd-tiled-reference-backend",
            lambda: check_function(
                ctx,
                "fkd-ref-backend",
                lambda s, t: fd.global_fkd_loss(s, t, algorithm="tiled", backend="reference"),
                reference.fkd_loss,
                (ds, dt),
                F64,
            ),
        )
    )
    out.append(
        (
            "fkd-auto",
            lambda: check_function(
                ctx, "fkd-auto", fd.global_fkd_loss, reference.fkd_loss, (ds, dt), F64
            ),
        )
    )
    out.append(
        (
            "sp-ddp",
            lambda: check_ddp(
                ctx, "sp-ddp", fastkd.SPLoss(global_batch=True), reference.sp_loss, 4, (ds, dt)
            ),
        )
    )
    out.append(
        (
            "rkd-ddp",
            lambda: check_ddp(
                ctx,
                "rkd-ddp",
                fastkd.RKDDistanceLoss(backend="cpu", global_batch=True),
                reference.rkd_distance_loss,
                4,
                (ds, dt),
            ),
        )
    )
    out.append(("srd-ddp-module", lambda: check_srd_module(ctx, momentum=0.1, public=True)))
    out.append(
        ("srd-ddp-module-cumulative", lambda: check_srd_module(ctx, momentum=None, public=False))
    )
    out.append(("gather-with-grad", lambda: check_autograd_collectives(ctx)))
    if ctx.world == 2 and available_backends()["triton"]["available"]:
        # The gather path runs any fused backend on the global batch; Triton's interpreter
        # (TRITON_INTERPRET=1, set by conftest) costs seconds to start, so W = 2 only.
        out.append(
            (
                "fkd-tiled-triton",
                lambda: check_function(
                    ctx,
                    "fkd-triton",
                    lambda s, t: fd.global_fkd_loss(
                        s, t, 0.7, 0.3, algorithm="tiled", backend="triton"
                    ),
                    lambda s, t: reference.fkd_loss(s, t, 0.7, 0.3),
                    (ds, *ens),
                    torch.float32,
                    True,
                ),
            )
        )
        out.append(
            (
                "rkd-triton",
                lambda: check_function(
                    ctx,
                    "rkd-triton",
                    lambda s, t: fastkd.rkd_distance_loss(
                        s, t, backend="triton", global_batch=True
                    ),
                    reference.rkd_distance_loss,
                    (ds, dt),
                    torch.float32,
                ),
            )
        )
    if ctx.world == 2:
        out.append(("compile", lambda: check_compile(ctx)))
    if ctx.world >= 3:
        out.append(("subgroup", lambda: check_subgroup(ctx)))
    out.append(("explain", lambda: check_explain(ctx)))
    out.append(("errors", lambda: check_errors(ctx)))
    return out


def rkd_cpu(s, t):
    return fastkd.rkd_distance_loss(s, t, backend="cpu", global_batch=True)


def sp_global(s, t):
    return fastkd.sp_loss(s, t, global_batch=True)


def srd_public(*args, **kwargs):
    return fastkd.srd_loss(*args, **kwargs, global_batch=True)


def check_srd_function(ctx: Ctx, dtype, public: bool):
    """global SRD (fastkd.srd_loss(global_batch=True) if ``public``, else the package's
    function) in training and eval mode, with running buffers, against the reference."""
    name = f"srd-{dtype}"
    global_srd = srd_public if public else fd.global_srd_loss
    gen = ctx.generator(name)
    width = 7
    zs = (ctx.features(gen, width) + 3.0).to(dtype)  # a mean far from 0 tests the statistics
    zt = ctx.features(gen, width).to(dtype)
    bufs = [torch.full((width,), float(i % 2), dtype=F64) for i in range(4)]  # mean 0, var 1
    ref_bufs = [b.clone() for b in bufs]

    def run(fn, s, t, training, buffers):
        return fn(s, t, 4.0, 1e-4, training, *buffers, momentum=0.2)

    s = zs[ctx.rows].clone().requires_grad_()
    t = zt[ctx.rows].clone().requires_grad_()
    loss = run(global_srd, s, t, True, bufs)
    loss.backward()
    rs, rt = zs.to(F64).requires_grad_(), zt.to(F64).requires_grad_()
    ref = run(reference.srd_loss, rs, rt, True, ref_bufs)
    ref.backward()
    tol = TOL[dtype]
    assert_close(loss, ref, tol, f"{name} value")
    assert_same_on_all_ranks(loss, name)
    for x, r, which in ((s, rs, "student"), (t, rt, "teacher")):
        scale = ctx.world * r.grad.abs().max().item()
        assert_close(x.grad, ctx.world * r.grad[ctx.rows], tol, f"{name} grad {which}", scale)
    for i, (b, rb) in enumerate(zip(bufs, ref_bufs, strict=True)):
        assert_close(b, rb, tol, f"{name} running buffer {i}")
        assert_same_on_all_ranks(b.sum(), f"{name} running buffer {i}")
    # eval mode: the running statistics, S over the global batch
    s.grad = None
    loss = run(global_srd, s, t.detach(), False, bufs)
    loss.backward()
    rs.grad = None
    ref = run(reference.srd_loss, rs, rt.detach(), False, ref_bufs)
    ref.backward()
    assert_close(loss, ref, tol, f"{name} eval value")
    scale = ctx.world * rs.grad.abs().max().item()
    assert_close(s.grad, ctx.world * rs.grad[ctx.rows], tol, f"{name} eval grad", scale)


class SRDStudent(nn.Module):
    def __init__(self, loss: nn.Module):
        super().__init__()
        self.backbone = mlp(4, 6, seed=11)
        self.srd = loss

    def forward(self, x, teacher):
        return self.srd(self.backbone(x), teacher)


def check_srd_module(ctx: Ctx, momentum, public: bool):
    """SRDLoss(global_batch=True) (or its alias GlobalSRDLoss) with a projector inside a
    DDP-wrapped student: parameter gradients, the running statistics after two steps and the
    eval-mode loss equal one process's SRDLoss on the concatenated batch."""
    name = f"srd-module-{momentum}"
    gen = ctx.generator(name)
    torch.manual_seed(3)
    if public:
        loss_module = SRDLoss(6, 5, momentum=momentum, global_batch=True, dtype=F64)
    else:
        loss_module = fd.GlobalSRDLoss(6, 5, momentum=momentum, dtype=F64)
    local = SRDStudent(loss_module)
    single = SRDStudent(SRDLoss(6, 5, momentum=momentum, dtype=F64))
    single.load_state_dict(local.state_dict())
    ddp = DDP(local)
    for step in range(2):
        x, t = ctx.features(gen, 4), ctx.features(gen, 5) * 2.0 + 1.0
        for m in (local, single):
            m.zero_grad()
        loss = ddp(x[ctx.rows], t[ctx.rows])
        loss.backward()
        ref = single(x, t)
        ref.backward()
        assert_close(loss, ref, 1e-12, f"{name} step {step} value")
        compare_grads(local, single, f"{name} step {step}")
    for (bname, b), rb in zip(local.named_buffers(), single.buffers(), strict=True):
        assert_close(b.to(F64), rb.to(F64), 1e-12, f"{name} buffer {bname}")
    local.eval()
    single.eval()
    x, t = ctx.features(gen, 4), ctx.features(gen, 5)
    with torch.no_grad():
        assert_close(local(x[ctx.rows], t[ctx.rows]), single(x, t), 1e-12, f"{name} eval")


def check_compile(ctx: Ctx):
    """torch.compile of a DDP training step whose loss is FKDLoss(global_batch=True) + SRD: the
    global losses run eagerly (a graph break at each), the values and parameter gradients equal
    the eager step's. fullgraph=True raises the documented error."""
    gen = ctx.generator("compile")
    x, t = ctx.features(gen, 4), ctx.features(gen, 5)
    fkd_module = fastkd.FKDLoss(0.7, 0.3, algorithm="dual", global_batch=True)

    def step(model, xs, ts):
        z = model(xs)
        return fkd_module(z, ts) + 0.5 * fastkd.srd_loss(z[:, :5], ts, global_batch=True)

    model = mlp(4, 6, seed=5)
    eager_model = copy.deepcopy(model)
    ddp, eager_ddp = DDP(model), DDP(eager_model)
    compiled = torch.compile(step, backend="eager")
    loss = compiled(ddp, x[ctx.rows], t[ctx.rows])
    loss.backward()
    ref = step(eager_ddp, x[ctx.rows], t[ctx.rows])
    ref.backward()
    assert_close(loss, ref, 1e-12, "compiled value")
    compare_grads(model, eager_model, "compiled")
    full = torch.compile(
        lambda a, b: fastkd.fkd_loss(a, b, global_batch=True), fullgraph=True, backend="eager"
    )
    expect_error(ctx, "fullgraph", lambda: full(x[ctx.rows], t[ctx.rows]), Exception, "eagerly")


def check_subgroup(ctx: Ctx):
    """process_group=: the loss of ranks 0 and 1 only (the last rank is outside the group)."""
    group = dist.new_group([0, 1])
    if ctx.rank > 1:
        return
    gen = ctx.generator("subgroup")
    full = [ctx.features(gen, w) for w in (6, 5)]
    stop = sum(ctx.sizes[:2])
    start = sum(ctx.sizes[: ctx.rank])
    rows = slice(start, start + ctx.sizes[ctx.rank])
    s, t = (x[rows].clone().requires_grad_() for x in full)
    loss = fastkd.FKDLoss(0.7, 0.3, global_batch=True, process_group=group)(s, t)
    loss.backward()
    rs, rt = (x[:stop].clone().requires_grad_() for x in full)
    ref = reference.fkd_loss(rs, rt, 0.7, 0.3)
    ref.backward()
    assert_close(loss, ref, 1e-10, "subgroup value")
    for x, r, which in ((s, rs, "student"), (t, rt, "teacher")):
        scale = 2 * r.grad.abs().max().item()
        assert_close(x.grad, 2 * r.grad[rows], 1e-10, f"subgroup grad {which}", scale)
    other = fastkd.rkd_distance_loss(s, t, global_batch=True, process_group=group)
    assert_close(other, reference.rkd_distance_loss(rs, rt), 1e-10, "subgroup rkd value")


def check_autograd_collectives(ctx: Ctx):
    """A user-written global loss through all_gather_with_grad gets the contract's scaling."""
    gen = ctx.generator("gather")
    x = ctx.features(gen, 3)
    local = x[ctx.rows].clone().requires_grad_()
    gathered = fd.all_gather_with_grad(local)
    assert_close(gathered, x, 0.0, "gathered rows")
    loss = (gathered.sin() ** 2).sum()
    loss.backward()
    xr = x.clone().requires_grad_()
    (xr.sin() ** 2).sum().backward()
    assert_close(local.grad, ctx.world * xr.grad[ctx.rows], 1e-14, "all_gather_with_grad grad")
    y = torch.full((2,), float(ctx.rank + 1), dtype=F64, requires_grad=True)
    total = fd.all_reduce_with_grad(y)
    assert_close(total, torch.full((2,), ctx.world * (ctx.world + 1) / 2.0, dtype=F64), 0.0, "sum")
    (total * 3.0).sum().backward()
    assert_close(y.grad, torch.full((2,), 3.0 * ctx.world, dtype=F64), 0.0, "all_reduce grad")


def check_explain(ctx: Ctx):
    s = torch.zeros(ctx.sizes[ctx.rank], 6)
    plan = fd.explain_global_fkd(s, [torch.zeros(ctx.sizes[ctx.rank], 3)] * 2)
    assert plan.batch_sizes == ctx.sizes, plan
    assert plan.teacher_widths == (3, 3), plan
    assert plan.algorithm in ("tiled", "dual") and "auto" in plan.reason, plan
    forced = fd.explain_global_fkd(s, s, algorithm="dual")
    assert forced.algorithm == "dual" and "forced" in forced.reason, forced


def check_errors(ctx: Ctx):
    """Disagreements and invalid inputs raise on EVERY rank (no hang), and the group stays
    usable afterwards."""
    n = ctx.sizes[ctx.rank]
    width = 6 + (ctx.rank == 1)  # rank 1 disagrees
    expect_error(
        ctx,
        "fkd width",
        lambda: fd.global_fkd_loss(torch.randn(n, width), torch.randn(n, 3)),
        fd.GlobalBatchError,
        "do not match",
    )
    expect_error(
        ctx,
        "FKDLoss width",
        lambda: fastkd.FKDLoss(global_batch=True)(torch.randn(n, width), torch.randn(n, 3)),
        fd.GlobalBatchError,
        "do not match",
    )
    # A backend this install lacks for SP, on rank 0 only: rank 0 raises the registry's error,
    # the others a GlobalBatchError naming rank 0 (nobody waits in a collective).
    sp_backend = "cpu" if ctx.rank == 0 else None
    kind = fastkd.BackendUnavailableError if ctx.rank == 0 else fd.GlobalBatchError
    expect_error(
        ctx,
        "sp backend",
        lambda: fastkd.sp_loss(
            torch.randn(n, 4), torch.randn(n, 3), backend=sp_backend, global_batch=True
        ),
        kind,
        "rank 0" if ctx.rank else "sp",
    )
    expect_error(
        ctx,
        "rkd dtype",
        lambda: fd.global_rkd_distance_loss(
            torch.randn(n, 4, dtype=F64 if ctx.rank == 0 else torch.float32), torch.randn(n, 4)
        ),
        fd.GlobalBatchError,
        "do not match",
    )
    expect_error(
        ctx,
        "sp width",
        lambda: fd.global_sp_loss(torch.randn(n, 4), torch.randn(n, 3 + ctx.rank)),
        fd.GlobalBatchError,
        "do not match",
    )
    teachers = [torch.randn(n, 3)] * (1 + (ctx.rank == 0))
    expect_error(
        ctx,
        "fkd teacher count",
        lambda: fd.global_fkd_loss(torch.randn(n, 4), teachers),
        fd.GlobalBatchError,
        "teachers",
    )
    algo = "dual" if ctx.rank == 0 else "tiled"
    expect_error(
        ctx,
        "fkd algorithm",
        lambda: fd.global_fkd_loss(torch.randn(n, 4), torch.randn(n, 3), algorithm=algo),
        fd.GlobalBatchError,
        "algorithm",
    )
    # An invalid input on rank 0 only: rank 0 raises its own error, the others name rank 0.
    bad = torch.randn(n) if ctx.rank == 0 else torch.randn(n, 5)
    kind, text = (ValueError, "2-D") if ctx.rank == 0 else (fd.GlobalBatchError, "rank 0")
    expect_error(ctx, "srd local", lambda: fd.global_srd_loss(bad, torch.randn(n, 5)), kind, text)
    module = SRDLoss(4, 5, global_batch=True)
    feats = torch.randn(n, 4 + (ctx.rank == ctx.world - 1))
    kind = ValueError if ctx.rank == ctx.world - 1 else fd.GlobalBatchError
    expect_error(ctx, "srd module width", lambda: module(feats, torch.randn(n, 5)), kind, "columns")
    assert int(module.num_batches_tracked) == 0, "a failed call must not count a batch"
    # and the group still works
    loss = fd.global_fkd_loss(torch.randn(n, 4), torch.randn(n, 3))
    assert_same_on_all_ranks(loss, "after errors")


def worker(rank: int, world: int, port: int, sizes: tuple[int, ...], queue) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("FASTKD_BACKEND", "auto")
    failures = []
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=60),
        )
        ctx = Ctx(rank, world, sizes)
        for name, thunk in scenarios(ctx):
            try:
                thunk()
            except Exception:
                failures.append((name, traceback.format_exc(limit=6)))
        dist.barrier()
        dist.destroy_process_group()
    except Exception:
        failures.append(("setup", traceback.format_exc()))
    queue.put((rank, failures))
