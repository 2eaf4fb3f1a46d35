"""Confusion-matrix metrics: per-class IoU, mean IoU, global and mean class accuracy.

Intersections and unions are accumulated over the whole split before dividing (the paper's
definition), not averaged per image. Pixels labelled ``ignore_index`` (CamVid's void) are
excluded everywhere. A class with no pixels in either the labels or the predictions has an
undefined IoU (NaN) and is left out of the mean, rather than counted as 0 or 1.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class ConfusionMatrix:
    """``matrix[t, p]`` counts pixels (or samples) of true class ``t`` predicted as ``p``."""

    def __init__(
        self, num_classes: int, ignore_index: int | None = None, device: torch.device | str = "cpu"
    ) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, prediction: Tensor, target: Tensor) -> None:
        """``prediction``: class indices, or logits with classes on dim 1; ``target``: indices."""
        if prediction.dim() == target.dim() + 1:
            prediction = prediction.argmax(1)
        if prediction.shape != target.shape:
            raise ValueError(
                f"prediction shape {tuple(prediction.shape)} does not match "
                f"target shape {tuple(target.shape)}"
            )
        p, t = prediction.reshape(-1), target.reshape(-1)
        keep = (t >= 0) & (t < self.num_classes)
        if self.ignore_index is not None:
            keep &= t != self.ignore_index
        n = self.num_classes
        idx = t[keep].to(torch.int64) * n + p[keep].to(torch.int64)
        self.matrix += torch.bincount(idx, minlength=n * n).reshape(n, n).to(self.matrix.device)

    def all_reduce(self) -> None:
        """Sum the counts across processes (no-op when not distributed)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.matrix)

    def compute(self) -> dict[str, Any]:
        return metrics_from_confusion(self.matrix)


def metrics_from_confusion(matrix: Tensor) -> dict[str, Any]:
    m = matrix.to(torch.float64).cpu()
    tp = m.diag()
    support = m.sum(1)  # true pixels per class
    predicted = m.sum(0)
    union = support + predicted - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    class_acc = torch.where(
        support > 0, tp / support.clamp(min=1), torch.full_like(tp, float("nan"))
    )
    total = m.sum()
    extra = {"foreground": binary_metrics(m)} if m.shape[0] == 2 else {}
    return {
        **extra,
        "miou": _nanmean(iou),
        "global_accuracy": (tp.sum() / total).item() if total > 0 else float("nan"),
        "mean_class_accuracy": _nanmean(class_acc),
        "iou": iou.tolist(),
        "class_accuracy": class_acc.tolist(),
        "support": support.to(torch.int64).tolist(),
        "confusion_matrix": matrix.cpu().tolist(),
    }


def binary_metrics(matrix: Tensor) -> dict[str, float]:
    """Foreground (class 1) IoU, Dice (F1), precision and recall from a 2x2 confusion matrix."""
    m = matrix.to(torch.float64)
    tp, fn, fp = m[1, 1].item(), m[1, 0].item(), m[0, 1].item()

    def ratio(a: float, b: float) -> float:
        return a / b if b > 0 else float("nan")

    return {
        "iou": ratio(tp, tp + fp + fn),
        "dice": ratio(2 * tp, 2 * tp + fp + fn),
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
    }


def _nanmean(x: Tensor) -> float:
    valid = ~torch.isnan(x)
    return x[valid].mean().item() if valid.any() else float("nan")


# Jégou et al. 2017, Table 3 (CamVid test set, IoU %), in CamVid class order.
PAPER_CAMVID = {
    "fcdensenet56": {
        "iou": [92.4, 77.6, 32.6, 92.8, 79.9, 72.0, 31.8, 26.2, 73.2, 37.9, 31.1],
        "miou": 58.9,
        "global_accuracy": 88.9,
    },
    "fcdensenet67": {
        "iou": [93.0, 80.2, 38.4, 94.7, 81.9, 75.4, 40.9, 30.7, 78.2, 58.4, 52.1],
        "miou": 65.8,
        "global_accuracy": 90.8,
    },
    "fcdensenet103": {
        "iou": [93.0, 83.0, 37.8, 94.5, 82.2, 77.3, 43.9, 37.1, 77.3, 59.6, 50.5],
        "miou": 66.9,
        "global_accuracy": 91.5,
    },
}


def format_report(
    metrics: dict[str, Any], classes: list[str], paper: dict[str, Any] | None = None
) -> str:
    """A per-class table (IoU and accuracy, %), with the paper's column when given."""
    head = f"{'class':<14}{'IoU %':>8}{'acc %':>8}{'pixels':>12}" + (
        f"{'paper':>8}" if paper else ""
    )
    lines = [head, "-" * len(head)]

    def pct(v: float) -> str:
        return "     n/a" if v != v else f"{100 * v:8.1f}"

    for i, name in enumerate(classes):
        row = f"{name:<14}{pct(metrics['iou'][i])}{pct(metrics['class_accuracy'][i])}"
        row += f"{metrics['support'][i]:>12,}"
        if paper:
            row += f"{paper['iou'][i]:8.1f}"
        lines.append(row)
    lines.append("-" * len(head))
    lines.append(
        f"{'mean IoU':<14}{pct(metrics['miou'])}"
        + " " * 20
        + (f"{paper['miou']:8.1f}" if paper else "")
    )
    lines.append(
        f"{'global acc':<14}{pct(metrics['global_accuracy'])}"
        + " " * 20
        + (f"{paper['global_accuracy']:8.1f}" if paper else "")
    )
    lines.append(f"{'mean class acc':<14}{pct(metrics['mean_class_accuracy'])}")
    fg = metrics.get("foreground")
    if fg:
        lines.append(
            f"foreground ({classes[1]}): IoU {pct(fg['iou']).strip()}  Dice "
            f"{pct(fg['dice']).strip()}  precision {pct(fg['precision']).strip()}  recall "
            f"{pct(fg['recall']).strip()} %"
        )
    return "\n".join(lines)


def format_classification_report(metrics: dict[str, Any], classes: list[str]) -> str:
    """Top-1 error and per-class accuracy (%)."""
    lines = [f"{'class':<14}{'acc %':>8}{'samples':>10}", "-" * 32]
    for i, name in enumerate(classes):
        acc = metrics["class_accuracy"][i]
        shown = "     n/a" if acc != acc else f"{100 * acc:8.2f}"
        lines.append(f"{name:<14}{shown}{metrics['support'][i]:>10,}")
    lines.append("-" * 32)
    lines.append(f"top-1 error   {100 * (1 - metrics['global_accuracy']):8.2f} %")
    lines.append(f"accuracy      {100 * metrics['global_accuracy']:8.2f} %")
    return "\n".join(lines)
