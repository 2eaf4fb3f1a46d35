"""Tiny models and pretrained folders shared by the tests (fast on two CPU cores)."""

from pathlib import Path

import torch

from tiramisu.models import FCDenseNet
from tiramisu.pretrained import save_pretrained


def tiny_model(num_classes=4, in_channels=3, down=(1, 1)):
    torch.manual_seed(0)
    model = FCDenseNet(
        in_channels=in_channels,
        num_classes=num_classes,
        growth_rate=4,
        down_blocks=down,
        bottleneck_layers=1,
        first_conv_channels=8,
        dropout=0.0,
    )
    # Non-trivial running statistics, so that "running" and "batch" modes differ.
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(2, in_channels, 32, 32))
    return model.eval()


def tiny_config(model, bn_eval="running", mean=None, std=None):
    n = model.num_classes
    return {
        "library": "tiramisu",
        "format_version": 1,
        "task": "segmentation",
        "architecture": "FCDenseNet",
        "model_name": "tiny",
        "model_config": model.config,
        "classes": [f"c{i}" for i in range(n)],
        "colors": [[40 * i, 255 - 40 * i, 7] for i in range(n)],
        "ignore_index": 255,
        "bn_eval": bn_eval,
        "preprocessing": {"mean": mean, "std": std, "channels": model.in_channels},
    }


def tiny_pretrained(
    directory: Path, num_classes: int = 3, bn_eval: str = "running", classes=None, colors=None
) -> Path:
    """A saved tiny segmenter (safetensors + config.json) in ``directory``."""
    model = tiny_model(num_classes=num_classes)
    config = tiny_config(model, bn_eval=bn_eval)
    config.update({k: v for k, v in (("classes", classes), ("colors", colors)) if v is not None})
    return save_pretrained(model, config, directory)
