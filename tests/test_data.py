import json

import numpy as np
import pytest
import torch
from PIL import Image

from tiramisu import list_models
from tiramisu.config import load_config
from tiramisu.data import (
    JointTransform,
    SegmentationDataset,
    build_dataset,
    camvid_labels,
    label_spec,
    median_frequency_weights,
)
from tiramisu.data.download import download_camvid
from tiramisu.data.segmentation import camvid_pairs, pair_by_stem
from tiramisu.errors import DataError, TiramisuError


def write_pair(root, split, name, image, mask, image_ext="png"):
    (root / split / "images").mkdir(parents=True, exist_ok=True)
    (root / split / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / split / "images" / f"{name}.{image_ext}")
    mask.save(root / split / "masks" / f"{name}.png") if isinstance(
        mask, Image.Image
    ) else Image.fromarray(mask).save(root / split / "masks" / f"{name}.png")


def folder_cfg(root, **data):
    cfg = load_config(None, [f"data.root={root}", "data.dataset=folder"]).to_dict()
    # These tests read the training split; validate on the same files.
    cfg["data"].update(val_images="train/images", val_masks="train/masks")
    cfg["data"].update(data)
    return cfg


def test_index_masks_and_rgb_images(tmp_path):
    img = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    mask = np.zeros((40, 50), np.uint8)
    mask[10:20] = 2
    mask[0, 0] = 255  # ignore
    write_pair(tmp_path, "train", "a", img, mask, "jpg")
    cfg = folder_cfg(tmp_path, num_classes=3, crop_size=None, hflip=False)
    ds = build_dataset(cfg, "train", train=True)
    ds.validate()
    x, y = ds[0]
    assert x.shape == (3, 40, 50) and x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1
    assert y.dtype == torch.int64 and y[15, 5] == 2 and y[0, 0] == 255


def test_palette_masks_with_void_colour(tmp_path):
    palette = {"road": [128, 64, 128], "car": [64, 0, 128], "void": [0, 0, 0]}
    (tmp_path / "palette.json").write_text(json.dumps(palette))
    mask = np.zeros((32, 32, 3), np.uint8)
    mask[:16] = [128, 64, 128]
    mask[16:, :8] = [64, 0, 128]
    write_pair(tmp_path, "train", "a", np.zeros((32, 32, 3), np.uint8), mask)
    cfg = folder_cfg(tmp_path, palette="palette.json", crop_size=None)
    spec = label_spec(cfg["data"])
    assert spec.classes == ["road", "car"] and spec.colors == [(128, 64, 128), (64, 0, 128)]
    _, y = build_dataset(cfg, "train", train=False)[0]
    assert y[0, 0] == 0 and y[20, 0] == 1 and y[20, 20] == 255


def test_palette_unknown_colour_is_named(tmp_path):
    (tmp_path / "p.yaml").write_text("road: [1, 2, 3]\n")
    mask = np.full((32, 32, 3), 9, np.uint8)
    write_pair(tmp_path, "train", "bad", np.zeros((32, 32, 3), np.uint8), mask)
    cfg = folder_cfg(tmp_path, palette="p.yaml")
    with pytest.raises(DataError, match=r"bad\.png: colour \[9, 9, 9\]"):
        build_dataset(cfg, "train", train=False).validate()


def test_binary_masks_stored_as_0_255(tmp_path):
    mask = np.zeros((32, 32), np.uint8)
    mask[:, 16:] = 255
    write_pair(tmp_path, "train", "a", np.zeros((32, 32, 3), np.uint8), mask)
    cfg = folder_cfg(tmp_path, classes=["background", "object"], crop_size=None)
    ds = build_dataset(cfg, "train", train=False)
    ds.validate()
    assert ds[0][1].unique().tolist() == [0, 1]


def test_16bit_masks_and_greyscale_16bit_images(tmp_path):
    img = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60).astype(np.uint16)
    mask = np.full((32, 32), 300, np.uint16)
    write_pair(tmp_path, "train", "a", img, Image.fromarray(mask))
    cfg = folder_cfg(tmp_path, num_classes=301, crop_size=None)
    from tiramisu.data import resolve_channels

    assert resolve_channels(cfg["data"]) == 1
    ds = build_dataset(cfg, "train", train=False)
    ds.validate()
    x, y = ds[0]
    assert x.shape == (1, 32, 32)
    assert x[0, 0, 1].item() == pytest.approx(60 / 65535)
    assert (y == 300).all()


def test_rgba_and_greyscale_inputs_infer_channels(tmp_path):
    from tiramisu.data import resolve_channels

    write_pair(
        tmp_path / "rgba",
        "train",
        "a",
        np.zeros((32, 32, 4), np.uint8),
        np.zeros((32, 32), np.uint8),
    )
    write_pair(
        tmp_path / "grey", "train", "a", np.zeros((32, 32), np.uint8), np.zeros((32, 32), np.uint8)
    )
    assert resolve_channels(folder_cfg(tmp_path / "rgba", num_classes=2)["data"]) == 4
    cfg = folder_cfg(tmp_path / "grey", num_classes=2, crop_size=None)
    assert resolve_channels(cfg["data"]) == 1
    assert build_dataset(cfg, "train", train=False)[0][0].shape == (1, 32, 32)


