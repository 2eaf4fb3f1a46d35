"""PNG figures for a run folder: training curves and the confusion matrix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers; must precede pyplot
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from .fileio import atomic_write_from


def _save(fig: Any, path: Path) -> None:
    try:
        atomic_write_from(
            path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
        )
    finally:
        plt.close(fig)


def best_so_far(values: list[float], lower_is_better: bool = False) -> list[float]:
    """The running best of a validation series (NaN where nothing was validated yet)."""
    out: list[float] = []
    best = float("nan")
    for v in values:
        if not np.isnan(v) and (np.isnan(best) or (v < best if lower_is_better else v > best)):
            best = v
        out.append(best)
    return out


def mark_best(
    ax: Any, x: list[int], values: list[float], names: list[str], lower_is_better: bool
) -> None:
    """The running best as a step line and the best point labelled: a noisy validation curve
    (2-3 points between CamVid epochs) hides where the run stands. The point is ``best.pt``'s
    epoch when the run monitors this curve's metric (``train.monitor``, mIoU by default)."""
    running = best_so_far(values, lower_is_better)
    if all(np.isnan(v) for v in running):
        return
    ax.step(x, running, where="post", color="grey", lw=1, ls="--", label="best so far")
    best = running[-1]
    i = values.index(best)
    ax.plot([x[i]], [best], "o", color="black", ms=4, label=f"best {best:.1f} % ({names[i]})")


def plot_history(
    history: list[dict[str, Any]], out_dir: str | Path, task: str = "segmentation"
) -> None:
    """``loss.png``, ``miou.png`` (``error.png`` for classifiers) and ``accuracy.png``."""
    out_dir = Path(out_dir)
    if not history:
        return
    x = list(range(1, len(history) + 1))  # stages follow each other; each restarts at epoch 1
    stages = {h["stage"] for h in history}
    names = [
        f"{h['stage']} epoch {h['epoch']}" if len(stages) > 1 else f"epoch {h['epoch']}"
        for h in history
    ]

    def series(key: str) -> list[float]:
        return [
            h.get(key, float("nan")) if h.get(key) is not None else float("nan") for h in history
        ]

    def stage_lines(ax: Any) -> None:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        for i in range(1, len(history)):
            if history[i]["stage"] != history[i - 1]["stage"]:
                ax.axvline(i + 0.5, color="grey", ls=":", lw=1)

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, series("train_loss"), label="train")
    ax.plot(x, series("val_loss"), label="val")
    ax.set(xlabel="epoch", ylabel="cross-entropy", title="Loss")
    ax.legend()
    stage_lines(ax)
    _save(fig, out_dir / "loss.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    if task == "classification":
        val = [100 * (1 - v) for v in series("val_accuracy")]
        ax.plot(x, val, label="val top-1 error")
        ax.plot(x, [100 * (1 - v) for v in series("train_accuracy")], label="train top-1 error")
        mark_best(ax, x, val, names, lower_is_better=True)
        ax.set(xlabel="epoch", ylabel="%", title="Top-1 error")
        name = "error.png"
    else:
        val = [100 * v for v in series("val_miou")]
        ax.plot(x, val, label="val mean IoU")
        mark_best(ax, x, val, names, lower_is_better=False)
        ax.set(xlabel="epoch", ylabel="%", title="Validation mean IoU")
        name = "miou.png"
    ax.legend()
    stage_lines(ax)
    _save(fig, out_dir / name)

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, [100 * v for v in series("val_accuracy")], label="global accuracy")
    ax.plot(x, [100 * v for v in series("val_mean_class_accuracy")], label="mean class accuracy")
    ax.set(xlabel="epoch", ylabel="%", title="Validation accuracy")
    ax.legend()
    stage_lines(ax)
    _save(fig, out_dir / "accuracy.png")


def plot_confusion(matrix: list[list[int]], classes: list[str], path: str | Path) -> None:
    """Row-normalised heat map: each row shows where the true class's pixels went."""
    m = np.asarray(matrix, dtype=np.float64)
    rows = m.sum(1, keepdims=True)
    norm = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    n = len(classes)
    size = max(4.0, 0.5 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=60, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix (row-normalised)")
    if n <= 20:
        for i in range(n):
            for j in range(n):
                ax.text(
                    j,
                    i,
                    f"{norm[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black",
                )
    fig.colorbar(im, fraction=0.046, pad=0.04)
    _save(fig, Path(path))
