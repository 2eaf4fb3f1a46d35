"""``tiramisu demo``: the whole pipeline on generated data, for a first look without a dataset."""

from __future__ import annotations

import time
from pathlib import Path

from .config import RunConfig, load_config
from .data import make_synthetic_dataset


def demo_config(data_root: Path, epochs: int) -> RunConfig:
    # A small FC-DenseNet (same code, fewer and thinner layers) so that the demo trains to a
    # visibly good segmentation in about a minute on a laptop CPU.
    return load_config(
        None,
        [
            "data.dataset=synthetic",
            f"data.root={data_root}",
            "data.train_images=train/images",
            "data.train_masks=train/masks",
            "data.val_images=val/images",
            "data.val_masks=val/masks",
            "data.crop_size=[96, 96]",
            "model.name=fcdensenet56",
            "model.kwargs={growth_rate: 8, down_blocks: [2, 2, 2], bottleneck_layers: 2, "
            "first_conv_channels: 16, dropout: 0.0}",
            "train.optimizer=adam",
            "train.lr=3e-3",
            "train.lr_decay=0.9",
            f"train.epochs={epochs}",
            "train.batch_size=4",
            "train.eval_batch_size=4",
            "train.patience=null",
            "train.bn_eval=running",
        ],
    )


def run_demo(out: Path, epochs: int = 12, device: str = "auto") -> dict:
    from .checkpoint import load_checkpoint
    from .data.builders import build_run_data
    from .hardware import resolve_device
    from .inference import save_predictions
    from .models import build_model
    from .training import train

    t0 = time.perf_counter()
    data_root = make_synthetic_dataset(out / "data", n_train=64, n_val=16, size=(96, 128))
    print(f"wrote a synthetic scene dataset to {data_root} (64 train / 16 val, 96x128)")
    cfg = demo_config(data_root, epochs)
    run = out / "run"
    metrics = train(cfg, run, device=device)
    data = build_run_data(cfg.to_dict())
    model = build_model(
        cfg.model.name,
        cfg.model.kwargs,
        num_classes=data["labels"].num_classes,
        in_channels=data["channels"],
    )
    model.load_state_dict(load_checkpoint(run / "best.pt")["model"])
    dev = resolve_device(device)
    save_predictions(
        model.to(dev),
        data["val"],
        run / "predictions",
        data["labels"].colors,
        limit=8,
        bn_eval=cfg.train.bn_eval,
        device=dev,
    )
    print(
        f"\ndemo finished in {time.perf_counter() - t0:.0f} s; look in {run}: "
        f"loss.png, miou.png, accuracy.png, confusion_matrix_val.png, metrics.json, "
        f"predictions/*_compare.png (image | truth | prediction)"
    )
    return metrics
