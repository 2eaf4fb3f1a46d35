"""Reports on a trained model: the end-of-run report, and evaluating a checkpoint on a split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import nn

from ..checkpoint import load_checkpoint
from ..config import RunConfig
from ..data.builders import build_eval_dataset, make_loader
from ..errors import CheckpointError
from ..fileio import atomic_write_text
from ..hardware import resolve_device, resolve_precision
from ..metrics import PAPER_CAMVID, format_report
from ..models import build_model
from .loop import evaluate
from .run_folder import BestTracker
from .runtime import Runtime, ShardSampler


def final_report(
    config: RunConfig,
    data: dict[str, Any],
    model: nn.Module,
    out: Path,
    best: BestTracker,
    rt: Runtime,
    quiet: bool,
) -> dict[str, Any]:
    """Validation metrics of ``best.pt``, written as ``metrics.json`` and ``report_val.txt``."""
    best_path = out / "best.pt"
    if rt.distributed:
        dist.barrier()  # rank 0 has finished writing best.pt
    labels = data["labels"]
    stored = load_checkpoint(best_path, rt.device) if best_path.exists() else None
    if stored is not None and stored.get("val_metrics") is not None:
        # The best epoch's validation pass already measured these weights; evaluation is
        # deterministic, so re-running it (minutes on CPU for CamVid) would only repeat it.
        metrics = dict(stored["val_metrics"])
    else:
        if stored is not None:
            model.load_state_dict(stored["model"])
        tcfg = config.train
        loader = make_loader(
            data["val"],
            tcfg.eval_batch_size,
            rt.device,
            workers=config.data.num_workers,
            sampler=ShardSampler(len(data["val"]), rt.rank, rt.world_size),
        )
        metrics = evaluate(
            model,
            loader,
            labels.num_classes,
            labels.ignore_index,
            rt.device,
            bn_eval=tcfg.bn_eval,
            amp=tcfg.amp,
            channels_last=tcfg.channels_last,
        )
    metrics.pop("loss", None)
    metrics.update(
        split="val",
        checkpoint=str(best_path),
        best_epoch=best.epoch,
        best_stage=best.stage,
        classes=labels.classes,
    )
    if rt.is_main:
        write_report(config, metrics, labels.classes, out, "val", quiet)
        # Printed even with --quiet: the one line a scripted run needs.
        name = "top-1 error" if config.task == "classification" else "mIoU"
        value = (
            1 - metrics["global_accuracy"] if config.task == "classification" else metrics["miou"]
        )
        print(
            f"best val {name} {100 * value:.2f} % (epoch {best.epoch}, {best.stage}); "
            f"report in {out / 'report_val.txt'}"
        )
    return metrics


def write_report(
    config: RunConfig,
    metrics: dict[str, Any],
    classes: list[str],
    out: Path,
    split: str,
    quiet: bool = False,
    json_path: Path | None = None,
) -> str:
    from ..metrics import format_classification_report
    from ..plots import plot_confusion

    if config.task == "classification":
        metrics["top1_error"] = 1.0 - metrics["global_accuracy"]
        text = format_classification_report(metrics, classes)
    else:
        is_camvid = config.data.dataset == "camvid"
        paper = PAPER_CAMVID.get(config.model.name) if is_camvid else None
        text = format_report(metrics, classes, paper)
        if paper:
            text += f"\n(paper column: Jégou et al. 2017, Table 3, CamVid test set; ours: {split})"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json_path or out / "metrics.json", json.dumps(metrics, indent=2))
    atomic_write_text(out / f"report_{split}.txt", text + "\n")
    plot_confusion(metrics["confusion_matrix"], classes, out / f"confusion_matrix_{split}.png")
    if not quiet:
        print(text)
    return text


def load_model_state(model: nn.Module, state: dict[str, Any], source: str) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(
            f"{source}: weights do not match the model "
            f"({first[1].strip() if len(first) > 1 else first[0]})"
        ) from None


def evaluate_checkpoint(
    ckpt: dict[str, Any],
    split: str,
    data_root: str | None = None,
    out_dir: Path | None = None,
    json_path: Path | None = None,
    device: str = "auto",
    quiet: bool = False,
) -> dict[str, Any]:
    """Evaluate a training checkpoint on one split, single process, writing the report."""
    from ..data import LabelSpec, label_spec

    overrides = [f"data.root={json.dumps(str(data_root))}"] if data_root is not None else []
    config = RunConfig.from_dict(ckpt["config"], where="checkpoint").with_overrides(overrides)
    cfg = config.to_dict()
    if config.task == "classification":
        lab = ckpt["labels"]
        labels = LabelSpec(
            list(lab["classes"]), [tuple(c) for c in lab["colors"]], int(lab["ignore_index"])
        )
    else:
        labels = label_spec(cfg["data"])  # also restores palettes / label maps for decoding
    channels = int(ckpt["in_channels"])
    dataset = build_eval_dataset(cfg, split, labels, channels)
    if hasattr(dataset, "validate"):
        dataset.validate()
    dev = resolve_device(device)
    model = build_model(
        config.model.name,
        config.model.kwargs,
        num_classes=labels.num_classes,
        in_channels=channels,
    )
    load_model_state(model, ckpt["model"], "checkpoint")
    model.to(dev)
    tcfg = config.train
    # "auto" in the checkpoint: this machine's choice
    amp, channels_last = resolve_precision(dev, tcfg.amp, tcfg.channels_last)
    loader = make_loader(dataset, tcfg.eval_batch_size, dev, workers=config.data.num_workers)
    metrics = evaluate(
        model,
        loader,
        labels.num_classes,
        labels.ignore_index,
        dev,
        bn_eval=tcfg.bn_eval,
        amp=amp,
        channels_last=channels_last,
        progress=not quiet,
    )
    metrics.pop("loss", None)
    metrics.update(
        split=split, classes=labels.classes, epoch=ckpt.get("epoch"), stage=ckpt.get("stage")
    )
    if out_dir is not None:
        write_report(config, metrics, labels.classes, out_dir, split, quiet=quiet)
        if json_path is not None:
            atomic_write_text(json_path, json.dumps(metrics, indent=2))
    return metrics
