"""Distillation under DistributedDataParallel with global-batch FKD + SRD (``global_batch=True``).

    torchrun --nproc_per_node=2 examples/ddp_distill.py            # gloo on CPU
    torchrun --nproc_per_node=4 examples/ddp_distill.py --epochs 40
    torchrun --nproc_per_node=8 examples/ddp_distill.py --device cuda   # NCCL, one GPU per rank

Data: scikit-learn's bundled ``load_digits`` (1797 8x8 digits, no download), split 80/20.
Every rank trains the same teacher MLP (same seed, full training set: cheap, and identical
without communication), then the student MLP trains under DDP on its share of each global batch
with ``cross-entropy + fkd_weight * FKD + srd_weight * SRD``. The FKD and SRD terms are over the
GLOBAL batch (all ranks' rows; the last batch is split unevenly), so the run computes the same
losses as one process with batch ``W x --batch-size``: ``fastkd.FKDLoss(global_batch=True)`` (the
``auto`` plan of :func:`fastkd.distributed.explain_global_fkd` is printed once) and
``fastkd.SRDLoss(..., global_batch=True)`` (running statistics synchronised like
nn.SyncBatchNorm). Rank 0 prints the test accuracy of the teacher and of the student.
"""

from __future__ import annotations

import argparse
import datetime
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import fastkd
from fastkd import distributed as fd


class MLP(nn.Module):
    """x (B, 64) -> (features (B, width), logits (B, 10))."""

    def __init__(self, width: int, depth: int = 2):
        super().__init__()
        layers, d = [], 64
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.ReLU()]
            d = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        f = self.body(x)
        return f, self.head(f)


class Student(nn.Module):
    """The student and its SRD projector/running statistics, wrapped together by DDP."""

    def __init__(self, width: int, teacher_width: int):
        super().__init__()
        self.net = MLP(width)
        self.srd = fastkd.SRDLoss(width, teacher_width, global_batch=True)

    def forward(self, x, teacher_features=None):
        features, logits = self.net(x)
        srd = None if teacher_features is None else self.srd(features, teacher_features)
        return features, logits, srd


def load(device):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    return xtr.to(device), ytr.to(device), xte.to(device), yte.to(device)


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    out = model(x)[1].argmax(1)
    model.train()
    return (out == y).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64, help="per rank")
    parser.add_argument("--fkd-weight", type=float, default=5.0)
    parser.add_argument("--srd-weight", type=float, default=0.5)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)  # W processes share the cores
    dist.init_process_group(
        "nccl" if args.device == "cuda" else "gloo", timeout=datetime.timedelta(seconds=120)
    )
    rank, world = dist.get_rank(), dist.get_world_size()
    xtr, ytr, xte, yte = load(device)

    # Teacher: identical on every rank (same seed, full training set), no communication.
    torch.manual_seed(args.seed)
    teacher = MLP(256).to(device)
    opt = torch.optim.Adam(teacher.parameters(), lr=1e-3)
    for _ in range(30):
        for idx in torch.randperm(len(xtr), device=device).split(128):
            opt.zero_grad()
            F.cross_entropy(teacher(xtr[idx])[1], ytr[idx]).backward()
            opt.step()
    teacher.eval()

    torch.manual_seed(args.seed + 1)
    student = DDP(Student(32, 256).to(device))
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    planned = False
    fkd_loss = fastkd.FKDLoss(global_batch=True)  # a collective: every rank calls it
    for epoch in range(args.epochs):
        # One global permutation (same seed on every rank), cut into global batches of
        # W x batch-size rows; rank r takes the r-th of W near-equal chunks, so the last global
        # batch gives the ranks uneven local batches and the global batch is always the
        # concatenation of the local ones in rank order.
        order = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(epoch))
        for global_idx in order.to(device).split(world * args.batch_size):
            if len(global_idx) < 2 * world:  # (same on every rank) a sliver: skip it
                continue
            idx = global_idx.tensor_split(world)[rank]
            with torch.no_grad():
                t_features, _ = teacher(xtr[idx])
            features, logits, srd = student(xtr[idx], t_features)
            if not planned:
                plan = fd.explain_global_fkd(features, t_features)
                if rank == 0:
                    print(f"global FKD plan: {plan.algorithm} ({plan.reason})")
                planned = True
            fkd = fkd_loss(features, t_features)
            loss = F.cross_entropy(logits, ytr[idx]) + args.fkd_weight * fkd
            loss = loss + args.srd_weight * srd
            opt.zero_grad()
            loss.backward()
            opt.step()
        if rank == 0 and (epoch + 1) % 5 == 0:
            print(
                f"epoch {epoch + 1:3d}  fkd {fkd.item():.4f}  srd {srd.item():.3f}  "
                f"test acc {accuracy(student.module.net, xte, yte):.3f}"
            )
    if rank == 0:
        print(
            f"W={world}: teacher test acc {accuracy(teacher, xte, yte):.3f}, "
            f"student test acc {accuracy(student.module.net, xte, yte):.3f}"
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
