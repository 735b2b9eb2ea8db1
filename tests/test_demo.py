"""``fastkd demo``: the quick run end to end (table, JSON, PNG), determinism, options, data."""

from __future__ import annotations

import argparse
import contextlib
import io
import json

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

import fastkd  # noqa: E402
from fastkd import demo, reference  # noqa: E402
from fastkd.cli import main  # noqa: E402

OPTIONS = (
    "--quick",
    "--seed",
    "--seeds",
    "--epochs",
    "--batch-size",
    "--labels-per-class",
    "--backend",
    "--threads",
    "--out",
    "--no-plot",
    "--no-progress",
)


def run_demo(*argv: str) -> tuple[int, str, str]:
    """``fastkd demo *argv`` in-process; returns (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(["demo", *argv])
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One --quick run with progress bars: (exit status, stdout, stderr, out dir, result)."""
    out_dir = tmp_path_factory.mktemp("demo")
    threads = torch.get_num_threads()
    status, stdout, stderr = run_demo("--quick", "--out", str(out_dir))
    assert torch.get_num_threads() == threads  # restored after the run
    result = json.loads((out_dir / "results.json").read_text())
    return status, stdout, stderr, out_dir, result


def test_help_lists_every_option_with_text(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in OPTIONS:
        assert option in text
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no help text"


def test_quick_run_succeeds_with_progress_bars(quick):
    status, _, stderr, out_dir, _ = quick
    assert status == 0
    for stage in ("teachers", "grid search (validation)", "chosen configs (test)", "loss timing"):
        assert stage in stderr


def test_quick_json_is_well_formed(quick):
    *_, result = quick
    assert result["settings"]["quick"] is True
    assert result["settings"]["seeds"] == 1
    assert result["settings"]["threads"] == 1
    assert result["settings"]["epochs"] == demo.QUICK_EPOCHS
    data = result["data"]
    assert (data["train"], data["val"], data["test"]) == (1077, 360, 360)
    assert set(result["regimes"]) == {"all", "few"}
    assert result["regimes"]["all"]["labelled"] == 1077
    assert result["regimes"]["few"]["labelled"] == 10 * demo.DEFAULT_LABELS_PER_CLASS
    for member in result["teachers"]["ensemble"] + [result["teachers"]["teacher"]]:
        assert 0.0 <= member["test_acc"] <= 1.0 and 0.0 <= member["val_acc"] <= 1.0
    assert 0.0 <= result["teachers"]["cross"]["test_acc_on_its_classes"] <= 1.0
    for regime in ("all", "few"):
        assert set(result["results"][regime]) == set(demo.METHOD_KEYS)
        for method in demo.METHODS:
            entry = result["results"][regime][method.key]
            assert entry["config"] in [dict(c) for c in method.grid]
            assert len(entry["test_acc"]) == len(entry["val_acc"]) == len(entry["seeds"]) == 1
            for acc in entry["test_acc"] + entry["val_acc"] + [entry["test_mean"]]:
                assert 0.0 <= acc <= 1.0
            assert entry["test_std"] == 0.0  # one seed
            grid = result["grid"][regime][method.key]
            assert [g["config"] for g in grid] == [dict(c) for c in method.grid]
            # The chosen config is a best one on validation.
            assert max(g["val_acc"] for g in grid) in [
                g["val_acc"] for g in grid if g["config"] == entry["config"]
            ]
    assert result["runtime_s"] > 0 and result["cpu_time_s"] > 0


def test_quick_timing_rows(quick):
    *_, result = quick
    rows = result["timing"]
    assert [(r["loss"], r["batch"]) for r in rows] == [
        (loss, batch) for batch in (64, 1077) for loss in ("FKD", "FKD ensemble", "SRD")
    ]
    for row in rows:  # every loss has a fused backend (the reference one without fastkd._C)
        assert row["reference_us"] > 0 and row["fused_us"] > 0
        assert row["speedup"] == pytest.approx(row["reference_us"] / row["fused_us"])
    for op, loss in (("fkd", "FKD"), ("srd", "SRD")):
        expected = fastkd.resolve_backend(op, "auto", torch.device("cpu"))
        assert {r["fused_backend"] for r in rows if r["loss"].startswith(loss)} == {expected}


def test_quick_table_matches_json(quick):
    _, stdout, _, out_dir, result = quick
    assert (out_dir / "results.md").read_text().strip() in stdout
    tables = stdout.split("\n\n")
    accuracy, cross, timing = (t for t in tables if t.startswith("| "))
    rows = {line.split("|")[1].strip(): line for line in accuracy.splitlines()}
    for method in demo.METHODS:
        line = rows[method.label]
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == 5  # method, then accuracy and config per regime
        for regime, cell in zip(("all", "few"), cells[1::2], strict=True):
            entry = result["results"][regime][method.key]
            assert cell == f"{100 * entry['test_mean']:.1f} ± {100 * entry['test_std']:.1f}"
    assert len(rows) == 2 + 1 + len(demo.METHODS)  # header, rule, teacher, methods
    cross_rows = [line.split("|")[1].strip() for line in cross.splitlines()[2:]]
    assert cross_rows == ["plain (CE only)", "FKD from the digits-0-4 teacher"]
    timing_rows = [line.split("|")[1].strip() for line in timing.splitlines()[2:]]
    assert timing_rows == ["FKD", "FKD ensemble", "SRD"] * 2
    assert "Finished in" in stdout


def test_quick_png_is_written(quick):
    *_, out_dir, _ = quick
    png = (out_dir / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(png) > 20_000  # two panels of bars and text, not an empty canvas


def test_same_seed_same_accuracies(quick, tmp_path):
    *_, first = quick
    status, _, _ = run_demo("--quick", "--no-plot", "--no-progress", "--out", str(tmp_path))
    assert status == 0
    second = json.loads((tmp_path / "results.json").read_text())
    assert not (tmp_path / "results.png").exists()
    assert second["grid"] == first["grid"]
    assert second["teachers"] == first["teachers"]
    for regime in first["results"]:
        for method, entry in first["results"][regime].items():
            again = second["results"][regime][method]
            assert again["test_acc"] == entry["test_acc"] and again["config"] == entry["config"]


def test_single_regime_and_explicit_settings(tmp_path):
    status, stdout, _ = run_demo(
        "--epochs",
        "1",
        "--seeds",
        "2",
        "--labels-per-class",
        "0",
        "--quick",
        "--batch-size",
        "100",
        "--seed",
        "3",
        "--no-progress",
        "--out",
        str(tmp_path),
    )
    assert status == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert set(result["regimes"]) == {"all"}
    assert result["settings"]["epochs"] == 1 and result["settings"]["seed"] == 3
    assert result["results"]["all"]["plain"]["seeds"] == [3, 4]
    assert len(result["results"]["all"]["kd"]["test_acc"]) == 2
    assert {r["batch"] for r in result["timing"]} == {100, 1077}
    assert "labels/class" not in stdout
    assert (tmp_path / "results.png").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["--seeds", "0"],
        ["--epochs", "-1"],
        ["--batch-size", "1"],
        ["--backend", "gpu"],
        ["--labels-per-class", "-2"],
    ],
)
def test_bad_options_are_rejected(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", *argv])
    assert exc.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_unavailable_backend_is_reported(tmp_path, monkeypatch):
    def unavailable(op, backend, device):
        raise fastkd.BackendUnavailableError(f"backend {backend!r} is unavailable: test")

    monkeypatch.setattr(fastkd, "resolve_backend", unavailable)
    status, stdout, _ = run_demo("--backend", "cpu", "--out", str(tmp_path))
    assert status == 2
    assert "--backend cpu" in stdout and "unavailable" in stdout
    assert not (tmp_path / "results.json").exists()


def test_data_split_is_stratified_and_disjoint():
    data = demo.load_data(0)
    splits = (data.x_train, data.x_val, data.x_test)
    assert [len(x) for x in splits] == [1077, 360, 360]
    rows = torch.cat(splits)
    assert rows.min() >= 0 and rows.max() <= 1
    # The three splits together are exactly the data set, each image once.
    split_rows, split_counts = torch.unique(rows, dim=0, return_counts=True)
    all_rows, all_counts = torch.unique(demo_inputs(), dim=0, return_counts=True)
    assert torch.equal(split_rows, all_rows) and torch.equal(split_counts, all_counts)
    everything = torch.bincount(torch.cat([data.y_train, data.y_val, data.y_test]), minlength=10)
    for y, n in ((data.y_train, 1077), (data.y_val, 360), (data.y_test, 360)):
        counts = torch.bincount(y, minlength=10)
        assert torch.all((counts - everything * n / 1797).abs() <= 1.0)
    other = demo.load_data(1)
    assert not torch.equal(other.y_test, data.y_test)


def demo_inputs() -> torch.Tensor:
    from sklearn.datasets import load_digits

    return torch.tensor(load_digits().data, dtype=torch.float32) / 16


@pytest.mark.parametrize("per_class", [1, 3, 10])
def test_few_label_mask(per_class):
    y = demo.load_data(0).y_train
    mask = demo.few_label_mask(y, per_class, seed=5)
    assert torch.equal(torch.bincount(y[mask], minlength=10), torch.full((10,), per_class))
    assert torch.equal(mask, demo.few_label_mask(y, per_class, seed=5))
    assert not torch.equal(mask, demo.few_label_mask(y, per_class, seed=6))


def test_masked_cross_entropy_ignores_unlabelled_rows():
    torch.manual_seed(0)
    logits, labels = torch.randn(7, 10), torch.randint(0, 10, (7,))
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1], dtype=torch.float32)
    expected = torch.nn.functional.cross_entropy(logits[mask.bool()], labels[mask.bool()])
    torch.testing.assert_close(demo.masked_cross_entropy(logits, labels, mask), expected)
    assert demo.masked_cross_entropy(logits, labels, torch.zeros(7)).item() == 0.0


def test_srd_loss_module_matches_reference_and_trains_its_projector():
    torch.manual_seed(0)
    srd = fastkd.SRDLoss(3, 17, backend="reference")
    srd.train()
    zs, zt = torch.randn(13, 3, requires_grad=True), torch.randn(13, 17)
    loss = srd(zs, zt)
    (projector,) = [m for m in srd.modules() if isinstance(m, torch.nn.Linear)]
    assert (projector.in_features, projector.out_features) == (3, 17)
    with torch.no_grad():
        projected = projector(zs)
    expected = reference.srd_loss(projected, zt)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    grads = [p.grad for p in srd.parameters()]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert zs.grad is not None and zs.grad.abs().sum() > 0
