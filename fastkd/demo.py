"""``fastkd demo``: knowledge distillation on real data, end to end, on a CPU in minutes.

Data: scikit-learn's ``load_digits`` (1797 grey 8x8 handwritten digits, 64 inputs scaled to
[0, 1]; it ships inside the scikit-learn package, nothing is downloaded), split 60/20/20 into
train/validation/test, stratified by class, seeded by ``--seed``.

Models: MLP teachers 64-256-256-10 (the main one) and an ensemble of three (64-128-128-10,
the main one, 64-512-512-10), and a small student 64-32-10. Distillation acts on the
penultimate features (student 32 wide, teachers 128-512 wide) or, for vanilla KD, on the
logits. Methods:

  plain         cross-entropy (CE) only
  kd            Hinton KD: (1 - alpha) CE + alpha T^2 KL(softmax(t/T) || softmax(s/T))
  fkd           CE + fastkd.fkd_loss(student, teacher, kd_weight, fr_weight)
  fkd_ensemble  the same against the three teachers' averaged kernel
  srd           CE + weight * SRD (Linear projector 32 -> 256, batch norm, LogSum, p = 4)
  fkd_cross     CE + FKD from a teacher trained on digits 0-4 only: its 5 outputs cannot be
                matched to the student's 10 (no logit KD), its feature kernel can be

Two regimes: the student sees every training label ("all labels"), or only
``--labels-per-class`` of them per class ("few labels"); the distillation terms see every
training image in both (the teacher labels the rest: Hinton's transfer set). Teachers always
train on the whole labelled training split.

Protocol: each method's small hyper-parameter grid is run on one seed and scored on the
validation split; the chosen config is then trained with ``--seeds`` seeds and only those runs
are scored on the test split. Loss timing: the distillation-loss call (forward + backward, on
real features at the training batch shape and at the whole training split as one batch) with
``--backend`` against the pure-PyTorch reference.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import fastkd
from fastkd.fkd import choose_algorithm

STUDENT_WIDTHS = (32,)
TEACHER_WIDTHS = (256, 256)
ENSEMBLE_WIDTHS = ((128, 128), (256, 256), (512, 512))  # the middle member is the main teacher
CROSS_CLASSES = (0, 1, 2, 3, 4)  # the cross-label teacher's label set
N_CLASSES = 10

LEARNING_RATE = 1e-2
FR_WEIGHT = 1e-3  # FKD feature regulariser, fixed: it only keeps the student features bounded
FKD_WEIGHTS = (3.0, 10.0, 30.0, 100.0)
KD_GRID = tuple({"T": t, "alpha": a} for t in (2.0, 4.0) for a in (0.5, 0.9))
SRD_WEIGHTS = (0.3, 1.0, 3.0, 10.0)

DEFAULT_EPOCHS = 60
DEFAULT_SEEDS = 5
DEFAULT_LABELS_PER_CLASS = 10
QUICK_EPOCHS = 2


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


# ----------------------------------------------------------------------------------- arguments


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _batch_size(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(
            f"must be >= 2 (relational losses need pairs), got {value}"
        )
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``fastkd demo`` (every one has help text); the description is this module's."""
    parser.description = __doc__.replace("``", "")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run in well under a minute: {QUICK_EPOCHS} epochs, 1 seed, short timings "
        "(the numbers are meaningless, the pipeline is the same)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="base seed (default 0): data split, few-label subset, teachers, grid search; the "
        "student seeds are SEED, SEED+1, ...",
    )
    parser.add_argument(
        "--seeds",
        type=_positive_int,
        default=None,
        help=f"number of student seeds for the chosen configs (default {DEFAULT_SEEDS}, "
        "1 with --quick)",
    )
    parser.add_argument(
        "--epochs",
        type=_positive_int,
        default=None,
        help=f"training epochs of every teacher and student (default {DEFAULT_EPOCHS}, "
        f"{QUICK_EPOCHS} with --quick)",
    )
    parser.add_argument(
        "--batch-size", type=_batch_size, default=64, help="training batch size, >= 2 (default 64)"
    )
    parser.add_argument(
        "--labels-per-class",
        type=_non_negative_int,
        default=DEFAULT_LABELS_PER_CLASS,
        help="labels per class the student sees in the few-label regime "
        f"(default {DEFAULT_LABELS_PER_CLASS}; 0 skips that regime)",
    )
    parser.add_argument(
        "--backend",
        default="auto",
        choices=("auto", "cpu", "triton", "reference"),
        help="fastkd backend of the distillation losses during training and in the timing "
        "(default auto: the compiled CPU kernels when built, else the reference). The demo runs "
        "on CPU tensors, so triton needs TRITON_INTERPRET=1 (slow)",
    )
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="torch CPU threads (default 1: the models are tiny, more threads mostly add "
        "synchronisation overhead)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("fastkd_demo_results"),
        help="folder for results.json, results.md and results.png (default ./fastkd_demo_results)",
    )
    parser.add_argument("--no-plot", action="store_true", help="do not write results.png")
    parser.add_argument(
        "--no-progress", action="store_true", help="hide the progress bars (the table is kept)"
    )


