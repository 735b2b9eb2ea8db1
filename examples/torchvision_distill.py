"""Distil a torchvision student from a torchvision teacher with fastkd's FKD + SRD losses.

    python examples/torchvision_distill.py                          # FakeData, B = 64..1024
    python examples/torchvision_distill.py --data ~/data/imagenette --image-size 160
    python examples/torchvision_distill.py --data ~/data/cifar100 --batch-sizes 256 --steps 50

Student and teacher come from ``torchvision.models`` (no pretrained weights unless
``--teacher-ckpt``); their penultimate features (the node before the classifier, e.g. ResNet's
``flatten``) and logits are read with ``torchvision.models.feature_extraction
.create_feature_extractor``. The loss is ``CE + kd_weight * FKD(fs, ft) + srd_weight * SRD(fs, ft)``
with :func:`fastkd.fkd_loss` and :class:`fastkd.SRDLoss` (its Linear projector is trained with
the student). ``--data DIR`` reads a CIFAR-100 folder (``DIR/cifar-100-python``) or an
ImageFolder; without it, or when DIR is neither, torchvision's FakeData. Nothing is downloaded.

For every batch size B and for the fused losses (backend "auto") against the eager reference
(backend "reference"), from the same initial weights, it reports the time per step and the peak
memory of the model part (teacher and student forward, student backward, optimiser step) and of
the loss part (the KD losses' forward and backward on detached features). Peak memory is the
CUDA allocator's peak on a GPU and the growth of the peak resident set size on a CPU (Linux;
memory the allocator already holds is not counted there).

``--global-batch`` passes ``global_batch=True`` to the fastkd losses when this fastkd has it
(launch with ``torchrun --nproc_per_node=N``; the student is wrapped in DistributedDataParallel).
"""

from __future__ import annotations

import argparse
import copy
import inspect
import itertools
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torchvision import transforms
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import fastkd

MIB = 1 << 20
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------- data


def make_dataset(data: str | None, image_size: int, num_classes: int, fake_size: int):
    """(dataset, description): CIFAR-100 folder, ImageFolder, or FakeData; never downloads."""
    tf = transforms.Compose(
        [
            transforms.Resize(image_size),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    if data is not None:
        root = Path(data).expanduser()
        if (root / "cifar-100-python").is_dir():
            dataset = torchvision.datasets.CIFAR100(str(root), train=True, transform=tf)
            return dataset, f"CIFAR-100 at {root}"
        if root.is_dir() and any(p.is_dir() for p in root.iterdir()):
            dataset = torchvision.datasets.ImageFolder(str(root), transform=tf)
            return dataset, f"ImageFolder at {root} ({len(dataset.classes)} classes)"
        print(f"--data {root}: neither a CIFAR-100 folder nor an ImageFolder; using FakeData")
    dataset = torchvision.datasets.FakeData(
        size=fake_size,
        image_size=(3, image_size, image_size),
        num_classes=num_classes,
        transform=transforms.ToTensor(),
    )
    return dataset, f"FakeData ({fake_size} images {image_size}x{image_size})"


def batches(dataset, batch_size: int, seed: int):
    """Endless shuffled batches (the loader restarts), full batches only."""
    gen = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, drop_last=True, generator=gen
    )
    if len(loader) == 0:
        raise ValueError(
            f"the dataset has {len(dataset)} images, fewer than a batch of {batch_size}"
        )
    return itertools.chain.from_iterable(itertools.repeat(loader))


# ----------------------------------------------------------------------------- models


def feature_extractor(model: torch.nn.Module, feature_node: str | None):
    """GraphModule returning {'features': penultimate node, 'logits': output node}."""
    train_nodes, _ = get_graph_node_names(model)
    node = feature_node or train_nodes[-2]
    if node not in train_nodes:
        raise ValueError(f"--feature-node {node!r} is not a node of the model: {train_nodes[-6:]}")
    return create_feature_extractor(model, {node: "features", train_nodes[-1]: "logits"})


@torch.no_grad()
def feature_width(extractor, image_size: int, device) -> int:
    was_training = extractor.training
    extractor.eval()
    out = extractor(torch.zeros(2, 3, image_size, image_size, device=device))
    extractor.train(was_training)
    return out["features"].flatten(1).shape[1]


def collective_kwargs(global_batch: bool) -> dict:
    if not global_batch:
        return {}
    if "global_batch" not in inspect.signature(fastkd.fkd_loss).parameters:
        raise SystemExit("--global-batch: this fastkd has no global_batch= argument yet")
    return {"global_batch": True}


# ----------------------------------------------------------------------------- measurement


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak extra memory of a code section: CUDA allocator peak, or peak RSS growth (Linux)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.base = None

    def start(self) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        try:  # "5" resets the process's peak RSS (VmHWM) to the current RSS
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.base = None
            return
        self.base = _proc_status_kib("VmRSS")

    def peak_mib(self) -> float | None:
        if self.base is None:
            return None
        if self.device.type == "cuda":
            sync(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - self.base) / MIB
        peak = _proc_status_kib("VmHWM")
        return None if peak is None else max(peak - self.base, 0) * 1024 / MIB


def run(args, backend: str, batch_size: int, models, dataset, device, progress) -> dict:
    """``args.warmup + args.steps`` training steps; medians of the measured ones."""
    teacher, student0, srd0 = models
    student = copy.deepcopy(student0)
    collective = collective_kwargs(args.global_batch)
    srd = fastkd.SRDLoss(
        srd0.student_dim, srd0.teacher_dim, backend=backend, device=device, **collective
    )
    srd.load_state_dict(srd0.state_dict())  # the same projector for every run
    if collective and torch.distributed.is_initialized():
        student = torch.nn.parallel.DistributedDataParallel(student)
    params = list(student.parameters()) + list(srd.parameters())
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=5e-4)
    meter = PeakMemory(device)
    rows = {"model_ms": [], "loss_ms": [], "model_mib": [], "loss_mib": [], "loss": []}
    stream = batches(dataset, batch_size, args.seed)
    for step in range(args.warmup + args.steps):
        images, labels = next(stream)
        images, labels = images.to(device), labels.to(device)
        sync(device)
        meter.start()
        t0 = time.perf_counter()
        with torch.no_grad():
            t_out = teacher(images)
        s_out = student(images)
        fs, ft = s_out["features"].flatten(1), t_out["features"].flatten(1)
        ce = F.cross_entropy(s_out["logits"], labels)
        sync(device)
        t1 = time.perf_counter()
        model_mib = meter.peak_mib()
        # The KD losses on detached features: their time and memory alone.
        meter.start()
        leaf = fs.detach().requires_grad_(True)
        fkd = fastkd.fkd_loss(
            leaf, ft, args.kd_weight, args.fr_weight, backend=backend, **collective
        )
        kd = fkd + args.srd_weight * srd(leaf, ft)
        kd.backward()
        sync(device)
        t2 = time.perf_counter()
        loss_mib = meter.peak_mib()
        meter.start()
        torch.autograd.backward([fs, ce], [leaf.grad, torch.ones_like(ce)])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        t3 = time.perf_counter()
        backward_mib = meter.peak_mib()
        progress.update(1)
        total = float(kd.detach()) + float(ce.detach())
        progress.set_postfix(B=batch_size, backend=backend, loss=f"{total:.4f}")
        if step < args.warmup:
            continue
        rows["model_ms"].append(1e3 * ((t1 - t0) + (t3 - t2)))
        rows["loss_ms"].append(1e3 * (t2 - t1))
        if model_mib is not None and backward_mib is not None:
            rows["model_mib"].append(max(model_mib, backward_mib))
        if loss_mib is not None:
            rows["loss_mib"].append(loss_mib)
        rows["loss"].append(total)
    result = {"batch": batch_size, "backend": backend, "steps": args.steps}
    for key in ("model_ms", "loss_ms"):
        result[key] = statistics.median(rows[key])
    for key in ("model_mib", "loss_mib"):
        result[key] = max(rows[key]) if rows[key] else None
    result["losses"] = rows["loss"]
    return result


