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

# Layout (this docstring is the --help text, so it is kept here): data (load_digits splits,
# few-label masks), models (the MLPs), train (methods, training loop, teachers and students),
# timing (the loss-call timing), report (tables and plot), cli (options and the run).

from fastkd.demo.cli import (
    DEFAULT_EPOCHS,
    DEFAULT_LABELS_PER_CLASS,
    DEFAULT_SEEDS,
    QUICK_EPOCHS,
    add_arguments,
    run,
)
from fastkd.demo.data import N_CLASSES, Digits, few_label_mask, load_data
from fastkd.demo.models import (
    CROSS_CLASSES,
    ENSEMBLE_WIDTHS,
    MLP,
    STUDENT_WIDTHS,
    TEACHER_WIDTHS,
    describe,
)
from fastkd.demo.report import format_tables, plot
from fastkd.demo.timing import time_losses, timing_clock
from fastkd.demo.train import (
    FKD_WEIGHTS,
    FR_WEIGHT,
    KD_GRID,
    LEARNING_RATE,
    METHOD_KEYS,
    METHODS,
    SRD_WEIGHTS,
    Method,
    Teachers,
    accuracy,
    fit,
    masked_cross_entropy,
    train_student,
    train_teachers,
)

__all__ = [
    "CROSS_CLASSES",
    "DEFAULT_EPOCHS",
    "DEFAULT_LABELS_PER_CLASS",
    "DEFAULT_SEEDS",
    "ENSEMBLE_WIDTHS",
    "FKD_WEIGHTS",
    "FR_WEIGHT",
    "KD_GRID",
    "LEARNING_RATE",
    "METHODS",
    "METHOD_KEYS",
    "MLP",
    "Digits",
    "Method",
    "N_CLASSES",
    "QUICK_EPOCHS",
    "SRD_WEIGHTS",
    "STUDENT_WIDTHS",
    "TEACHER_WIDTHS",
    "Teachers",
    "accuracy",
    "add_arguments",
    "describe",
    "few_label_mask",
    "fit",
    "format_tables",
    "load_data",
    "masked_cross_entropy",
    "plot",
    "run",
    "time_losses",
    "timing_clock",
    "train_student",
    "train_teachers",
]
