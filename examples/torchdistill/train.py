"""Train a student with one of this folder's torchdistill configs (fastkd losses by key).

    cd examples/torchdistill && python train.py --config fkd_resnet18_from_resnet34.yaml --steps 20

Loads the YAML with torchdistill's own loader, imports the config's ``dependencies`` (which
registers fastkd's losses), builds the torchvision models and torchdistill's
``DistillationBox`` and runs its training steps (the loop of torchdistill's
``examples/torchvision/image_classification.py`` without evaluation or checkpoints). torchdistill's
example script runs these configs as well.
"""

from __future__ import annotations

import argparse
import itertools
import os

import torch
from torchdistill.common import yaml_util
from torchdistill.common.main_util import import_dependencies, load_ckpt
from torchdistill.core.distillation import get_distillation_box
from torchdistill.models.official import get_image_classification_model
from torchdistill.models.registry import get_model


def load_config(path: str) -> dict:
    """The YAML through torchdistill's loader (datasets are built here), then its dependencies."""
    config = yaml_util.load_yaml_file(os.path.expanduser(path))
    import_dependencies(config.get("dependencies", None))
    return config


def load_model(model_config: dict, device: torch.device) -> torch.nn.Module:
    """A torchvision classifier (or a torchdistill-registered model), checkpoint if given."""
    model = get_image_classification_model(model_config, distributed=False)
    if model is None:
        model = get_model(
            model_config["key"], model_config.get("repo_or_dir"), **model_config["kwargs"]
        )
    src_ckpt = model_config.get("src_ckpt")
    if src_ckpt:
        load_ckpt(src_ckpt, model=model, strict=True)
    return model.to(device)


def build_box(config: dict, device: torch.device):
    """torchdistill's DistillationBox for ``config['train']`` (single process)."""
    models = config["models"]
    teacher = load_model(models["teacher_model"], device)
    student = load_model(models["student_model"], device)
    box = get_distillation_box(
        teacher, student, config["datasets"], config["train"], device, None, False, 1
    )
    return box, teacher, student


def train_steps(box, device: torch.device, steps: int, progress: bool = False) -> list[float]:
    """``steps`` training steps (the data loader is restarted as needed); returns the losses."""
    box.pre_epoch_process(epoch=0)
    batches = itertools.chain.from_iterable(itertools.repeat(box.train_data_loader))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc="train", unit="step")
    losses = []
    for sample_batch, targets, supp_dict in itertools.islice(batches, steps):
        loss = box.forward_process(sample_batch.to(device), targets.to(device), supp_dict)
        box.post_forward_process(loss=loss)
        losses.append(float(loss.detach()))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {losses[-1]} at step {len(losses)}")
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    if bar is not None:
        bar.close()
    return losses


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config path")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=None, help="default: num_epochs epochs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    config = load_config(args.config)
    box, _, _ = build_box(config, device)
    steps = args.steps or box.num_epochs * len(box.train_data_loader)
    losses = train_steps(box, device, steps, progress=True)
    print(f"first loss {losses[0]:.4f}, last loss {losses[-1]:.4f} over {len(losses)} steps")
    return losses


if __name__ == "__main__":
    main()
