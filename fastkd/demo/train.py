"""Training of ``fastkd demo``: the methods and their grids, the loop, teachers, students.

Every method adds its distillation term to the masked cross-entropy through one
``objective(features, logits, ce, idx)`` hook of :func:`fit`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import fastkd
from fastkd.demo.data import Digits
from fastkd.demo.models import (
    CROSS_CLASSES,
    ENSEMBLE_WIDTHS,
    MLP,
    STUDENT_WIDTHS,
    TEACHER_WIDTHS,
    describe,
)

LEARNING_RATE = 1e-2
FR_WEIGHT = 1e-3  # FKD feature regulariser, fixed: it only keeps the student features bounded
FKD_WEIGHTS = (3.0, 10.0, 30.0, 100.0)
KD_GRID = tuple({"T": t, "alpha": a} for t in (2.0, 4.0) for a in (0.5, 0.9))
SRD_WEIGHTS = (0.3, 1.0, 3.0, 10.0)


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    grid: tuple[dict, ...]


METHODS = (
    Method("plain", "plain student (CE only)", ({},)),
    Method("kd", "vanilla KD (Hinton)", KD_GRID),
    Method("fkd", "FKD, single teacher", tuple({"kd_weight": w} for w in FKD_WEIGHTS)),
    Method("fkd_ensemble", "FKD, 3-teacher ensemble", tuple({"kd_weight": w} for w in FKD_WEIGHTS)),
    Method("srd", "SRD", tuple({"weight": w} for w in SRD_WEIGHTS)),
    Method(
        "fkd_cross",
        "FKD, teacher trained on digits 0-4 only",
        tuple({"kd_weight": w} for w in FKD_WEIGHTS),
    ),
)
METHOD_KEYS = tuple(m.key for m in METHODS)


def masked_cross_entropy(logits, labels, mask):
    """Mean CE over the rows where ``mask`` is 1; 0 when the batch has no labelled row."""
    per_row = F.cross_entropy(logits, labels, reduction="none")
    return (per_row * mask).sum() / mask.sum().clamp_min(1.0)


def fit(
    model: MLP,
    x: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor,
    seed: int,
    epochs: int,
    batch_size: int,
    objective: Callable | None = None,
    extra_params: list[nn.Parameter] | None = None,
) -> MLP:
    """Adam + cosine schedule; ``objective(features, logits, ce, idx) -> loss`` adds distillation.

    Batches of fewer than 2 rows are skipped (relational losses need pairs).
    """
    params = list(model.parameters()) + list(extra_params or [])
    optimizer = torch.optim.Adam(params, lr=LEARNING_RATE)
    steps = epochs * math.ceil(len(x) / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    gen = torch.Generator().manual_seed(seed)
    weights = mask.to(torch.float32)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            if len(idx) < 2:
                continue
            features, logits = model(x[idx])
            loss = masked_cross_entropy(logits, y[idx], weights[idx])
            if objective is not None:
                loss = objective(features, logits, loss, idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    return model


@torch.no_grad()
def accuracy(model: MLP, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x)[1].argmax(1) == y).float().mean().item()


@dataclass
class Teachers:
    """Frozen teachers' outputs on every training image (computed once: no augmentation)."""

    features: torch.Tensor  # (N, 256) main teacher, penultimate
    logits: torch.Tensor  # (N, 10) main teacher
    ensemble_features: list[torch.Tensor]  # (N, 128), (N, 256), (N, 512)
    cross_features: torch.Tensor  # (N, 256) teacher of digits 0-4
    report: dict


