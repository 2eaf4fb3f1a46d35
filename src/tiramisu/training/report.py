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
from ..errors import CheckpointError, TiramisuError
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


NOT_RECORDED = "not recorded"


def machine_segments(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A run's history cut into stretches of consecutive epochs of one stage that ran on the
    same machine in the same precision, with their throughput and wall time.

    Long runs are resumed on whatever machine a session gets, so a single "hardware" line would
    misreport most of the epochs. Records written before epochs kept their machine (or by
    another tool) fall into stretches whose machine and precision are ``"not recorded"``.
    Each stretch also keeps its shortest and longest epoch in minutes (train + validation), over
    whole validated epochs only: one cut short by a time budget would widen the range with a
    figure no epoch takes. A label can cover machines of different speed, and the range shows it.
    """
    segments: list[dict[str, Any]] = []
    for record in history:
        machine = record.get("machine") or NOT_RECORDED
        precision = record.get("precision") or NOT_RECORDED
        seconds = float(record.get("train_time_s") or 0.0)
        images = float(record.get("train_images_per_s") or 0.0) * seconds
        wall = seconds + float(record.get("val_time_s") or 0.0)
        last = segments[-1] if segments else None
        if (
            last is None
            or (last["stage"], last["machine"], last["precision"])
            != (record["stage"], machine, precision)
            or record["epoch"] != last["last_epoch"] + 1
        ):
            last = {
                "stage": record["stage"],
                "first_epoch": record["epoch"],
                "last_epoch": record["epoch"],
                "machine": machine,
                "precision": precision,
                "train_images": 0.0,
                "train_seconds": 0.0,
                "wall_seconds": 0.0,
                "epoch_minutes": None,
            }
            segments.append(last)
        if not record.get("partial_epoch") and record.get("val_time_s") is not None:
            minutes = wall / 60
            lo, hi = last["epoch_minutes"] or (minutes, minutes)
            last["epoch_minutes"] = (min(lo, minutes), max(hi, minutes))
        last["last_epoch"] = record["epoch"]
        last["train_images"] += images
        last["train_seconds"] += seconds
        last["wall_seconds"] += wall
    for seg in segments:
        seg["epochs"] = seg["last_epoch"] - seg["first_epoch"] + 1
        seg["train_images_per_s"] = seg["train_images"] / max(seg["train_seconds"], 1e-9)
    return segments


def format_machine_segments(segments: list[dict[str, Any]]) -> str:
    """:func:`machine_segments` as a Markdown table, one row per stretch."""
    rows = [
        "| epochs | stage | machine | precision | train img/s | min per epoch | hours |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in segments:
        span = f"{s['first_epoch']}-{s['last_epoch']}" if s["epochs"] > 1 else str(s["last_epoch"])
        if s["epoch_minutes"] is None:
            minutes = "-"
        else:
            lo, hi = (round(m) for m in s["epoch_minutes"])
            minutes = str(lo) if lo == hi else f"{lo}-{hi}"
        rows.append(
            f"| {span} | {s['stage']} | {s['machine']} | {s['precision']} | "
            f"{s['train_images_per_s']:.2f} | {minutes} | {s['wall_seconds'] / 3600:.2f} |"
        )
    return "\n".join(rows)


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
    tta: bool = False,
    amp: str | None = None,
) -> dict[str, Any]:
    """Evaluate a training checkpoint on one split, single process, writing the report.

    ``amp`` None keeps the precision the run trained with ("auto" resolves on this machine).
    """
    overrides = [f"data.root={json.dumps(str(data_root))}"] if data_root is not None else []
    if amp is not None:
        overrides.append(f"train.amp={amp}")
    config = RunConfig.from_dict(ckpt["config"], where="checkpoint").with_overrides(overrides)
    labels = _labels(config, ckpt["labels"])
    channels = int(ckpt["in_channels"])
    model = build_model(
        config.model.name,
        config.model.kwargs,
        num_classes=labels.num_classes,
        in_channels=channels,
    )
    load_model_state(model, ckpt["model"], "checkpoint")
    source = {"epoch": ckpt.get("epoch"), "stage": ckpt.get("stage")}
    return _evaluate_model(
        model, config, labels, channels, split, source, out_dir, json_path, device, quiet, tta
    )


def evaluate_pretrained(
    path_or_id: str | Path,
    split: str,
    data_root: str | None = None,
    data_config: str | Path | None = None,
    out_dir: Path | None = None,
    json_path: Path | None = None,
    device: str = "auto",
    quiet: bool = False,
    tta: bool = False,
    amp: str = "auto",
) -> dict[str, Any]:
    """Evaluate exported weights (a folder, a shipped name or a Hub id) on a dataset split.

    Exported weights keep the model, its classes and preprocessing but not where the data
    lies nor how a custom layout pairs and decodes its masks: ``data_root`` is the dataset
    folder, and ``data_config`` a run config whose ``data`` section describes a custom layout
    (pair lists, suffixes, label maps, palettes). The weights' preprocessing always wins.
    """
    from ..pretrained import load_pretrained

    model, pcfg = load_pretrained(path_or_id)
    config = pretrained_run_config(pcfg, data_root, data_config, str(path_or_id), amp)
    labels = _labels(config, pcfg)
    if labels.num_classes != len(pcfg["classes"]):
        raise CheckpointError(
            f"{path_or_id}: the weights predict {len(pcfg['classes'])} classes but the data "
            f"config decodes masks into {labels.num_classes}"
        )
    channels = int(pcfg["preprocessing"]["channels"])
    source = {"weights": str(path_or_id), "trained": pcfg.get("trained")}
    return _evaluate_model(
        model, config, labels, channels, split, source, out_dir, json_path, device, quiet, tta
    )


def _labels(config: RunConfig, recorded: dict[str, Any]) -> Any:
    """Classifiers: the recorded classes; segmentation: the data config's, which also say how
    masks decode (palettes, label maps)."""
    from ..data import LabelSpec, label_spec

    if config.task == "classification":
        colors = [tuple(c) for c in recorded["colors"]]
        return LabelSpec(list(recorded["classes"]), colors, int(recorded["ignore_index"]))
    return label_spec(config.to_dict()["data"])


def pretrained_run_config(
    pcfg: dict[str, Any],
    data_root: str | None,
    data_config: str | Path | None,
    source: str,
    amp: str = "auto",
) -> RunConfig:
    """The run config that evaluates exported weights: their model, preprocessing, BN mode."""
    from ..config import load_config

    pre = pcfg["preprocessing"]
    if data_config is not None:
        data = load_config(data_config).to_dict()["data"]
    else:
        trained = (pcfg.get("trained") or {}).get("dataset")
        if pcfg["task"] == "classification":
            kind = trained if trained in ("cifar10", "imagefolder") else "imagefolder"
        else:
            kind = trained if trained in ("camvid", "synthetic") else "folder"
        # 255 is the default, and naming it for two classes reads as a conflict (0/255 masks).
        ignore = pcfg.get("ignore_index")
        data = {
            "dataset": kind,
            "classes": list(pcfg["classes"]) if kind == "folder" else None,
            "ignore_index": None if ignore == 255 else ignore,
        }
    if data_root is not None:
        data["root"] = str(data_root)
    if not data.get("root"):
        raise TiramisuError(
            f"{source}: exported weights do not record where their data is: give --data-root "
            "(and --config with a data section for a custom layout)"
        )
    mean, std = pre.get("mean"), pre.get("std")
    data.update(
        normalize="unit" if mean is None else "mean_std",
        mean=mean,
        std=std,
        channels=int(pre["channels"]),
    )
    raw = {
        "task": pcfg["task"],
        "model": {"name": pcfg["model_name"]},
        "data": data,
        "train": {"bn_eval": pcfg.get("bn_eval", "running"), "amp": amp},
    }
    return RunConfig.from_dict(raw, where=source)


def _evaluate_model(
    model: nn.Module,
    config: RunConfig,
    labels: Any,
    channels: int,
    split: str,
    source: dict[str, Any],
    out_dir: Path | None,
    json_path: Path | None,
    device: str,
    quiet: bool,
    tta: bool,
) -> dict[str, Any]:
    cfg = config.to_dict()
    dataset = build_eval_dataset(cfg, split, labels, channels)
    if hasattr(dataset, "validate"):
        dataset.validate()
    dev = resolve_device(device)
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
        tta=tta,
    )
    metrics.pop("loss", None)
    metrics.update(split=split, classes=labels.classes, tta=tta, **source)
    if out_dir is not None:
        write_report(config, metrics, labels.classes, out_dir, split, quiet=quiet)
        if json_path is not None:
            atomic_write_text(json_path, json.dumps(metrics, indent=2))
    return metrics
