"""Loss-call timing of ``fastkd demo``: forward + backward of each distillation loss on real
features, the chosen backend against the pure-PyTorch reference."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
from torch import nn

import fastkd
from fastkd.demo.data import Digits
from fastkd.demo.models import MLP, STUDENT_WIDTHS
from fastkd.demo.train import FR_WEIGHT, Teachers
from fastkd.losses.fkd import choose_algorithm


def timing_clock() -> tuple[Callable[[], float], str]:
    """The clock of the loss timing and its name.

    With one torch thread every op runs on the calling thread, so its CPU time is the cost of
    the call without the time spent waiting for a core on a shared machine; with several
    threads the CPU time would add them up, so wall time is used.
    """
    if torch.get_num_threads() == 1:
        return time.thread_time, "thread CPU time"
    return time.perf_counter, "wall time"


def _seconds_per_call(fn: Callable[[], None], budget: float, rounds: int) -> float:
    """Median over ``rounds`` of the mean time of a batch of calls sized to ``budget`` s."""
    clock, _ = timing_clock()
    fn()  # warm-up: allocations, lazy initialisation
    start = clock()
    fn()
    single = max(clock() - start, 1e-6)
    number = max(1, int(budget / single))
    samples = []
    for _ in range(rounds):
        start = clock()
        for _ in range(number):
            fn()
        samples.append((clock() - start) / number)
    return statistics.median(samples)


def _step(loss: Callable, student: torch.Tensor, teacher, module: nn.Module | None = None):
    """One timed call: clear the gradients, ``loss(student, teacher)`` forward + backward."""

    def call() -> None:
        student.grad = None
        if module is not None:
            module.zero_grad(set_to_none=True)
        loss(student, teacher).backward()

    return call


def time_losses(
    data: Digits, teachers: Teachers, batch_size: int, backend: str, quick: bool, seed: int
) -> list[dict]:
    """Forward + backward time of each distillation loss, ``backend`` vs "reference".

    Inputs are real: a fresh student's features (a leaf, so the MLP is not timed) and the
    teachers' features of the first B training images, with B the training batch size and B
    the whole training split as one batch.
    """
    budget, rounds = (0.01, 3) if quick else (0.1, 7)
    torch.manual_seed(seed)
    student = MLP(STUDENT_WIDTHS)
    fkd_backend = fastkd.resolve_backend("fkd", backend, torch.device("cpu"))
    rows = []
    for batch in dict.fromkeys((min(batch_size, len(data.x_train)), len(data.x_train))):
        with torch.no_grad():
            fs = student(data.x_train[:batch])[0]
        fs.requires_grad_(True)
        tf = teachers.features[:batch]
        ens = [f[:batch] for f in teachers.ensemble_features]
        widths = "/".join(str(t.shape[1]) for t in ens)
        cases = (
            ("FKD", f"student {batch}x{fs.shape[1]}, teacher {batch}x{tf.shape[1]}", tf),
            ("FKD ensemble", f"student {batch}x{fs.shape[1]}, teachers {batch}x{widths}", ens),
        )
        for name, shapes, target in cases:
            seconds = []
            for which in (backend, "reference"):
                loss = partial(fastkd.fkd_loss, kd_weight=10.0, fr_weight=FR_WEIGHT, backend=which)
                seconds.append(_seconds_per_call(_step(loss, fs, target), budget, rounds))
            teacher_width = sum(
                t.shape[1] for t in (target if isinstance(target, list) else [target])
            )
            algorithm = choose_algorithm("auto", batch, fs.shape[1], teacher_width)
            if fkd_backend == "reference":
                algorithm = "explicit kernels"
            rows.append(_timing_row(name, shapes, batch, fkd_backend, algorithm, *seconds))

        # SRD: the projector runs inside the loss module, so it is timed in both columns.
        torch.manual_seed(seed)
        fused = fastkd.SRDLoss(fs.shape[1], tf.shape[1], backend=backend)
        ref = fastkd.SRDLoss(fs.shape[1], tf.shape[1], backend="reference")
        ref.load_state_dict(fused.state_dict())
        srd_backend = fastkd.resolve_backend("srd", backend, torch.device("cpu"))
        fused_s = _seconds_per_call(_step(fused.train(), fs, tf, fused), budget, rounds)
        reference_s = _seconds_per_call(_step(ref.train(), fs, tf, ref), budget, rounds)
        shapes = f"student {batch}x{fs.shape[1]} -> {tf.shape[1]}, teacher {batch}x{tf.shape[1]}"
        rows.append(_timing_row("SRD", shapes, batch, srd_backend, "fused", fused_s, reference_s))
    return rows


def _timing_row(loss, shapes, batch, fused_backend, algorithm, fused_s, reference_s) -> dict:
    return {
        "loss": loss,
        "shapes": shapes,
        "batch": batch,
        "fused_backend": fused_backend,
        "algorithm": algorithm,
        "fused_us": None if fused_s is None else fused_s * 1e6,
        "reference_us": reference_s * 1e6,
        "speedup": None if fused_s is None else reference_s / fused_s,
    }
