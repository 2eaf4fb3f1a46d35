"""Which image goes with which mask (and which valid-region mask), for each split.

Three ways to pair, so that nobody has to rename their files:

- folders, by name: ``images/21_training.tif`` with ``masks/21_manual1.gif`` once
  ``data.image_suffix: _training`` and ``data.mask_suffix: _manual1`` are stripped from the stems,
  or by the part of each stem that a regular expression picks out (``data.image_pattern:
  'img_(\\d+)'`` with ``data.mask_pattern: '(\\d+)_label'``: its group, or its group ``key``);
- a list file (``data.train_list``): one ``image,mask[,region]`` line per sample, paths relative
  to ``data.root`` (CSV with an optional header, or whitespace-separated TXT);
- CamVid's SegNet layout (``train/`` with ``trainannot/``).

Without a validation split (no ``val/images`` folder, or ``data.val_images: null``), a
deterministic, seeded ``data.val_fraction`` of the training pairs is held out for validation.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from .segmentation import camvid_pairs, list_images

DEFAULT_VAL_IMAGES = "val/images"


@dataclass
class Split:
    pairs: list[tuple[Path, Path]]
    regions: list[Path] | None = None
    note: str = ""  # how the split was made, for the run's log
    held_out: list[Path] = field(default_factory=list)


def _resolve(root: Any, path: Any) -> Path:
    p = Path(path)
    return p if p.is_absolute() or root is None else Path(root) / p


@dataclass(frozen=True)
class Naming:
    """How one kind of file (image, mask, region mask) is named: the pairing key of a stem is
    what is left without ``suffix``, or what ``pattern`` (matching the whole stem) captures."""

    what: str  # image, mask, region mask
    option: str  # the config key that sets it, for messages
    suffix: str = ""
    pattern: str | None = None

    def key(self, path: Path) -> str:
        stem = path.stem
        if self.pattern is None:
            return stem[: -len(self.suffix)] if self.suffix and stem.endswith(self.suffix) else stem
        m = re.fullmatch(self.pattern, stem)
        if m is None:
            raise DataError(f"{path}: the name does not match {self.option} {self.pattern!r}")
        if "key" in m.re.groupindex:
            return m.group("key")
        return m.group(1) if m.re.groups else m.group(0)

    def describe(self, key: str) -> str:
        """The name a partner with this key would have, for 'no mask named ...' errors."""
        if self.pattern is not None:
            return f"with a stem matching {self.pattern!r} that pairs as {key!r}"
        return f"named {key}{self.suffix}.*"


def _index(folder: Path, naming: Naming) -> dict[str, Path]:
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder")
    found: dict[str, Path] = {}
    for p in list_images(folder):
        key = naming.key(p)
        if key in found:
            raise DataError(f"{p}: two {naming.what}s pair as {key!r} (also {found[key].name})")
        found[key] = p
    return found


def pair_folders(
    image_dir: Path,
    mask_dir: Path,
    image_naming: Naming | None = None,
    mask_naming: Naming | None = None,
    region_dir: Path | None = None,
    region_naming: Naming | None = None,
) -> tuple[list[tuple[Path, Path]], list[Path] | None]:
    """Pair by the key of each file's name; a missing partner is an error."""
    image_naming = image_naming or Naming("image", "data.image_pattern")
    mask_naming = mask_naming or Naming("mask", "data.mask_pattern")
    images = _index(image_dir, image_naming)
    if not images:
        raise DataError(f"{image_dir}: no images found")
    masks = _index(mask_dir, mask_naming)
    hint = (
        " (set data.image_suffix / data.mask_suffix, or data.image_pattern / data.mask_pattern, "
        "if the names differ)"
    )
    for key in sorted(images):
        if key not in masks:
            n = len(set(images) - set(masks))
            raise DataError(
                f"{images[key]}: no mask {mask_naming.describe(key)} in {mask_dir}"
                + (f" (and {n - 1} more unpaired)" if n > 1 else "")
                + hint
            )
    for key in sorted(masks):
        if key not in images:
            raise DataError(f"{masks[key]}: no image {image_naming.describe(key)} in {image_dir}")
    keys = sorted(images)
    regions = None
    if region_dir is not None:
        region_naming = region_naming or Naming("region mask", "data.region_pattern")
        found = _index(region_dir, region_naming)
        missing = [k for k in keys if k not in found]
        if missing:
            raise DataError(
                f"{images[missing[0]]}: no region mask {region_naming.describe(missing[0])} "
                f"in {region_dir}"
            )
        regions = [found[k] for k in keys]
    return [(images[k], masks[k]) for k in keys], regions