@pytest.mark.parametrize("problem", ["size", "missing_mask", "missing_image", "corrupt", "label"])
def test_bad_pairs_are_named_before_training(tmp_path, problem):
    good = np.zeros((32, 32, 3), np.uint8)
    write_pair(tmp_path, "train", "ok", good, np.zeros((32, 32), np.uint8))
    if problem == "size":
        write_pair(tmp_path, "train", "bad", good, np.zeros((30, 32), np.uint8))
    elif problem == "missing_mask":
        Image.fromarray(good).save(tmp_path / "train" / "images" / "bad.png")
    elif problem == "missing_image":
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "train" / "masks" / "bad.png")
    elif problem == "corrupt":
        write_pair(tmp_path, "train", "bad", good, np.zeros((32, 32), np.uint8))
        (tmp_path / "train" / "images" / "bad.png").write_bytes(b"\x89PNG not really")
    else:
        write_pair(tmp_path, "train", "bad", good, np.full((32, 32), 7, np.uint8))
    cfg = folder_cfg(tmp_path, num_classes=3)
    with pytest.raises(DataError, match="bad.png") as info:
        build_dataset(cfg, "train", train=True).validate()
    assert "\n" not in str(info.value)


def test_random_crop_pads_with_ignore_and_flips_jointly():
    torch.manual_seed(1)
    t = JointTransform(crop_size=(48, 48), hflip=True, ignore_index=11)
    image = torch.arange(20 * 30, dtype=torch.float32).reshape(1, 20, 30).repeat(3, 1, 1)
    mask = torch.arange(20 * 30).reshape(20, 30) % 11
    for _ in range(5):
        x, y = t(image, mask)
        assert x.shape == (3, 48, 48) and y.shape == (48, 48)
        valid = y != 11
        assert valid.sum() == 20 * 30  # every original pixel kept, the rest padded as void
        assert (x[0][~valid] == 0).all()
        # image and mask were moved together: each kept pixel's value still matches its label
        assert torch.equal((x[0][valid].long()) % 11, y[valid])


def test_median_frequency_weights_by_hand(tmp_path):
    # image a: 3 px class 0, 1 px class 1; image b: 4 px class 0.
    write_pair(
        tmp_path, "train", "a", np.zeros((2, 2, 3), np.uint8), np.array([[0, 0], [0, 1]], np.uint8)
    )
    write_pair(tmp_path, "train", "b", np.zeros((2, 2, 3), np.uint8), np.zeros((2, 2), np.uint8))
    cfg = folder_cfg(tmp_path, num_classes=3)
    w = median_frequency_weights(build_dataset(cfg, "train", train=False))
    # freq0 = 7/8, freq1 = 1/4 (only image a has it), class 2 absent; median(7/8, 1/4) = 9/16
    assert w.tolist() == pytest.approx([(9 / 16) / (7 / 8), (9 / 16) / (1 / 4), 0.0])


def test_camvid_on_shared_data(camvid_root):
    spec = camvid_labels()
    assert spec.num_classes == 11 and spec.ignore_index == 11 and spec.classes[4] == "Sidewalk"
    train = camvid_pairs(camvid_root, "train")
    val = camvid_pairs(camvid_root, "val")
    assert len(train) == 367 and len(val) == 101
    ds = SegmentationDataset(val[:2], spec)
    ds.validate()
    x, y = ds[0]
    assert x.shape == (3, 360, 480) and y.shape == (360, 480)
    assert set(y.unique().tolist()) <= set(range(12))


def test_camvid_full_published_layout_with_test_split(tmp_path, camvid_root):
    for split in ("train", "val", "test"):
        src = "val" if split == "test" else split
        for suffix in ("", "annot"):
            (tmp_path / f"{split}{suffix}").mkdir()
            for p in sorted((camvid_root / f"{src}{suffix}").iterdir())[:2]:
                (tmp_path / f"{split}{suffix}" / p.name).symlink_to(p)
    assert len(camvid_pairs(tmp_path, "test")) == 2
    with pytest.raises(DataError, match="no such folder"):
        camvid_pairs(tmp_path / "nowhere", "test")


def test_pairing_needs_folders(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        pair_by_stem(tmp_path / "x", tmp_path / "y")


def test_config_overrides_and_unknown_keys(tmp_path):
    cfg = load_config(None, ["train.lr=5e-4", "data.crop_size=[128, 96]", "model.kwargs.dropout=0"])
    assert cfg.train.lr == 5e-4 and cfg.data.crop_size == [128, 96]
    assert cfg.model.kwargs == {"dropout": 0}
    with pytest.raises(TiramisuError, match="train.learning_rate"):
        load_config(None, ["train.learning_rate=1"])
    (tmp_path / "c.yaml").write_text("train:\n  bogus: 1\n")
    with pytest.raises(TiramisuError, match=r"c\.yaml: unknown config key 'train.bogus'"):
        load_config(tmp_path / "c.yaml")


def test_shipped_configs_load(tmp_path):
    from pathlib import Path

    for path in sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.model.name in list_models()


def test_download_fails_clearly_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("TIRAMISU_CAMVID_REPO", str(tmp_path / "no-such-repo"))
    with pytest.raises(DataError, match="could not download CamVid"):
        download_camvid(tmp_path / "camvid")
    assert not (tmp_path / "camvid").exists()