# ----------------------------------------------------------------------------------------- data


@dataclass
class Digits:
    """The three splits as float32 (N, 64) inputs in [0, 1] and int64 (N,) labels."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_data(seed: int) -> Digits:
    """load_digits split 60/20/20 (stratified, ``random_state=seed``)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0  # pixel values are 0..16
    y = torch.tensor(digits.target, dtype=torch.int64)
    idx = torch.arange(len(y)).numpy()
    rest, test = train_test_split(idx, test_size=0.2, stratify=y.numpy(), random_state=seed)
    train, val = train_test_split(rest, test_size=0.25, stratify=y[rest].numpy(), random_state=seed)
    parts = [torch.as_tensor(p) for p in (train, val, test)]
    return Digits(*(t for p in parts for t in (x[p], y[p])))


def few_label_mask(y: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """Bool (N,) mask keeping ``per_class`` random labels of each class (all if fewer)."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(y), dtype=torch.bool)
    for c in range(N_CLASSES):
        members = (y == c).nonzero().flatten()
        mask[members[torch.randperm(len(members), generator=gen)[:per_class]]] = True
    return mask


# --------------------------------------------------------------------------------------- models


class MLP(nn.Module):
    """ReLU MLP on (B, 64) inputs; ``forward`` returns (penultimate features, logits)."""

    def __init__(self, hidden: tuple[int, ...], n_classes: int = N_CLASSES):
        super().__init__()
        layers, width = [], 64
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, n_classes)
        self.feature_dim = width

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x)
        return features, self.head(features)


def describe(model: MLP) -> str:
    widths = [64] + [m.out_features for m in model.modules() if isinstance(m, nn.Linear)]
    return "-".join(map(str, widths))


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


# ------------------------------------------------------------------------------------- teachers


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


# ------------------------------------------------------------------------------------- students


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


def _config_text(config: dict) -> str:
    names = {"alpha": "α", "kd_weight": "kd_weight", "weight": "weight", "T": "T"}
    return ", ".join(f"{names[k]}={v:g}" for k, v in config.items()) or "-"


# --------------------------------------------------------------------------------------- timing


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


# --------------------------------------------------------------------------------------- report


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def _pct(mean: float, std: float | None = None) -> str:
    return f"{100 * mean:.1f}" if std is None else f"{100 * mean:.1f} ± {100 * std:.1f}"


def format_tables(result: dict) -> str:
    """The markdown tables printed at the end and written to results.md."""
    regimes = result["regimes"]
    settings, data, teachers = result["settings"], result["data"], result["teachers"]
    few = [r for k, r in regimes.items() if k != "all"]
    lines = [
        f"Test accuracy (%) of the student {result['student']} on load_digits (train "
        f"{data['train']} / val {data['val']} / test {data['test']}), mean ± std over "
        f"{settings['seeds']} seed(s), {settings['epochs']} epochs; each method's config chosen "
        f"on the validation split (seed {settings['seed']})."
        + (
            f" Few-label regime: the student sees {few[0]['labelled']} training labels, the "
            f"distillation terms all {data['train']} training images."
            if few
            else ""
        ),
        "",
        "| method | " + " | ".join(f"{r['label']} | config" for r in regimes.values()) + " |",
        "|---|" + "---:|---|" * len(regimes),
    ]
    teacher = teachers["teacher"]
    lines.append(
        f"| teacher {teacher['architecture']} (all labels, 1 seed) | "
        + " | ".join(f"{_pct(teacher['test_acc'])} | -" for _ in regimes)
        + " |"
    )
    for method in METHODS:
        cells = []
        for key in regimes:
            r = result["results"][key][method.key]
            cells.append(f"{_pct(r['test_mean'], r['test_std'])} | {_config_text(r['config'])}")
        lines.append(f"| {method.label} | " + " | ".join(cells) + " |")
    members = teachers["ensemble"]
    lines += [
        "",
        "Teacher ensemble "
        + " / ".join(m["architecture"] for m in members)
        + ": "
        + " / ".join(_pct(m["test_acc"]) for m in members)
        + f"% test accuracy; averaged probabilities {_pct(teachers['ensemble_test_acc'])}%.",
    ]

    cross = result["teachers"]["cross"]
    lines += [
        "",
        f"Cross-label case: the teacher {cross['architecture']} was trained on the "
        f"{cross['train_images']} training images of digits 0-4 only "
        f"({_pct(cross['test_acc_on_its_classes'])}% test accuracy on those digits); the student "
        "predicts all 10. Its 5 logits cannot be distilled into 10, its feature kernel can.",
        "",
        "| student | " + " | ".join(r["label"] for r in regimes.values()) + " |",
        "|---|" + "---:|" * len(regimes),
    ]
    for key in ("plain", "fkd_cross"):
        cells = []
        for regime in regimes:
            r = result["results"][regime][key]
            cells.append(_pct(r["test_mean"], r["test_std"]))
        label = "plain (CE only)" if key == "plain" else "FKD from the digits-0-4 teacher"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    lines += [
        "",
        "Distillation-loss call, forward + backward, µs per call (median of rounds, "
        f"{result['timing_clock']}, {settings['threads']} CPU thread(s)); fused = "
        f"--backend {settings['backend']}, reference = eager PyTorch (fastkd.reference):",
        "",
        "| loss | shapes | fused | reference | speed-up |",
        "|---|---|---:|---:|---:|",
    ]
    for row in result["timing"]:
        if row["fused_us"] is None:
            fused, speedup = "n/a (not in this build)", "-"
        else:
            fused = f"{row['fused_us']:.0f} ({row['fused_backend']}, {row['algorithm']})"
            speedup = f"{row['speedup']:.2f}x"
        lines.append(
            f"| {row['loss']} | {row['shapes']} | {fused} | {row['reference_us']:.0f} | {speedup} |"
        )
    return "\n".join(lines)


PLOT_LABELS = {
    "plain": "plain\n(CE only)",
    "kd": "vanilla\nKD",
    "fkd": "FKD",
    "fkd_ensemble": "FKD\nensemble",
    "srd": "SRD",
    "fkd_cross": "FKD from\n0-4 teacher",
}


def plot(result: dict, path: Path) -> None:
    """Two panels: test accuracy per method and regime (error bars: std over seeds), and the
    fused-over-reference speed-up of each distillation-loss call (annotated with both times)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = result["regimes"]
    settings = result["settings"]
    fig, (ax_acc, ax_time) = plt.subplots(
        1, 2, figsize=(14, 5.2), gridspec_kw={"width_ratios": [1.45, 1]}
    )

    # Accuracy: one group of bars per method, one bar per regime.
    colors = ("#4C72B0", "#DD8452")
    width = 0.8 / len(regimes)
    low = 1.0
    for i, (key, regime) in enumerate(regimes.items()):
        means = [result["results"][key][m.key]["test_mean"] for m in METHODS]
        stds = [result["results"][key][m.key]["test_std"] for m in METHODS]
        low = min([low, *means])
        xs = [j + (i - (len(regimes) - 1) / 2) * width for j in range(len(METHODS))]
        ax_acc.bar(
            xs,
            [100 * v for v in means],
            width,
            yerr=[100 * s for s in stds],
            capsize=3,
            color=colors[i % len(colors)],
            label=f"student, {regime['label']}",
        )
        for x, mean in zip(xs, means, strict=True):  # values at the foot of the bars
            ax_acc.text(
                x,
                0.012,
                f"{100 * mean:.1f}",
                ha="center",
                va="bottom",
                fontsize=7.5,
                color="white",
                transform=ax_acc.get_xaxis_transform(),
            )
    teacher = 100 * result["teachers"]["teacher"]["test_acc"]
    ax_acc.axhline(teacher, color="k", ls="--", lw=1, label=f"teacher ({teacher:.1f}%)")
    bottom = max(0.0, math.floor(100 * low / 5) * 5 - 5)
    ax_acc.set_ylim(bottom, 100)
    ax_acc.set_xticks(range(len(METHODS)))
    ax_acc.set_xticklabels([PLOT_LABELS[m.key] for m in METHODS])
    ax_acc.set_ylabel(f"test accuracy (%), axis from {bottom:.0f}")
    ax_acc.set_title(
        f"Student {result['student']} on load_digits: mean ± std over {settings['seeds']} seed(s)",
        fontsize=11,
    )
    ax_acc.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, frameon=False)
    ax_acc.grid(axis="y", alpha=0.3)

    # Timing: speed-up bars, 1x line, both times written next to each bar.
    rows = result["timing"]
    ys = list(range(len(rows)))
    speedups = [r["speedup"] or 0.0 for r in rows]
    bar_colors = ["#55A868" if (s or 0) >= 1 else "#C44E52" for s in speedups]
    ax_time.barh(ys, speedups, 0.6, color=bar_colors)
    ax_time.axvline(1.0, color="k", lw=1)
    top = max([2.0, *speedups]) * 1.8
    for y, r in zip(ys, rows, strict=True):
        if r["fused_us"] is None:
            text = f"no fused kernel in this build\nreference {r['reference_us']:,.0f} µs"
        else:
            text = (
                f"{r['speedup']:.2f}x ({r['fused_backend']}, {r['algorithm']})\n"
                f"fused {r['fused_us']:,.0f} µs, reference {r['reference_us']:,.0f} µs"
            )
        x = (r["speedup"] or 0.0) + 0.03 * top
        ax_time.text(x, y, text, va="center", fontsize=8, bbox={"fc": "white", "ec": "none"})
    ax_time.set_xlim(0, top)
    ax_time.set_yticks(ys)
    ax_time.set_yticklabels([f"{r['loss']}\nB={r['batch']}" for r in rows], fontsize=9)
    ax_time.invert_yaxis()
    ax_time.set_xlabel("speed-up of the fused loss over the reference (forward + backward)")
    ax_time.set_title(
        f"Distillation-loss call, {result['timing_clock']}, {settings['threads']} thread(s)",
        fontsize=11,
    )
    ax_time.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# ------------------------------------------------------------------------------------------ run


