"""Image classification data for the DenseNet classifiers: CIFAR-10 and class folders.

Two sources: the standard ``cifar-10-batches-py`` pickles (read by ``torchvision.datasets.CIFAR10``,
which can also download them) and the class-folder layout ``train/<class>/*.png``. When a folder
has no ``val/`` (or ``test/``) split, a validation set is carved from ``train/`` with a fixed
seed, stratified per class, so the split is the same on every machine and every run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from ..errors import DataError
from ..imageio import open_image
from .builders import as_dict
from .segmentation import IMAGE_EXTENSIONS, LabelSpec, default_colors
from .transforms import normalization

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]  # fmt: skip
SPLIT_SEED = 20170101


class ClassificationDataset(Dataset):
    """Images (file paths, or an in-memory N x H x W x C uint8 array) with integer labels."""

    def __init__(
        self,
        images: list[Path] | np.ndarray,
        labels: list[int],
        channels: int = 3,
        transform: Any = None,
        cache: bool = True,
    ) -> None:
        self.images = images
        self.labels = [int(v) for v in labels]
        self.channels = channels
        self.transform = transform
        self.cache = cache
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> np.ndarray:
        if isinstance(self.images, np.ndarray):
            return self.images[index]
        if index in self._cache:
            return self._cache[index]
        path = self.images[index]
        with open_image(path) as im:
            arr = np.asarray(im.convert({1: "L", 3: "RGB", 4: "RGBA"}[self.channels]))
        if arr.ndim == 2:
            arr = arr[..., None]
        if self.cache:
            self._cache[index] = arr
        return arr

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = torch.from_numpy(self.load(index).transpose(2, 0, 1).astype(np.float32)).div_(255.0)
        if self.transform is not None:
            x = self.transform(x)
        return x, self.labels[index]

    def validate(self) -> None:
        """Open every file once (header only) so a corrupt one is named before training."""
        if isinstance(self.images, np.ndarray):
            return
        for path in self.images:
            open_image(path, header_only=True)


def scan_class_folders(folder: Path) -> tuple[list[str], list[Path], list[int]]:
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder (expected {folder}/<class>/<image>)")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"{folder}: no class sub-folders")
    paths, labels = [], []
    for i, c in enumerate(classes):
        files = sorted(p for p in (folder / c).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        paths += files
        labels += [i] * len(files)
    if not paths:
        raise DataError(f"{folder}: no images in the class folders")
    return classes, paths, labels


def stratified_split(
    labels: list[int], fraction: float, seed: int = SPLIT_SEED
) -> tuple[list[int], list[int]]:
    """Indices (train, val): ``fraction`` of each class goes to val, chosen with a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    train_idx, val_idx = [], []
    labels_arr = np.asarray(labels)
    for c in np.unique(labels_arr):
        idx = np.flatnonzero(labels_arr == c)
        perm = idx[torch.randperm(len(idx), generator=g).numpy()]
        n_val = round(fraction * len(idx))
        val_idx += perm[:n_val].tolist()
        train_idx += perm[n_val:].tolist()
    return sorted(train_idx), sorted(val_idx)


def _train_transform(data: dict[str, Any], size: int) -> v2.Compose:
    ops: list[Any] = []
    pad = int(data["pad_crop"] or 0)
    if pad > 0:
        ops.append(v2.RandomCrop(size, padding=pad, fill=0))
    if data["hflip"]:
        ops.append(v2.RandomHorizontalFlip())
    ops += _normalize(data)
    return v2.Compose(ops)


def _normalize(data: dict[str, Any]) -> list[Any]:
    mean, std = normalization(data["normalize"], data["mean"], data["std"])
    return [v2.Normalize(mean, std)] if mean is not None else []


def _sources(cfg: dict[str, Any]) -> dict[str, Any]:
    """Class names and (images, labels) for train / val / test, before transforms."""
    data = cfg["data"]
    if data["root"] is None:
        raise DataError("data.root must be set")
    root = Path(data["root"])
    fraction = float(data["val_fraction"] or 0)
    if data["dataset"] == "cifar10":
        from torchvision.datasets import CIFAR10

        try:
            train = CIFAR10(str(root), train=True, download=bool(data.get("download")))
            test = CIFAR10(str(root), train=False, download=bool(data.get("download")))
        except RuntimeError as e:
            raise DataError(f"{root}: {e} (set data.download: true to fetch it)") from None
        images, labels = train.data, list(train.targets)
        out = {"classes": list(train.classes), "test": (test.data, list(test.targets))}
        if fraction > 0:
            tr, va = stratified_split(labels, fraction)
            out["train"] = (images[tr], [labels[i] for i in tr])
            out["val"] = (images[va], [labels[i] for i in va])
        else:  # the papers' protocol: all 50k for training, the test batch as validation
            out["train"], out["val"] = (images, labels), out["test"]
        return out
    if data["dataset"] != "imagefolder":
        raise DataError(
            f"classification needs data.dataset cifar10 or imagefolder, got {data['dataset']!r}"
        )
    classes, paths, labels = scan_class_folders(root / "train")
    out = {"classes": classes}
    held_out = next((root / s for s in ("val", "test") if (root / s).is_dir()), None)
    if held_out is not None:
        vc, vp, vl = scan_class_folders(held_out)
        if vc != classes:
            raise DataError(f"{held_out}: class folders {vc} differ from train's {classes}")
        out["train"], out["val"] = (paths, labels), (vp, vl)
    else:
        if not 0 < fraction < 1:
            raise DataError(f"{root}: no val/ folder, so data.val_fraction must be in (0, 1)")
        tr, va = stratified_split(labels, fraction)
        out["train"] = ([paths[i] for i in tr], [labels[i] for i in tr])
        out["val"] = ([paths[i] for i in va], [labels[i] for i in va])
    if (root / "test").is_dir():
        _tc, tp, tl = scan_class_folders(root / "test")
        out["test"] = (tp, tl)
    return out


def _channels(data: dict[str, Any], images: Any) -> int:
    if data["channels"] != "auto":
        return int(data["channels"])
    if isinstance(images, np.ndarray):
        return images.shape[-1]
    return {"L": 1, "RGBA": 4}.get(open_image(images[0], header_only=True).mode, 3)


def build_classification_data(cfg: Any) -> dict[str, Any]:
    cfg = as_dict(cfg)
    data = cfg["data"]
    src = _sources(cfg)
    channels = _channels(data, src["train"][0])
    size = int(
        np.asarray(ClassificationDataset(src["train"][0], src["train"][1], channels).load(0)).shape[
            0
        ]
    )
    cache = bool(data["cache"])
    train = ClassificationDataset(*src["train"], channels, _train_transform(data, size), cache)
    val = ClassificationDataset(*src["val"], channels, v2.Compose(_normalize(data)), cache)
    classes = src["classes"]
    labels = LabelSpec(classes, default_colors(len(classes)), ignore_index=-100)
    return {"labels": labels, "channels": channels, "train": train, "val": val}


def build_classification_split(cfg: Any, split: str) -> ClassificationDataset:
    cfg = as_dict(cfg)
    src = _sources(cfg)
    if split not in src:
        raise DataError(f"{cfg['data']['root']}: no {split} split")
    channels = _channels(cfg["data"], src["train"][0])
    return ClassificationDataset(
        *src[split], channels, v2.Compose(_normalize(cfg["data"])), bool(cfg["data"]["cache"])
    )
