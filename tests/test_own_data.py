"""Users' own data: hold-out splits, pairing by suffix or list, region masks, binary masks,
Dice/focal losses and binary metrics, the time budget, channel inference."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tiramisu.config import load_config
from tiramisu.data import build_dataset, label_spec, resolve_channels
from tiramisu.data.pairing import split_files
from tiramisu.errors import DataError
from tiramisu.losses import FocalLoss, SoftDiceLoss, build_loss
from tiramisu.metrics import binary_metrics, metrics_from_confusion
from tiramisu.training import train

TINY = (
    "model.kwargs={growth_rate: 4, down_blocks: [1, 1], bottleneck_layers: 1, "
    "first_conv_channels: 8, dropout: 0.0}"
)


def save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def binary_set(
    root: Path,
    n: int = 10,
    size=(40, 48),
    image_name="{i}.png",
    mask_name="{i}.png",
    grey_first=False,
):
    rng = np.random.default_rng(0)
    for i in range(n):
        img = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
        if grey_first and i == 0:
            img = img[..., 0]
        mask = np.zeros(size, np.uint8)
        mask[5 + i % 5 : 20, 10:30] = 255
        save(root / "train" / "images" / image_name.format(i=i), img)
        save(root / "train" / "masks" / mask_name.format(i=i), mask)
    return root


def folder(root: Path, **data) -> dict:
    cfg = load_config(None, [f"data.root={root}", "data.dataset=folder"]).to_dict()
    cfg["data"].update(classes=["background", "vessel"], **data)
    return cfg


# ----------------------------------------------------------------------------- splits
def test_val_fraction_holds_out_a_seeded_split(tmp_path):
    binary_set(tmp_path, n=10)
    cfg = folder(tmp_path, val_fraction=0.2)
    train_split, val_split = split_files(cfg["data"], "train"), split_files(cfg["data"], "val")
    names = lambda s: {p[0].name for p in s.pairs}  # noqa: E731
    assert len(train_split.pairs) == 8 and len(val_split.pairs) == 2
    assert names(train_split).isdisjoint(names(val_split))
    assert names(val_split) == names(split_files(cfg["data"], "val"))  # deterministic
    assert all(n in val_split.note for n in names(val_split))
    other = folder(tmp_path, val_fraction=0.2, split_seed=3)
    assert names(split_files(other["data"], "val")) != names(val_split)
    # An explicitly named validation folder that does not exist is a mistake, not a hold-out.
    with pytest.raises(DataError, match="valid/images: no such folder"):
        split_files(folder(tmp_path, val_images="valid/images")["data"], "val")


def binary_run(root: Path) -> list[str]:
    """Overrides for a tiny FC-DenseNet on the folder set that ``binary_set`` writes."""
    return [
        f"data.root={root}",
        "data.dataset=folder",
        "data.classes=[bg, fg]",
        "data.crop_size=[32, 32]",
        TINY,
        "model.name=fcdensenet56",
    ]


def test_training_logs_which_files_were_held_out(tmp_path, capsys):
    binary_set(tmp_path, n=6)
    cfg = load_config(
        None,
        [
            *binary_run(tmp_path),
            "train.epochs=1",
            "train.amp=none",
            "data.val_fraction=0.34",
        ],
    )
    train(cfg, tmp_path / "run")
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "held out" in x)
    assert "held out 2 of 6 training pairs" in line and ".png" in line


# ----------------------------------------------------------------------------- pairing
def test_suffix_pairing_like_the_retina_set(tmp_path):
    binary_set(tmp_path, n=3, image_name="{i}_training.png", mask_name="{i}_manual1.png")
    cfg = folder(
        tmp_path,
        image_suffix="_training",
        mask_suffix="_manual1",
        val_images="train/images",
        val_masks="train/masks",
    )
    pairs = split_files(cfg["data"], "train").pairs
    assert [(a.name, b.name) for a, b in pairs] == [
        (f"{i}_training.png", f"{i}_manual1.png") for i in range(3)
    ]
    bare = folder(tmp_path, val_images="train/images", val_masks="train/masks")
    with pytest.raises(
        DataError,
        match=r"0_training\.png: no mask named 0_training\.\* .*"
        r"and 2 more.*mask_suffix",
    ):
        split_files(bare["data"], "train")


def test_pattern_pairing_when_names_differ_by_more_than_a_suffix(tmp_path):
    binary_set(tmp_path, n=3, image_name="img_{i:03d}.png", mask_name="scan{i}_label.png")
    both = {"val_images": "train/images", "val_masks": "train/masks"}
    # One group is the key: '000' on both sides (the mask's group asks for three digits).
    cfg = folder(
        tmp_path, image_pattern=r"img_(\d+)", mask_pattern=r"scan(?P<key>\d+)_label", **both
    )
    with pytest.raises(DataError, match=r"img_000\.png: no mask with a stem matching .* '000'"):
        split_files(cfg["data"], "train")
    cfg = folder(tmp_path, image_pattern=r"img_0*(\d+)", mask_pattern=r"scan(\d+)_label", **both)
    pairs = split_files(cfg["data"], "train").pairs
    assert [(a.name, b.name) for a, b in pairs] == [
        (f"img_{i:03d}.png", f"scan{i}_label.png") for i in range(3)
    ]
    # A file that the pattern does not describe is named, not silently skipped.
    save(tmp_path / "train" / "masks" / "notes.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError, match=r"notes\.png: the name does not match data\.mask_pattern"):
        split_files(cfg["data"], "train")
    clash = folder(tmp_path, image_pattern=r"img_(\d+)", image_suffix="_x", **both)
    with pytest.raises(DataError, match="data.image_pattern and data.image_suffix"):
        split_files(clash["data"], "train")


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("(a)(b)", "a regular expression with one group, or a group named 'key'"),
        ("img_(", "a valid regular expression"),
    ],
)
def test_bad_patterns_are_config_errors(pattern, message):
    from tiramisu.errors import TiramisuError

    with pytest.raises(TiramisuError, match=re.escape(f"data.image_pattern must be {message}")):
        load_config(None, [f"data.image_pattern='{pattern}'"])
    load_config(None, ["data.image_pattern='(?P<key>a)(b)'"])  # two groups, one named key


def test_list_file_pairing(tmp_path):
    binary_set(tmp_path, n=3)
    (tmp_path / "train.csv").write_text(
        "image,mask\n" + "".join(f"train/images/{i}.png,train/masks/{i}.png\n" for i in (2, 0))
    )
    cfg = folder(tmp_path, train_list="train.csv", val_list="train.csv")
    pairs = split_files(cfg["data"], "train").pairs
    assert [p[0].name for p in pairs] == ["2.png", "0.png"]
    (tmp_path / "bad.txt").write_text("train/images/0.png train/masks/9.png\n")
    with pytest.raises(DataError, match=r"masks/9\.png: no such file \(listed in .*bad\.txt\)"):
        split_files(folder(tmp_path, train_list="bad.txt")["data"], "train")


# ----------------------------------------------------------------------------- regions
def test_region_masks_are_ignored_in_loss_and_metrics(tmp_path):
    binary_set(tmp_path, n=2)
    for i in range(2):
        region = np.zeros((40, 48), np.uint8)
        region[:, :24] = 255  # only the left half is a valid field of view
        save(tmp_path / "train" / "fov" / f"{i}_mask.png", region)
    cfg = folder(
        tmp_path,
        train_regions="train/fov",
        region_suffix="_mask",
        crop_size=None,
        val_images="train/images",
        val_masks="train/masks",
        hflip=False,
    )
    ds = build_dataset(cfg, "train", train=True)
    _, y = ds[0]
    assert (y[:, 24:] == 255).all() and (y[:, :24] != 255).all()
    # The metrics count only the valid half: 40 x 24 pixels per image.
    from tiramisu.metrics import ConfusionMatrix

    cm = ConfusionMatrix(2, 255)
    cm.update(torch.zeros_like(y)[None], y[None])
    assert sum(cm.compute()["support"]) == 40 * 24


# ----------------------------------------------------------------------------- binary masks
def test_ignore_index_255_with_0_255_masks_is_called_out(tmp_path):
    binary_set(tmp_path, n=2)
    with pytest.raises(DataError, match="ignore_index is 255, but with 2 classes 0/255 masks"):
        label_spec(folder(tmp_path, ignore_index=255)["data"])
    spec = label_spec(folder(tmp_path)["data"])
    assert spec.label_map == {255: 1} and spec.ignore_index == 255


def test_dice_and_focal_on_hand_computed_cases():
    # Three pixels: p = 0.5 / 0.5 for the first two, the third is ignored (and confidently wrong).
    logits = torch.tensor([[[[0.0, 0.0, 9.0]], [[0.0, 0.0, -9.0]]]])  # 1 x 2 x 1 x 3
    target = torch.tensor([[[0, 1, 7]]])
    # Class 0: I = 0.5, |P| + |G| = 1 + 1 -> Dice 0.5; class 1 the same -> loss 0.5.
    assert SoftDiceLoss(ignore_index=7, smooth=0.0)(logits, target).item() == pytest.approx(0.5)
    # Focal: each labelled pixel has p_t = 0.5: (1 - 0.5)^2 * ln 2.
    focal = FocalLoss(ignore_index=7, gamma=2.0)(logits, target).item()
    assert focal == pytest.approx(0.25 * math.log(2))
    # gamma = 0 is cross-entropy.
    ce = torch.nn.functional.cross_entropy(logits, target, ignore_index=7)
    assert FocalLoss(7, 0.0)(logits, target).item() == pytest.approx(ce.item())
    dice_ce = build_loss("dice_ce", 7)(logits, target).item()
    assert dice_ce == pytest.approx(1 / 3 + math.log(2))  # smooth 1: 1 - (1 + 1) / (2 + 1)
    # Gradients flow and a perfect prediction has (almost) zero Dice loss.
    perfect = torch.tensor([[[[9.0, -9.0]], [[-9.0, 9.0]]]], requires_grad=True)
    loss = SoftDiceLoss(smooth=0.0)(perfect, torch.tensor([[[0, 1]]]))
    loss.backward()
    assert loss.item() < 1e-3 and perfect.grad is not None


def test_binary_metrics_on_a_hand_computed_matrix():
    matrix = torch.tensor([[5, 1], [2, 2]])  # rows: truth, columns: prediction
    fg = binary_metrics(matrix)
    assert fg == pytest.approx({"iou": 2 / 5, "dice": 4 / 7, "precision": 2 / 3, "recall": 1 / 2})
    assert metrics_from_confusion(matrix)["foreground"] == fg
    assert "foreground" not in metrics_from_confusion(torch.eye(3, dtype=torch.int64))


# ----------------------------------------------------------------------------- budget
def fake_clock(monkeypatch, *modules) -> None:
    """Every look at the clock by these modules is one "second" later. Replacing their ``time``
    rather than ``time.monotonic`` keeps other threads (tqdm's monitor, Event.wait) from
    advancing it, which made the count depend on the machine's load."""
    import types

    now = [0.0]

    def look() -> float:
        now[0] += 1.0
        return now[0]

    for module in modules:
        monkeypatch.setattr(
            module, "time", types.SimpleNamespace(monotonic=look, perf_counter=look)
        )


def budget_run(tmp_path, *overrides: str) -> list[dict]:
    """Train a tiny binary model for at most 100 epochs under ``overrides``; the history rows."""
    binary_set(tmp_path, n=8)
    common = [
        *binary_run(tmp_path),
        "train.epochs=100",
        "train.amp=none",
        "train.batch_size=2",
    ]
    train(load_config(None, [*common, *overrides]), tmp_path / "run")
    lines = (tmp_path / "run" / "history.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines]


def test_time_budget_stops_mid_epoch(tmp_path, monkeypatch, capsys):
    import tiramisu.training.runtime as runtime

    fake_clock(monkeypatch, runtime)
    rows = budget_run(tmp_path, "train.max_minutes=0.1")
    # 6 "seconds" of budget, one clock look per step (3 steps per epoch): it ends within the
    # third epoch, which is validated and recorded as partial.
    assert len(rows) <= 3 and rows[-1].get("partial_epoch") is True
    assert "time budget of 0.1 minutes used up" in capsys.readouterr().out
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_time_budget_with_whole_epochs_stops_between_epochs(tmp_path, monkeypatch, capsys):
    """A run trained in chunks (the GPU sessions) must not cut an epoch short: each chunk would
    otherwise add a partial epoch and an extra learning-rate decay to the schedule."""
    import tiramisu.training.loop as loop
    import tiramisu.training.runtime as runtime
    import tiramisu.training.trainer as trainer

    fake_clock(monkeypatch, loop, runtime, trainer)
    rows = budget_run(tmp_path, "train.max_minutes=1", "train.whole_epochs=true")
    assert 2 <= len(rows) < 100
    assert not any(row.get("partial_epoch") for row in rows)
    log = capsys.readouterr().out
    assert f"time budget: epoch {len(rows) + 1} would take about" in log
    assert "stopping between epochs" in log and "used up" not in log


# ----------------------------------------------------------------------------- channels
def test_channels_come_from_several_files(tmp_path, capsys):
    binary_set(tmp_path, n=4, grey_first=True)
    assert resolve_channels(folder(tmp_path)["data"]) == 3
    assert "mix 1, 3 channels (e.g. 0.png has 1); using 3" in capsys.readouterr().out


# ----------------------------------------------------------------------------- README
def test_the_readme_binary_example_works_as_written(tmp_path, capsys):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"```yaml\n(# binary.*?)```", readme, re.S)
    assert block, "README has no binary example"
    cfg = yaml.safe_load(block.group(1))
    root = tmp_path / "vessels"
    for i in range(6):  # greyscale images, 0/255 masks, no validation split
        img = np.random.default_rng(i).integers(0, 255, (48, 48), dtype=np.uint8)
        mask = np.zeros((48, 48), np.uint8)
        mask[10:14, :] = 255
        save(root / cfg["data"]["train_images"] / f"{i}_training.png", img)
        save(root / cfg["data"]["train_masks"] / f"{i}_manual1.png", mask)
    cfg["data"]["root"] = str(root)
    cfg["model"]["kwargs"] = yaml.safe_load(TINY.split("=", 1)[1])
    cfg["data"]["crop_size"] = [32, 32]
    cfg["train"].update(epochs=1, amp="none")
    (tmp_path / "binary.yaml").write_text(yaml.safe_dump(cfg))
    from tiramisu.cli import main

    assert (
        main(["train", "--config", str(tmp_path / "binary.yaml"), "--out", str(tmp_path / "run")])
        == 0
    )
    out = capsys.readouterr().out
    assert "held out" in out and "foreground (vessel): IoU" in out