def run(args: argparse.Namespace) -> int:
    """Run the demo; prints the tables and writes results.{json,md,png} to ``args.out``.

    Returns the exit status: 0, or 2 when the demo extras are missing or ``--backend`` cannot
    run here. The torch thread count is restored afterwards (the demo may run in-process).
    """
    try:
        import matplotlib  # noqa: F401
        import sklearn  # noqa: F401
        import tqdm  # noqa: F401
    except ImportError as exc:
        print(f"fastkd demo needs the demo extras: pip install 'fastkd[demo]' ({exc})")
        return 2
    try:
        fastkd.resolve_backend("fkd", args.backend, torch.device("cpu"))
    except (fastkd.BackendUnavailableError, ValueError) as exc:
        print(f"fastkd demo: --backend {args.backend}: {exc}")
        return 2
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        result = _run(args)
    finally:
        torch.set_num_threads(threads)
    return 0 if result else 1


def _run(args: argparse.Namespace) -> dict:
    import sklearn
    from tqdm import tqdm

    started, cpu_started = time.perf_counter(), time.process_time()
    epochs = args.epochs or (QUICK_EPOCHS if args.quick else DEFAULT_EPOCHS)
    seeds = args.seeds or (1 if args.quick else DEFAULT_SEEDS)
    data = load_data(args.seed)
    n_train = len(data.y_train)
    regimes = {"all": {"label": "all labels", "mask": torch.ones(n_train, dtype=torch.bool)}}
    if args.labels_per_class:
        mask = few_label_mask(data.y_train, args.labels_per_class, args.seed)
        regimes["few"] = {"label": f"{args.labels_per_class} labels/class", "mask": mask}

    hide = args.no_progress
    with tqdm(total=len(ENSEMBLE_WIDTHS) + 1, desc="teachers", unit="model", disable=hide) as bar:
        teachers = train_teachers(data, args.seed, epochs, args.batch_size, bar)

    cache: dict[tuple, tuple[float, float]] = {}  # the grid's seed is reused by the final runs

    def run_one(regime: str, method: str, config: dict, seed: int) -> tuple[float, float]:
        key = (regime, method, json.dumps(config, sort_keys=True), seed)
        if key not in cache:
            mask = regimes[regime]["mask"]
            cache[key] = train_student(
                data, teachers, method, config, seed, mask, epochs, args.batch_size, args.backend
            )
        return cache[key]

    grid: dict = {r: {m.key: [] for m in METHODS} for r in regimes}
    grid_runs = [(r, m.key, c) for r in regimes for m in METHODS for c in m.grid]
    with tqdm(grid_runs, desc="grid search (validation)", unit="run", disable=hide) as bar:
        for regime, method, config in bar:
            bar.set_postfix_str(f"{regime}: {method} {_config_text(config)}")
            val, _ = run_one(regime, method, config, args.seed)
            grid[regime][method].append({"config": config, "val_acc": val})

    # Best validation accuracy; max() gives ties to the earlier grid entry.
    results: dict = {
        r: {
            m: {
                "config": max(runs, key=lambda g: g["val_acc"])["config"],
                "val_acc": [],
                "test_acc": [],
            }
            for m, runs in grid[r].items()
        }
        for r in regimes
    }
    seed_list = [args.seed + i for i in range(seeds)]
    final_runs = [(r, m.key, s) for r in regimes for m in METHODS for s in seed_list]
    with tqdm(final_runs, desc="chosen configs (test)", unit="run", disable=hide) as bar:
        for regime, method, seed in bar:
            bar.set_postfix_str(f"{regime}: {method} seed {seed}")
            entry = results[regime][method]
            val, test = run_one(regime, method, entry["config"], seed)
            entry["val_acc"].append(val)
            entry["test_acc"].append(test)
    for per_method in results.values():
        for entry in per_method.values():
            entry["seeds"] = seed_list
            entry["test_mean"], entry["test_std"] = _mean_std(entry["test_acc"])

    with tqdm(total=1, desc="loss timing", unit="table", disable=hide) as bar:
        timing = time_losses(data, teachers, args.batch_size, args.backend, args.quick, args.seed)
        bar.update()

    result = {
        "settings": {
            "seed": args.seed,
            "seeds": seeds,
            "epochs": epochs,
            "batch_size": args.batch_size,
            "learning_rate": LEARNING_RATE,
            "fr_weight": FR_WEIGHT,
            "labels_per_class": args.labels_per_class,
            "backend": args.backend,
            "fkd_backend": fastkd.resolve_backend("fkd", args.backend, torch.device("cpu")),
            "threads": args.threads,
            "quick": args.quick,
        },
        "versions": {
            "fastkd": fastkd.__version__,
            "torch": torch.__version__,
            "sklearn": sklearn.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
        },
        "data": {
            "dataset": "sklearn.datasets.load_digits",
            "train": n_train,
            "val": len(data.y_val),
            "test": len(data.y_test),
        },
        "student": describe(MLP(STUDENT_WIDTHS)),
        "teachers": teachers.report,
        "methods": [{"key": m.key, "label": m.label, "grid": list(m.grid)} for m in METHODS],
        "regimes": {
            k: {"label": v["label"], "labelled": int(v["mask"].sum())} for k, v in regimes.items()
        },
        "grid": grid,
        "results": results,
        "timing": timing,
        "timing_clock": timing_clock()[1],
    }

    args.out.mkdir(parents=True, exist_ok=True)
    tables = format_tables(result)
    written = [args.out / "results.json", args.out / "results.md"]
    written[1].write_text(tables + "\n")
    if not args.no_plot:
        written.append(args.out / "results.png")
        plot(result, written[2])
    result["runtime_s"] = time.perf_counter() - started
    result["cpu_time_s"] = time.process_time() - cpu_started
    written[0].write_text(json.dumps(result, indent=2) + "\n")
    print("\n" + tables + "\n")
    print(
        f"Finished in {result['runtime_s']:.0f} s (CPU time {result['cpu_time_s']:.0f} s). "
        f"Wrote {', '.join(map(str, written))}."
    )
    return result
