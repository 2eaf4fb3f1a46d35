"""`tiramisu evaluate` on exported weights (folders, shipped names) and with flip TTA."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_pretrained
from PIL import Image

from tiramisu import Segmenter
from tiramisu.checkpoint import load_checkpoint
from tiramisu.cli import main
from tiramisu.config import load_config
from tiramisu.data import make_synthetic_dataset
from tiramisu.metrics import ConfusionMatrix
from tiramisu.training import evaluate_checkpoint, evaluate_pretrained, train

TINY = (
    "model.kwargs={growth_rate: 4, down_blocks: [1, 1], bottleneck_layers: 1, "
    "first_conv_channels: 8, dropout: 0.0}"
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(synthetic dataset, run folder) of a two-epoch tiny run with per-image BN statistics."""
    root = make_synthetic_dataset(
        tmp_path_factory.mktemp("scenes"), n_train=8, n_val=4, size=(40, 48), seed=5
    )
    out = tmp_path_factory.mktemp("run") / "run"
    overrides = [
        "data.dataset=synthetic",
        f"data.root={root}",
        "data.crop_size=[32, 32]",
        TINY,
        "model.name=fcdensenet56",
        "train.epochs=2",
        "train.batch_size=4",
        "train.eval_batch_size=2",
        "train.optimizer=adam",
        "train.lr=1e-2",
        "train.patience=null",
        "train.bn_eval=batch",
        "train.amp=none",
    ]
    train(load_config(None, overrides), out, quiet=True)
    return root, out


def cm_of(segmenter: Segmenter, images: list[Path], masks: list[Path], tta: bool) -> list:
    cm = ConfusionMatrix(len(segmenter.classes), 255)
    for image, mask in zip(images, masks, strict=True):
        prediction = torch.from_numpy(segmenter.predict(image, tta=tta).astype(np.int64))
        cm.update(prediction, torch.from_numpy(np.asarray(Image.open(mask)).astype(np.int64)))
    return cm.compute()["confusion_matrix"]


def test_exported_weights_evaluate_exactly_as_their_checkpoint(trained, tmp_path, capsys):
    root, run = trained
    weights = tmp_path / "weights"
    export = ["export-weights", "--checkpoint", str(run / "best.pt"), "--out", str(weights)]
    assert main(export) == 0
    from_checkpoint = evaluate_checkpoint(load_checkpoint(run / "best.pt"), "val", quiet=True)
    capsys.readouterr()
    # --amp none: on a CPU with native bf16 "auto" would evaluate the weights in bf16
    args = ["evaluate", "--checkpoint", str(weights), "--data-root", str(root), "--amp", "none"]
    assert main([*args, "--json", str(tmp_path / "m.json"), "--out", str(tmp_path / "ev")]) == 0
    assert "mean IoU" in capsys.readouterr().out
    from_weights = json.loads((tmp_path / "m.json").read_text())
    # fp32 weights, the same frames, batch statistics per image: the same counts, pixel for pixel
    assert from_weights["confusion_matrix"] == from_checkpoint["confusion_matrix"]
    assert from_weights["miou"] == from_checkpoint["miou"]
    assert from_weights["weights"] == str(weights) and from_weights["trained"]["epoch"] >= 1
    assert (tmp_path / "ev" / "report_val.txt").is_file()


def test_flip_tta_metrics_are_those_of_segmenter_predict_with_tta(trained, tmp_path):
    root, run = trained
    weights = tmp_path / "weights"
    main(["export-weights", "--checkpoint", str(run / "best.pt"), "--out", str(weights)])
    images = sorted((root / "val" / "images").glob("*.png"))
    masks = [root / "val" / "masks" / p.name for p in images]
    segmenter = Segmenter.from_pretrained(weights)
    fp32 = {"data_root": str(root), "quiet": True, "amp": "none"}  # Segmenter.predict is fp32
    plain = evaluate_pretrained(weights, "val", **fp32)
    flipped = evaluate_pretrained(weights, "val", tta=True, **fp32)
    assert plain["confusion_matrix"] == cm_of(segmenter, images, masks, tta=False)
    assert flipped["confusion_matrix"] == cm_of(segmenter, images, masks, tta=True)
    assert flipped["confusion_matrix"] != plain["confusion_matrix"]  # the mirror changed pixels
    assert flipped["tta"] is True and plain["tta"] is False


def write_pairs(folder: Path, names: list[str], suffix: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    (folder / "pics").mkdir(parents=True)
    (folder / "labels").mkdir()
    for name in names:
        Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(
            folder / "pics" / f"{name}.png"
        )
        Image.fromarray(rng.integers(0, 3, (32, 40), dtype=np.uint8)).save(
            folder / "labels" / f"{name}{suffix}.png"
        )


def test_own_layout_is_described_by_config_and_counted_like_predict(tmp_path):
    weights = tiny_pretrained(tmp_path / "tiny", num_classes=3)
    root = tmp_path / "data"
    write_pairs(root, ["a", "b", "c"], "_gt", seed=1)
    layout = tmp_path / "layout.yaml"
    layout.write_text(
        "data:\n  dataset: folder\n  val_images: pics\n  val_masks: labels\n"
        "  mask_suffix: _gt\n  classes: [c0, c1, c2]\n  normalize: imagenet\n"
    )
    got = evaluate_pretrained(
        weights,
        "val",
        data_root=str(root),
        data_config=layout,
        quiet=True,
        device="cpu",
        amp="none",
    )
    images = sorted((root / "pics").glob("*.png"))
    masks = [root / "labels" / f"{p.stem}_gt.png" for p in images]
    # The weights' preprocessing (no normalisation here) wins over the layout's `imagenet`.
    expected = cm_of(Segmenter.from_pretrained(weights), images, masks, tta=False)
    assert got["confusion_matrix"] == expected
    assert sum(map(sum, got["confusion_matrix"])) == 3 * 32 * 40


def test_exported_weights_without_data_or_with_other_classes_are_refused(tmp_path, capsys):
    weights = tiny_pretrained(tmp_path / "tiny", num_classes=3)
    assert main(["evaluate", "--checkpoint", str(weights)]) != 0
    err = capsys.readouterr().err.strip()
    assert "--data-root" in err and str(weights) in err and len(err.splitlines()) == 1
    layout = tmp_path / "four.yaml"
    layout.write_text("data:\n  dataset: folder\n  classes: [a, b, c, d]\n")
    args = ["evaluate", "--checkpoint", str(weights), "--data-root", str(tmp_path)]
    assert main([*args, "--config", str(layout)]) != 0
    err = capsys.readouterr().err.strip()
    assert "predict 3 classes" in err and "into 4" in err and len(err.splitlines()) == 1


def test_config_with_a_training_checkpoint_and_a_missing_checkpoint_are_one_line_errors(
    tmp_path, capsys
):
    missing = tmp_path / "best.pt"
    assert main(["evaluate", "--checkpoint", str(missing)]) != 0
    err = capsys.readouterr().err.strip()
    assert str(missing) in err and len(err.splitlines()) == 1
    torch.save({"not": "a checkpoint"}, missing)
    layout = tmp_path / "x.yaml"
    layout.write_text("data: {dataset: folder}\n")
    assert main(["evaluate", "--checkpoint", str(missing), "--config", str(layout)]) != 0
    err = capsys.readouterr().err.strip()
    assert "--config is for exported weights" in err and len(err.splitlines()) == 1
