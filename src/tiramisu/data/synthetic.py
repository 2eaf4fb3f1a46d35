"""A small synthetic street-like scene dataset for the demo and the tests.

Each frame has a sky/ground split, a road band, and randomly placed discs ("wheels"), boxes
("cars") and thin vertical bars ("poles"), each drawn with a noisy colour so that the network has
to use shape and context, not a single pixel value. Written as ordinary PNG folders so the demo
exercises exactly the code path that users' own data takes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

SYNTHETIC_CLASSES = ["sky", "ground", "road", "box", "disc", "pole"]
SYNTHETIC_COLORS = [
    (128, 128, 128),
    (107, 142, 35),
    (128, 64, 128),
    (64, 0, 128),
    (220, 20, 60),
    (192, 192, 128),
]


def render_scene(
    rng: np.random.Generator, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    mask = np.zeros((height, width), dtype=np.uint8)
    horizon = int(height * rng.uniform(0.3, 0.5))
    mask[horizon:] = 1
    road_top = int(horizon + (height - horizon) * rng.uniform(0.2, 0.5))
    mask[road_top:] = 2
    yy, xx = np.mgrid[0:height, 0:width]
    for _ in range(rng.integers(1, 4)):  # boxes standing on the road
        w, h = rng.integers(width // 8, width // 3), rng.integers(height // 10, height // 4)
        x0 = rng.integers(0, width - w)
        y1 = rng.integers(road_top, height)
        mask[max(0, y1 - h) : y1, x0 : x0 + w] = 3
    for _ in range(rng.integers(1, 4)):
        r = rng.integers(max(3, height // 20), max(4, height // 8))
        cy, cx = rng.integers(r, height - r), rng.integers(r, width - r)
        mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 4
    for _ in range(rng.integers(0, 3)):
        x0 = rng.integers(0, width - 3)
        mask[rng.integers(0, horizon + 1) : road_top, x0 : x0 + rng.integers(2, 5)] = 5
    base = np.array(SYNTHETIC_COLORS, dtype=np.float32)
    jitter = rng.normal(0, 25, size=base.shape).astype(np.float32)
    image = (base + jitter)[mask]
    image += rng.normal(0, 12, size=image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8), mask


def make_synthetic_dataset(
    root: str | Path,
    n_train: int = 48,
    n_val: int = 16,
    size: tuple[int, int] = (96, 128),
    seed: int = 0,
) -> Path:
    """Write ``root/{train,val}/{images,masks}/*.png``; returns ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        (root / split / "masks").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image, mask = render_scene(rng, *size)
            Image.fromarray(image).save(root / split / "images" / f"scene_{i:04d}.png")
            Image.fromarray(mask).save(root / split / "masks" / f"scene_{i:04d}.png")
    return root
