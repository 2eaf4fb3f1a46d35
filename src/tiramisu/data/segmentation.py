"""Image/mask pairs: CamVid's SegNet layout and users' own folders.

Masks are class-index images (PNG/TIFF/GIF, 8 or 16 bit, palette-mode images read as their
indices) or RGB colour-coded images decoded with a palette. Every pair is checked before training
starts (readable, same size, labels inside the classes) so that a bad file is reported by name
up front rather than halfway through an epoch.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import DataError
from ..imageio import open_image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")

CAMVID_CLASSES = (
    "Sky", "Building", "Pole", "Road", "Sidewalk", "Tree",
    "SignSymbol", "Fence", "Car", "Pedestrian", "Bicyclist",
)  # fmt: skip
CAMVID_COLORS = (
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
    (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
)  # fmt: skip
CAMVID_IGNORE_INDEX = 11
_VOID_NAMES = {"void", "ignore", "unlabelled", "unlabeled", "background_ignore"}


@dataclass
class LabelSpec:
    """How mask pixels become class indices, and what the classes are called and coloured."""

    classes: list[str]
    colors: list[tuple[int, int, int]]
    ignore_index: int = 255
    # Colour-coded masks: RGB -> class index (void colours map to ignore_index).
    palette: dict[tuple[int, int, int], int] | None = None
    # Index masks: raw value -> class index, applied before range checks (e.g. {255: 1}).
    label_map: dict[int, int] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_json(self) -> dict[str, Any]:
        return {
            "classes": self.classes,
            "colors": [list(c) for c in self.colors],
            "ignore_index": self.ignore_index,
        }


def default_colors(n: int) -> list[tuple[int, int, int]]:
    """Distinct colours for classes that come without any (the PASCAL VOC bit-interleave)."""
    out = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append((r, g, b))
    return out


def camvid_labels() -> LabelSpec:
    return LabelSpec(list(CAMVID_CLASSES), list(CAMVID_COLORS), CAMVID_IGNORE_INDEX)


def load_palette(path: str | Path, ignore_index: int = 255) -> LabelSpec:
    """A JSON or YAML mapping ``class name -> [r, g, b]``; order gives the class indices.

    Entries named ``void``/``ignore``/``unlabelled`` are mapped to ``ignore_index``.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise DataError(f"{path}: cannot read palette ({e.strerror or e})") from None
    try:
        if path.suffix.lower() == ".json":
            raw = json.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text)
    except Exception as e:
        raise DataError(f"{path}: not valid JSON/YAML ({e})") from None
    if not isinstance(raw, dict) or not raw:
        raise DataError(f"{path}: palette must map class names to [r, g, b]")
    classes, colors, palette = [], [], {}
    for name, rgb in raw.items():
        if (
            not isinstance(rgb, list | tuple)
            or len(rgb) != 3
            or not all(isinstance(v, int) and 0 <= v <= 255 for v in rgb)
        ):
            raise DataError(f"{path}: colour of {name!r} must be [r, g, b] with 0..255, got {rgb}")
        color = (int(rgb[0]), int(rgb[1]), int(rgb[2]))
        if color in palette:
            raise DataError(f"{path}: colour {list(color)} is used twice")
        if str(name).lower() in _VOID_NAMES:
            palette[color] = ignore_index
            continue
        palette[color] = len(classes)
        classes.append(str(name))
        colors.append(color)
    return LabelSpec(classes, colors, ignore_index, palette=palette)


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


def pair_by_stem(image_dir: str | Path, mask_dir: str | Path) -> list[tuple[Path, Path]]:
    """Pair ``image_dir/x.jpg`` with ``mask_dir/x.png``; a missing partner is an error."""
    image_dir, mask_dir = Path(image_dir), Path(mask_dir)
    for d in (image_dir, mask_dir):
        if not d.is_dir():
            raise DataError(f"{d}: no such folder")
    images = {p.stem: p for p in list_images(image_dir)}
    masks = {p.stem: p for p in list_images(mask_dir)}
    if not images:
        raise DataError(f"{image_dir}: no images found")
    missing_mask = sorted(set(images) - set(masks))
    if missing_mask:
        raise DataError(
            f"{images[missing_mask[0]]}: no mask with the same name in {mask_dir}"
            + (f" (and {len(missing_mask) - 1} more)" if len(missing_mask) > 1 else "")
        )
    missing_image = sorted(set(masks) - set(images))
    if missing_image:
        raise DataError(
            f"{masks[missing_image[0]]}: no image with the same name in {image_dir}"
            + (f" (and {len(missing_image) - 1} more)" if len(missing_image) > 1 else "")
        )
    return [(images[s], masks[s]) for s in sorted(images)]