def table(results: list[dict]) -> str:
    def mib(x):
        return "n/a" if x is None else f"{x:.1f}"

    lines = [
        "| B | losses | model ms/step | loss ms/step | model peak MiB | loss peak MiB | loss |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['batch']} | {'fused' if r['backend'] == 'auto' else r['backend']} "
            f"| {r['model_ms']:.1f} | {r['loss_ms']:.2f} | {mib(r['model_mib'])} "
            f"| {mib(r['loss_mib'])} | {r['losses'][-1]:.4f} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="CIFAR-100 folder or ImageFolder (else FakeData)")
    p.add_argument("--student", default="resnet18", help="torchvision.models name")
    p.add_argument("--teacher", default="resnet34", help="torchvision.models name")
    p.add_argument("--teacher-ckpt", default=None, help="state_dict of a trained teacher")
    p.add_argument("--feature-node", default=None, help="default: the node before the output")
    p.add_argument("--num-classes", type=int, default=100, help="FakeData classes")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-sizes", default="64,128,256,512,1024")
    p.add_argument("--backends", default="auto,reference", help="fused ('auto') vs reference")
    p.add_argument("--steps", type=int, default=5, help="measured steps per configuration")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--kd-weight", type=float, default=1.0)
    p.add_argument("--fr-weight", type=float, default=0.0)
    p.add_argument("--srd-weight", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--global-batch", action="store_true", help="global-batch losses (torchrun)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    from tqdm import tqdm

    args = parse_args(argv)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    backends = [b for b in args.backends.split(",") if b]
    if any(b < 2 for b in batch_sizes):
        raise SystemExit("--batch-sizes: FKD and SRD need batches of at least 2")
    collective_kwargs(args.global_batch)  # fail early
    if args.global_batch and "RANK" in os.environ and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    dataset, description = make_dataset(
        args.data, args.image_size, args.num_classes, fake_size=2 * max(batch_sizes)
    )
    num_classes = len(getattr(dataset, "classes", [])) or args.num_classes
    teacher = torchvision.models.get_model(args.teacher, weights=None, num_classes=num_classes)
    if args.teacher_ckpt:
        teacher.load_state_dict(torch.load(args.teacher_ckpt, map_location="cpu"))
    student = torchvision.models.get_model(args.student, weights=None, num_classes=num_classes)
    teacher = feature_extractor(teacher, args.feature_node).to(device).eval()
    student = feature_extractor(student, args.feature_node).to(device).train()
    ds = feature_width(student, args.image_size, device)
    dt = feature_width(teacher, args.image_size, device)
    srd = fastkd.SRDLoss(ds, dt, device=device, **collective_kwargs(args.global_batch))
    usable = [name for name, info in fastkd.available_backends().items() if info["available"]]
    print(
        f"{args.student} ({ds} features) from {args.teacher} ({dt}) on {description}, "
        f"device {device}; fastkd backends here: {', '.join(usable)}"
    )
    total = len(batch_sizes) * len(backends) * (args.warmup + args.steps)
    results = []
    with tqdm(total=total, unit="step", disable=args.no_progress) as progress:
        for batch_size in batch_sizes:
            for backend in backends:
                results.append(
                    run(
                        args,
                        backend,
                        batch_size,
                        (teacher, student, srd),
                        dataset,
                        device,
                        progress,
                    )
                )
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
