"""Turning logits into masks and pictures."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from .models import batch_statistics


def colorize(
    mask: np.ndarray, colors: Sequence[Sequence[int]], ignore_color=(0, 0, 0)
) -> np.ndarray:
    """H x W class indices -> H x W x 3 uint8 using the class colours (others: ``ignore_color``)."""
    lut = np.zeros((256 if mask.max(initial=0) < 256 else int(mask.max()) + 1, 3), dtype=np.uint8)
    lut[:] = ignore_color
    lut[: len(colors)] = np.asarray(colors, dtype=np.uint8)
    return lut[mask]


@torch.no_grad()
def save_predictions(
    model: nn.Module,
    dataset,
    out_dir: str | Path,
    colors,
    limit: int = 8,
    bn_eval: str = "batch",
    device: torch.device | str = "cpu",
) -> list[Path]:
    """For the first ``limit`` samples: ``NAME_pred.png`` (indices), ``NAME_color.png`` and a
    side-by-side ``NAME_compare.png`` (image | truth | prediction)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    written = []
    ctx = batch_statistics(model) if bn_eval == "batch" else contextlib.nullcontext()
    with ctx:
        for i in range(min(limit, len(dataset))):
            image, target = dataset[i]
            pred = model(image[None].to(device)).argmax(1)[0].cpu().numpy().astype(np.uint8)
            name = Path(dataset.pairs[i][0]).stem if hasattr(dataset, "pairs") else f"{i:04d}"
            Image.fromarray(pred).save(out_dir / f"{name}_pred.png")
            colored = colorize(pred, colors)
            Image.fromarray(colored).save(out_dir / f"{name}_color.png")
            raw = dataset.load(i)[0] if hasattr(dataset, "load") else None
            if raw is not None and raw.dtype == np.uint8 and raw.shape[2] in (1, 3):
                rgb = np.repeat(raw, 3, axis=2) if raw.shape[2] == 1 else raw
                truth = colorize(target.numpy().astype(np.int64), colors)
                Image.fromarray(np.concatenate([rgb, truth, colored], axis=1)).save(
                    out_dir / f"{name}_compare.png"
                )
            written.append(out_dir / f"{name}_pred.png")
    return written