def camvid_pairs(root: str | Path, split: str) -> list[tuple[Path, Path]]:
    """The SegNet tutorial layout: ``root/{split}`` with masks in ``root/{split}annot``."""
    root = Path(root)
    if not (root / split).is_dir():
        raise DataError(
            f"{root / split}: no such folder (expected CamVid's SegNet layout with "
            f"train/, trainannot/, val/, valannot/, test/, testannot/)"
        )
    return pair_by_stem(root / split, root / f"{split}annot")


def pil_to_array(im: Image.Image, channels: int, name: str | Path = "image") -> np.ndarray:
    """Any PIL mode -> H x W x C uint8 (uint16 for 16-bit greyscale) with ``channels`` channels."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.clip(np.asarray(im), 0, 65535).astype(np.uint16)[..., None]
        if channels == 3:
            arr = np.repeat(arr, 3, axis=2)
        elif channels != 1:
            raise DataError(f"{name}: 16-bit greyscale image cannot give {channels} channels")
        return arr
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[channels]
    arr = np.asarray(im if im.mode == mode else im.convert(mode))  # no extra copy if same mode
    return arr[..., None] if channels == 1 else arr


def read_image(path: Path, channels: int) -> np.ndarray:
    """H x W x C uint8 (or uint16 for 16-bit greyscale); see ``image_to_tensor`` for scaling."""
    with open_image(path) as im:
        return pil_to_array(im, channels, path)


def image_to_tensor(arr: np.ndarray) -> torch.Tensor:
    """H x W x C uint8/uint16 -> C x H x W float32 in [0, 1] (the paper's input scaling)."""
    scale = 65535.0 if arr.dtype == np.uint16 else 255.0
    return torch.from_numpy(arr.transpose(2, 0, 1).astype(np.float32)).div_(scale)


def read_mask(path: Path, labels: LabelSpec) -> np.ndarray:
    """H x W int64 class indices (``labels.ignore_index`` for void)."""
    with open_image(path, "mask") as im:
        if labels.palette is not None:
            return _decode_colors(path, np.asarray(im.convert("RGB")), labels)
        if im.mode in ("RGB", "RGBA"):
            raise DataError(
                f"{path}: colour-coded mask but no palette was given "
                f"(set data.palette to a JSON/YAML name -> [r, g, b] file)"
            )
        arr = np.asarray(im).astype(np.int64)
    if arr.ndim != 2:
        raise DataError(f"{path}: mask must be single-channel, got shape {arr.shape}")
    if labels.label_map:
        out = arr.copy()
        for raw, cls in labels.label_map.items():
            out[arr == raw] = cls
        arr = out
    return arr


def _decode_colors(path: Path, rgb: np.ndarray, labels: LabelSpec) -> np.ndarray:
    assert labels.palette is not None
    packed = (
        (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    )
    keys = np.array([(r << 16) | (g << 8) | b for r, g, b in labels.palette], dtype=np.int64)
    values = np.array(list(labels.palette.values()), dtype=np.int64)
    order = np.argsort(keys)
    keys, values = keys[order], values[order]
    pos = np.clip(np.searchsorted(keys, packed), 0, len(keys) - 1)
    found = keys[pos] == packed
    if not found.all():
        y, x = np.argwhere(~found)[0]
        raise DataError(
            f"{path}: colour {rgb[y, x].tolist()} at (x={x}, y={y}) is not in the palette"
        )
    return values[pos]


def apply_region(mask: np.ndarray, region_path: Path, ignore_index: int) -> np.ndarray:
    """Pixels outside the valid region (value 0 in the region mask) become ``ignore_index``,
    so they count in neither the loss nor the metrics."""
    with open_image(region_path, "region mask") as im:
        region = np.asarray(im.convert("L"))
    if region.shape != mask.shape:
        raise DataError(
            f"{region_path}: region mask is {region.shape[1]}x{region.shape[0]} but the mask "
            f"is {mask.shape[1]}x{mask.shape[0]}"
        )
    out = mask.copy()
    out[region == 0] = ignore_index
    return out


def check_labels(path: Path, mask: np.ndarray, labels: LabelSpec) -> None:
    bad = (mask != labels.ignore_index) & ((mask < 0) | (mask >= labels.num_classes))
    if bad.any():
        values = sorted(int(v) for v in np.unique(mask[bad]))[:5]
        raise DataError(
            f"{path}: label values {values} are outside the {labels.num_classes} "
            f"classes (0..{labels.num_classes - 1}, ignore {labels.ignore_index})"
        )


class SegmentationDataset(Dataset):
    """(image, mask) pairs read from disk and passed through a joint ``transform``.

    Returns ``image`` as a float C x H x W tensor in [0, 1] and ``mask`` as an int64 H x W tensor.
    With ``cache=True`` decoded arrays are kept in memory (CamVid's 367 training frames are
    about 200 MB as uint8), which matters on CPU where PNG decoding competes with training.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[Path, Path]],
        labels: LabelSpec,
        channels: int = 3,
        transform: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
        | None = None,
        cache: bool = False,
        regions: Sequence[Path] | None = None,
    ) -> None:
        self.pairs = list(pairs)
        self.labels = labels
        self.channels = channels
        self.transform = transform
        self.cache = cache
        self.regions = list(regions) if regions is not None else None
        self.note = ""  # how the split was made (a seeded hold-out), for the run's log
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if index in self._cache:
            return self._cache[index]
        image_path, mask_path = self.pairs[index]
        image = read_image(image_path, self.channels)
        mask = read_mask(mask_path, self.labels)
        if image.shape[:2] != mask.shape:
            raise DataError(
                f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but "
                f"{image_path.name} is {image.shape[1]}x{image.shape[0]}"
            )
        if self.regions is not None:
            mask = apply_region(mask, self.regions[index], self.labels.ignore_index)
        if self.cache:
            # Small integer types keep CamVid's training set around 250 MB in memory.
            if mask.min() >= 0 and mask.max() < 256:
                mask = mask.astype(np.uint8)
            self._cache[index] = (image, mask)
        return image, mask

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.load(index)
        x = image_to_tensor(image)
        y = torch.from_numpy(mask.astype(np.int64))
        if self.transform is not None:
            x, y = self.transform(x, y)
        return x, y

    def validate(self) -> None:
        """Open every pair once; raise ``DataError`` naming the first bad file.

        With ``cache`` the full decode done here fills the cache, so nothing is read twice.
        """
        for i, (image_path, mask_path) in enumerate(self.pairs):
            if self.cache:
                mask = self.load(i)[1]  # decodes both and checks that the sizes match
            else:
                size = open_image(image_path, header_only=True).size
                mask = read_mask(mask_path, self.labels)
                if (mask.shape[1], mask.shape[0]) != size:
                    raise DataError(
                        f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but "
                        f"{image_path.name} is {size[0]}x{size[1]}"
                    )
            check_labels(mask_path, mask, self.labels)

    def class_pixel_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """Per class: labelled pixels, and pixels of the images in which the class appears."""
        n = self.labels.num_classes
        counts = np.zeros(n, dtype=np.int64)
        present_totals = np.zeros(n, dtype=np.int64)
        for _, mask_path in self.pairs:
            mask = read_mask(mask_path, self.labels)
            valid = mask[mask != self.labels.ignore_index]
            c = np.bincount(valid, minlength=n)[:n]
            counts += c
            present_totals[c > 0] += valid.size
        return counts, present_totals


def median_frequency_weights(dataset: SegmentationDataset) -> torch.Tensor:
    """Eigen & Fergus's median frequency balancing: median(freq) / freq(c).

    freq(c) is the class's pixel count over the total pixels of the images where it appears.
    Classes never seen get weight 0 (they contribute no loss anyway).
    """
    counts, totals = dataset.class_pixel_counts()
    freq = np.where(totals > 0, counts / np.maximum(totals, 1), 0.0)
    median = np.median(freq[freq > 0]) if (freq > 0).any() else 1.0
    weights = np.where(freq > 0, median / np.where(freq > 0, freq, 1.0), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def infer_channels(path: Path) -> int:
    mode = open_image(path, header_only=True).mode
    if mode in ("RGBA", "LA", "PA"):
        return 4
    if mode in ("L", "1", "I;16", "I;16B", "I;16L", "I", "F"):
        return 1
    return 3
