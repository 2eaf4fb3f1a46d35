"""Exporting a trained model to ONNX (dynamic batch, height and width) or TorchScript.

The pretrained config (classes, colours, preprocessing) is embedded in the file: as ONNX
metadata, or as a ``config.json`` extra file in the TorchScript archive, so ``tiramisu predict``
can run either without the checkpoint. With ``bn_eval: batch`` the graph computes per-image
normalisation (the paper's test-time BatchNorm) instead of using the running statistics.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import TiramisuError
from .fileio import atomic_write_from
from .models import batch_statistics


def _example(config: dict[str, Any]) -> torch.Tensor:
    channels = int(config["preprocessing"]["channels"])
    size = 2 ** len(config["model_config"].get("down_blocks", [0] * 5)) * 2
    return torch.randn(1, channels, max(64, size), max(64, size) + 32)


def export_onnx(
    model: nn.Module, config: dict[str, Any], path: str | Path, opset: int = 17
) -> Path:
    try:
        import onnx
    except ImportError:
        raise TiramisuError("ONNX export needs onnx (pip install 'tiramisu[export]')") from None
    path = Path(path)
    model = model.cpu().eval()
    bn = batch_statistics(model) if config.get("bn_eval") == "batch" else contextlib.nullcontext()
    axes = {0: "batch", 2: "height", 3: "width"}

    def write(tmp: str) -> None:
        with bn, torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about shape checks in forward()
            # The TorchScript-based exporter turns the centre crops' size arithmetic into
            # graph ops, so height and width stay dynamic.
            torch.onnx.export(
                model,
                (_example(config),),
                tmp,
                input_names=["image"],
                output_names=["logits"],
                opset_version=opset,
                dynamo=False,
                dynamic_axes={"image": axes, "logits": axes},
            )
        proto = onnx.load(tmp)
        entry = proto.metadata_props.add()
        entry.key, entry.value = "tiramisu_config", json.dumps(config)
        onnx.checker.check_model(proto)
        onnx.save(proto, tmp)

    return atomic_write_from(path, write)


def export_torchscript(model: nn.Module, config: dict[str, Any], path: str | Path) -> Path:
    model = model.cpu().eval()
    bn = batch_statistics(model) if config.get("bn_eval") == "batch" else contextlib.nullcontext()

    def write(tmp: str) -> None:
        with bn, torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(model, _example(config), check_trace=False)
            torch.jit.save(traced, tmp, _extra_files={"config.json": json.dumps(config)})

    return atomic_write_from(Path(path), write)
