"""CPU smoke run of examples/torchvision_distill.py: tiny images, a few steps, fused and reference
losses from the same weights on the same batches."""

from __future__ import annotations

import importlib.util
import inspect
import math
from pathlib import Path

import pytest

pytest.importorskip("torchvision")
pytest.importorskip("tqdm")

import fastkd  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "torchvision_distill.py"
TINY = ["--device", "cpu", "--image-size", "16", "--student", "resnet18", "--teacher", "resnet18"]
TINY += ["--no-progress", "--seed", "3"]


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("torchvision_distill", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fakedata_fused_and_reference(example, capsys):
    args = TINY + ["--batch-sizes", "4", "--steps", "2", "--warmup", "0", "--num-classes", "5"]
    results = example.main(args)
    out = capsys.readouterr().out
    assert "FakeData" in out and "| B | losses |" in out
    assert [(r["batch"], r["backend"]) for r in results] == [(4, "auto"), (4, "reference")]
    for r in results:
        assert r["model_ms"] > 0 and r["loss_ms"] > 0
        assert len(r["losses"]) == 2 and all(math.isfinite(v) for v in r["losses"])
    fused, ref = results[0]["losses"][0], results[1]["losses"][0]
    # Same weights, same first batch: CE + FKD + SRD agree to float32 roundoff.
    assert fused == pytest.approx(ref, rel=1e-4)


def test_imagefolder_data(example, tmp_path, capsys):
    from PIL import Image

    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for i in range(3):
            color = (40 * i, 100 if label == "cat" else 200, 7)
            Image.new("RGB", (20, 24), color).save(tmp_path / label / f"{i}.png")
    args = TINY + ["--data", str(tmp_path), "--batch-sizes", "3", "--steps", "1"]
    results = example.main(args + ["--warmup", "0", "--backends", "auto"])
    assert "ImageFolder" in capsys.readouterr().out
    assert len(results) == 1 and math.isfinite(results[0]["losses"][0])


def test_data_dir_that_is_not_a_dataset_falls_back_to_fakedata(example):
    dataset, description = example.make_dataset("/nonexistent/dir", 8, 3, fake_size=4)
    assert description.startswith("FakeData") and len(dataset) == 4


def test_bad_arguments(example):
    with pytest.raises(SystemExit, match="at least 2"):
        example.main(TINY + ["--batch-sizes", "1"])
    with pytest.raises(ValueError, match="feature-node"):
        import torchvision

        example.feature_extractor(torchvision.models.resnet18(), "no_such_node")
    if "global_batch" not in inspect.signature(fastkd.fkd_loss).parameters:
        with pytest.raises(SystemExit, match="global_batch"):
            example.main(TINY + ["--batch-sizes", "2", "--global-batch"])
    else:  # without torchrun there is no process group: fastkd must say so
        with pytest.raises((RuntimeError, ValueError)):
            example.main(TINY + ["--batch-sizes", "2", "--steps", "1", "--global-batch"])
