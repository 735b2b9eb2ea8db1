"""Data of ``fastkd demo``: scikit-learn's load_digits split 60/20/20, few-label masks.

scikit-learn is imported only when the data is loaded (it is a demo extra).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

N_CLASSES = 10


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
