"""Datasets, label specifications and augmentation, built from a run configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from ..errors import DataError
from .builders import as_dict
from .pairing import split_files
from .segmentation import (
    CAMVID_CLASSES,
    CAMVID_COLORS,
    LabelSpec,
    SegmentationDataset,
    camvid_labels,
    default_colors,
    infer_channels,
    load_palette,
    median_frequency_weights,
)
from .synthetic import SYNTHETIC_CLASSES, SYNTHETIC_COLORS, make_synthetic_dataset
from .transforms import JointTransform, normalization

__all__ = [
    "CAMVID_CLASSES",
    "CAMVID_COLORS",
    "SYNTHETIC_CLASSES",
    "JointTransform",
    "LabelSpec",
    "SegmentationDataset",
    "build_dataset",
    "camvid_labels",
    "label_spec",
    "make_synthetic_dataset",
    "median_frequency_weights",
]


def _resolve(root: str | Path | None, path: str | Path | None) -> Path:
    if path is None:
        raise DataError("a data path is missing from the config")
    p = Path(path)
    return p if p.is_absolute() or root is None else Path(root) / p


def label_spec(data: dict[str, Any]) -> LabelSpec:
    """Classes, colours and void handling for a data config."""
    kind = data["dataset"]
    if kind == "camvid":
        spec = camvid_labels()
        if data["ignore_index"] is not None:
            spec.ignore_index = int(data["ignore_index"])
        return spec
    ignore = 255 if data["ignore_index"] is None else int(data["ignore_index"])
    if data["palette"]:
        spec = load_palette(_resolve(data["root"], data["palette"]), ignore)
    else:
        if data["classes"]:
            classes = [str(c) for c in data["classes"]]
        elif kind == "synthetic":
            classes = list(SYNTHETIC_CLASSES)
        elif data["num_classes"]:
            classes = [f"class_{i}" for i in range(int(data["num_classes"]))]
        else:
            raise DataError("index masks need data.classes (names) or data.num_classes")
        colors = list(SYNTHETIC_COLORS) if kind == "synthetic" else default_colors(len(classes))
        spec = LabelSpec(classes, colors, ignore)
    if data["label_map"]:
        spec.label_map = {int(k): int(v) for k, v in dict(data["label_map"]).items()}
    elif spec.palette is None and spec.num_classes == 2:
        # Binary masks are usually stored as 0/255; read 255 as the foreground class. If the
        # user also named 255 as the ignore value, the two readings conflict: say so.
        if data["ignore_index"] == 255:
            raise DataError(
                "data.ignore_index is 255, but with 2 classes 0/255 masks are read as "
                "background/foreground (255 -> class 1): remove ignore_index (or use another "
                "value such as 254), or give data.label_map to say what each mask value means"
            )
        if ignore != 1:
            spec.label_map = {255: 1}
    return spec


def split_pairs(data: dict[str, Any], split: str) -> list:
    return split_files(data, split).pairs


def resolve_channels(data: dict[str, Any]) -> int:
    """``data.channels``, or for ``auto`` the most channels among a sample of training images.

    One greyscale file sorted first must not turn a colour set into 1-channel training, so
    up to 16 files spread over the set are looked at, and a mix is reported.
    """
    channels = data["channels"]
    if channels != "auto":
        if int(channels) not in (1, 3, 4):
            raise DataError(f"data.channels must be 1, 3, 4 or auto, got {channels!r}")
        return int(channels)
    if data["dataset"] in ("camvid", "synthetic"):
        return 3
    pairs = split_files(data, "train").pairs
    step = max(1, len(pairs) // 16)
    seen = {p[0]: infer_channels(p[0]) for p in pairs[::step][:16]}
    counts = sorted(set(seen.values()))
    if len(counts) > 1:
        example = next(p for p, c in seen.items() if c == counts[0])
        print(
            f"tiramisu: warning: training images mix {', '.join(map(str, counts))} channels "
            f"(e.g. {example.name} has {counts[0]}); using {counts[-1]}. Set data.channels "
            f"to choose."
        )
    return counts[-1]


def build_dataset(
    cfg: Any,
    split: str,
    train: bool,
    labels: LabelSpec | None = None,
    channels: int | None = None,
) -> Dataset:
    data = as_dict(cfg)["data"]
    labels = labels or label_spec(data)
    channels = channels or resolve_channels(data)
    mean, std = normalization(data["normalize"], data["mean"], data["std"])
    if train:
        transform = JointTransform(
            crop_size=data["crop_size"],
            hflip=data["hflip"],
            vflip=data["vflip"],
            scale_range=data["scale_range"],
            mean=mean,
            std=std,
            ignore_index=labels.ignore_index,
        )
    else:
        transform = JointTransform(mean=mean, std=std)
    files = split_files(data, split)
    dataset = SegmentationDataset(
        files.pairs, labels, channels, transform, cache=bool(data["cache"]), regions=files.regions
    )
    dataset.note = files.note
    return dataset