def read_pair_list(path: Path, root: Any) -> tuple[list[tuple[Path, Path]], list[Path] | None]:
    """``image,mask[,region]`` per line (CSV, optional header) or whitespace-separated."""
    try:
        text = path.read_text()
    except OSError as e:
        raise DataError(f"{path}: cannot read the pair list ({e.strerror or e})") from None
    base = Path(root) if root is not None else path.parent
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        cells = next(csv.reader([line])) if "," in line else line.split()
        cells = [c.strip() for c in cells]
        if n == 1 and cells and cells[0].lower() in ("image", "images", "img"):
            continue  # a header
        if len(cells) not in (2, 3):
            raise DataError(f"{path}, line {n}: expected image,mask[,region], got {line!r}")
        rows.append([_resolve(base, c) for c in cells])
    if not rows:
        raise DataError(f"{path}: lists no pairs")
    widths = {len(r) for r in rows}
    if len(widths) > 1:
        raise DataError(f"{path}: some lines name a region mask and others do not")
    for r in rows:
        for p in r:
            if not p.is_file():
                raise DataError(f"{p}: no such file (listed in {path})")
    regions = [r[2] for r in rows] if widths == {3} else None
    return [(r[0], r[1]) for r in rows], regions


def hold_out(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Sorted (train, val) indices: a seeded ``fraction`` of ``n`` goes to validation."""
    if not 0 < fraction < 1:
        raise DataError(
            f"no validation split and data.val_fraction is {fraction}: give data.val_images / "
            f"data.val_list, or a val_fraction between 0 and 1"
        )
    n_val = max(1, round(fraction * n))
    if n_val >= n:
        raise DataError(f"only {n} training pair(s): too few to hold out a validation split")
    order = np.random.default_rng(seed).permutation(n)
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


def _explicit(data: dict[str, Any], split: str) -> tuple[list, list | None] | None:
    """The split's own pairs, or None when it has none configured."""
    root = data["root"]
    if data.get(f"{split}_list"):
        return read_pair_list(_resolve(root, data[f"{split}_list"]), root)
    images, masks = data.get(f"{split}_images"), data.get(f"{split}_masks")
    if images is None or masks is None:
        return None
    if split == "val" and images == DEFAULT_VAL_IMAGES and not _resolve(root, images).exists():
        return None  # the default location is simply absent: carve a hold-out instead
    regions = data.get(f"{split}_regions")
    return pair_folders(
        _resolve(root, images),
        _resolve(root, masks),
        _naming(data, "image"),
        _naming(data, "mask"),
        _resolve(root, regions) if regions else None,
        _naming(data, "region", "region mask"),
    )


def _naming(data: dict[str, Any], kind: str, what: str | None = None) -> Naming:
    pattern, suffix = data.get(f"{kind}_pattern"), data.get(f"{kind}_suffix") or ""
    if pattern is not None and suffix:
        raise DataError(f"data.{kind}_pattern and data.{kind}_suffix: give one or the other")
    return Naming(what or kind, f"data.{kind}_pattern", suffix, pattern)


def split_files(data: dict[str, Any], split: str) -> Split:
    """The (image, mask) pairs and region masks of ``split`` (train, val or test)."""
    if data["dataset"] == "camvid":
        if data["root"] is None:
            raise DataError("data.root (or --data-root) must point at the CamVid folder")
        return Split(camvid_pairs(data["root"], split))
    if split == "test":
        test = _explicit(data, "test")
        if test is None:
            raise DataError("no test split configured (data.test_images / data.test_masks)")
        return Split(*test)
    val = _explicit(data, "val")
    if split == "val" and val is not None:
        return Split(*val)  # evaluating needs no training data beside it
    train = _explicit(data, "train")
    if train is None:
        raise DataError("no training data configured (data.train_images / data.train_masks)")
    if val is not None:
        return Split(*train)
    pairs, regions = train
    fraction, seed = float(data["val_fraction"]), int(data.get("split_seed") or 0)
    keep, held = hold_out(len(pairs), fraction, seed)
    chosen = keep if split == "train" else held
    names = [pairs[i][0].name for i in held]
    shown = ", ".join(names[:20]) + (f", ... ({len(names) - 20} more)" if len(names) > 20 else "")
    note = (
        f"no validation split: held out {len(held)} of {len(pairs)} training pairs "
        f"(data.val_fraction={fraction}, data.split_seed={seed}) for validation: {shown}"
    )
    return Split(
        [pairs[i] for i in chosen],
        [regions[i] for i in chosen] if regions is not None else None,
        note,
        [pairs[i][0] for i in held],
    )
