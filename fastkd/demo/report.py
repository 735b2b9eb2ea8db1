"""Report of ``fastkd demo``: the markdown tables and the two-panel figure.

matplotlib is imported only when the figure is drawn (it is a demo extra).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from fastkd.demo.train import METHODS


def _config_text(config: dict) -> str:
    names = {"alpha": "α", "kd_weight": "kd_weight", "weight": "weight", "T": "T"}
    return ", ".join(f"{names[k]}={v:g}" for k, v in config.items()) or "-"


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