def train_teachers(data: Digits, seed: int, epochs: int, batch_size: int, bar) -> Teachers:
    """Train the ensemble (the main teacher among it) and the cross-label teacher on the
    labelled training split; ``bar`` (a tqdm bar) advances once per model."""
    everyone = torch.ones(len(data.y_train), dtype=torch.bool)
    members, report = [], {"ensemble": []}
    for j, hidden in enumerate(ENSEMBLE_WIDTHS):
        torch.manual_seed(seed + 1000 + j)
        model = fit(
            MLP(hidden), data.x_train, data.y_train, everyone, seed + 1000 + j, epochs, batch_size
        )
        members.append(model)
        report["ensemble"].append(
            {
                "architecture": describe(model),
                "val_acc": accuracy(model, data.x_val, data.y_val),
                "test_acc": accuracy(model, data.x_test, data.y_test),
            }
        )
        bar.update()
    main = members[ENSEMBLE_WIDTHS.index(TEACHER_WIDTHS)]
    report["teacher"] = report["ensemble"][ENSEMBLE_WIDTHS.index(TEACHER_WIDTHS)]
    with torch.no_grad():
        probs = sum(F.softmax(m(data.x_test)[1], 1) for m in members)
        report["ensemble_test_acc"] = (probs.argmax(1) == data.y_test).float().mean().item()

    # Cross-label teacher: sees only images of CROSS_CLASSES, predicts among them.
    keep = torch.isin(data.y_train, torch.tensor(CROSS_CLASSES))
    torch.manual_seed(seed + 2000)
    cross = MLP(TEACHER_WIDTHS, len(CROSS_CLASSES))
    fit(cross, data.x_train[keep], data.y_train[keep], keep[keep], seed + 2000, epochs, batch_size)
    keep_test = torch.isin(data.y_test, torch.tensor(CROSS_CLASSES))
    report["cross"] = {
        "architecture": describe(cross),
        "classes": list(CROSS_CLASSES),
        "train_images": int(keep.sum()),
        "test_acc_on_its_classes": accuracy(cross, data.x_test[keep_test], data.y_test[keep_test]),
    }
    bar.update()

    with torch.no_grad():
        features, logits = main(data.x_train)
        return Teachers(
            features=features,
            logits=logits,
            ensemble_features=[m(data.x_train)[0] for m in members],
            cross_features=cross(data.x_train)[0],
            report=report,
        )


def train_student(
    data: Digits,
    teachers: Teachers,
    method: str,
    config: dict,
    seed: int,
    mask: torch.Tensor,
    epochs: int,
    batch_size: int,
    backend: str,
) -> tuple[float, float]:
    """Train one student; returns (validation accuracy, test accuracy)."""
    torch.manual_seed(seed)
    student = MLP(STUDENT_WIDTHS)
    extra: list[nn.Parameter] = []
    objective = None
    if method == "kd":
        t, alpha = config["T"], config["alpha"]

        def objective(features, logits, ce, idx):
            kl = F.kl_div(
                F.log_softmax(logits / t, 1),
                F.log_softmax(teachers.logits[idx] / t, 1),
                reduction="batchmean",
                log_target=True,
            )
            return (1.0 - alpha) * ce + alpha * t * t * kl

    elif method in ("fkd", "fkd_ensemble", "fkd_cross"):
        loss_fn = fastkd.FKDLoss(config["kd_weight"], FR_WEIGHT, backend=backend)
        source = {
            "fkd": teachers.features,
            "fkd_ensemble": teachers.ensemble_features,
            "fkd_cross": teachers.cross_features,
        }[method]

        def objective(features, logits, ce, idx):
            target = [f[idx] for f in source] if isinstance(source, list) else source[idx]
            return ce + loss_fn(features, target)

    elif method == "srd":
        srd = fastkd.SRDLoss(student.feature_dim, teachers.features.shape[1], backend=backend)
        srd.train()
        extra = list(srd.parameters())
        weight = config["weight"]

        def objective(features, logits, ce, idx):
            return ce + weight * srd(features, teachers.features[idx])

    elif method != "plain":
        raise ValueError(f"method must be one of {METHOD_KEYS}, got {method!r}")
    fit(student, data.x_train, data.y_train, mask, seed, epochs, batch_size, objective, extra)
    return accuracy(student, data.x_val, data.y_val), accuracy(student, data.x_test, data.y_test)
