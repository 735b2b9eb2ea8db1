"""Models of ``fastkd demo``: ReLU MLPs on the 64 pixels, returning (features, logits)."""

from __future__ import annotations

import torch
from torch import nn

from fastkd.demo.data import N_CLASSES

STUDENT_WIDTHS = (32,)
TEACHER_WIDTHS = (256, 256)
ENSEMBLE_WIDTHS = ((128, 128), (256, 256), (512, 512))  # the middle member is the main teacher
CROSS_CLASSES = (0, 1, 2, 3, 4)  # the cross-label teacher's label set


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
