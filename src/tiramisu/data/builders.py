"""From a run configuration to the datasets and loaders a training run or an evaluation needs."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import TiramisuError


def build_run_data(cfg: Any) -> dict[str, Any]:
    """``labels``, ``channels``, ``train`` and ``val`` datasets (segmentation or classification)."""
    from . import build_dataset, label_spec, resolve_channels

    cfg = as_dict(cfg)
    data = cfg["data"]
    if cfg["task"] == "classification":
        from .classification import build_classification_data

        return build_classification_data(cfg)
    if data["dataset"] == "synthetic" and data["root"] is None:
        raise TiramisuError("data.root must be set for the synthetic dataset")
    labels = label_spec(data)
    channels = resolve_channels(data)
    train_ds = build_dataset(cfg, "train", train=True, labels=labels, channels=channels)
    val_ds = build_dataset(cfg, "val", train=False, labels=labels, channels=channels)
    return {"labels": labels, "channels": channels, "train": train_ds, "val": val_ds}


def build_eval_dataset(cfg: dict[str, Any], split: str, labels: Any, channels: int) -> Dataset:
    if cfg["task"] == "classification":
        from .classification import build_classification_split

        return build_classification_split(cfg, split)
    from . import build_dataset

    return build_dataset(cfg, split, train=False, labels=labels, channels=channels)


def with_crop(cfg: dict[str, Any], data: dict[str, Any], crop: Any) -> Dataset:
    """The training set again with another crop (fine-tuning), sharing decoded frames."""
    from . import build_dataset

    changed = dict(cfg, data=dict(cfg["data"], crop_size=crop))
    ds = build_dataset(
        changed, "train", train=True, labels=data["labels"], channels=data["channels"]
    )
    ds._cache = data["train"]._cache
    return ds


def make_loader(
    ds: Dataset,
    batch_size: int,
    device: torch.device,
    *,
    workers: int = 0,
    sampler: Sampler | None = None,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> DataLoader:
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=shuffle if sampler is None else False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        drop_last=drop_last,
        generator=generator,
        persistent_workers=False,
    )


def as_dict(config: Any) -> dict[str, Any]:
    """The data layer reads plain mappings; a RunConfig gives it a fresh copy."""
    return config.to_dict() if dataclasses.is_dataclass(config) else config
