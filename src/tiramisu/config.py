"""Run configuration: built-in defaults, a YAML file on top, ``--set key=value`` on top of that.

Unknown keys are errors (a typo such as ``train.learning_rate`` must not be silently ignored).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

from .errors import TiramisuError


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; accept it as the float users mean."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


DEFAULTS: dict[str, Any] = {
    "task": "segmentation",  # segmentation | classification
    "model": {
        "name": "fcdensenet103",
        # Extra keyword arguments for the model constructor (dropout, upsampling, ...).
        "kwargs": {},
    },
    "data": {
        "dataset": "camvid",  # camvid | folder | synthetic | cifar10 | imagefolder
        "root": None,
        # folder datasets: paths relative to root (or absolute)
        "train_images": "train/images",
        "train_masks": "train/masks",
        "val_images": "val/images",
        "val_masks": "val/masks",
        "test_images": None,
        "test_masks": None,
        "classes": None,  # list of names for index masks (default: class_0, class_1, ...)
        "num_classes": None,
        "palette": None,  # JSON/YAML file: class name -> [r, g, b], for colour-coded masks
        "label_map": None,  # raw mask value -> class index, e.g. {255: 1}
        "ignore_index": None,  # default: 11 for CamVid, 255 otherwise
        "channels": "auto",  # 1, 3, 4 or auto (from the first training image)
        "crop_size": [224, 224],
        "hflip": True,
        "vflip": False,
        "scale_range": None,  # e.g. [0.75, 1.25]
        "pad_crop": 4,  # classification: zero-pad then random crop back to the input size
        "normalize": "unit",  # unit ([0, 1], the paper) | imagenet | cifar10 | mean_std
        "mean": None,
        "std": None,
        "val_fraction": 0.1,  # classification folders without a val split
        "download": False,  # cifar10: fetch cifar-10-batches-py into root if missing
        "cache": True,
        "num_workers": 0,
        "validate": True,
    },
    "train": {
        "epochs": 750,
        "batch_size": 3,
        "eval_batch_size": 1,
        "optimizer": "rmsprop",  # rmsprop | sgd | adam | adamw
        "lr": 1.0e-3,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 1.0e-4,
        "lr_schedule": "exponential",  # exponential | multistep | constant
        "lr_decay": 0.995,  # exponential: multiply the lr by this after every epoch
        "milestones": [0.5, 0.75],  # multistep: fractions of epochs
        "gamma": 0.1,
        "patience": 100,  # early stopping on the monitored metric; null disables it
        "monitor": "miou",  # miou | accuracy
        "class_weights": None,  # null | median_frequency | [w0, w1, ...]
        # auto: bf16 where the CPU/GPU computes it natively (else fp16 on older GPUs, none
        # on other CPUs) | none | bf16 | fp16. See BENCHMARKS.md for the measured speed-ups.
        "amp": "auto",
        "channels_last": "auto",  # auto: on when amp is on | true | false
        "compile": False,
        "seed": 0,
        "deterministic": False,
        "grad_clip": None,
        "bn_eval": "batch",  # batch (the paper: batch statistics at test time) | running
        "sync_bn": False,
        "val_every": 1,
        "max_steps_per_epoch": None,  # cap for smoke tests and budgets
        "max_minutes": None,  # wall-clock budget: stop after the epoch in which it runs out
        "log_every": 10,
    },
    "finetune": {
        "enabled": False,
        "epochs": 250,
        "batch_size": 1,
        "lr": 1.0e-4,
        "patience": 50,
        "crop_size": None,  # null = full frames
    },
}


def _merge(base: dict[str, Any], update: dict[str, Any], where: str = "") -> dict[str, Any]:
    for key, value in update.items():
        path = f"{where}{key}"
        if key not in base:
            raise TiramisuError(f"unknown config key {path!r}")
        if isinstance(base[key], dict) and key != "kwargs":
            if not isinstance(value, dict):
                raise TiramisuError(f"config key {path!r} must be a mapping, got {value!r}")
            _merge(base[key], value, f"{path}.")
        else:
            base[key] = value
    return base


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> dict[str, Any]:
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = Path(path)
        try:
            raw = parse_yaml(path.read_text()) or {}
        except OSError as e:
            raise TiramisuError(f"{path}: cannot read config ({e.strerror or e})") from None
        except yaml.YAMLError as e:
            raise TiramisuError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise TiramisuError(f"{path}: a config must be a mapping")
        try:
            _merge(cfg, raw)
        except TiramisuError as e:
            raise TiramisuError(f"{path}: {e}") from None
    for item in overrides or []:
        set_key(cfg, item)
    return cfg


def set_key(cfg: dict[str, Any], item: str) -> None:
    """Apply ``a.b.c=value``; the value is parsed as YAML (numbers, lists, null, true)."""
    if "=" not in item:
        raise TiramisuError(f"--set expects key=value, got {item!r}")
    key, text = item.split("=", 1)
    try:
        value = parse_yaml(text)
    except yaml.YAMLError:
        value = text
    parts = key.strip().split(".")
    node = cfg
    for i, part in enumerate(parts[:-1]):
        if part not in node or not isinstance(node[part], dict):
            raise TiramisuError(f"unknown config key {'.'.join(parts[: i + 1])!r}")
        node = node[part]
    if parts[-1] not in node and not (len(parts) >= 2 and parts[-2] == "kwargs"):
        raise TiramisuError(f"unknown config key {key!r}")
    node[parts[-1]] = value
