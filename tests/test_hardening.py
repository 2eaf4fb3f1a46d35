"""Bad inputs and concurrent use: one-line errors naming the file, non-zero exits, nothing lost."""

import json
import os
import re
import stat

import pytest
import torch
from helpers import tiny_pretrained

from tiramisu.checkpoint import load_checkpoint
from tiramisu.cli import main
from tiramisu.config import RunConfig, load_config, reference_table
from tiramisu.data import make_synthetic_dataset
from tiramisu.errors import CheckpointError, TiramisuError
from tiramisu.fileio import atomic_write_text
from tiramisu.inference import Segmenter
from tiramisu.pretrained import load_pretrained
from tiramisu.training import train
from tiramisu.training.run_folder import RunLock

TINY = (
    "model.kwargs={growth_rate: 4, down_blocks: [1, 1], bottleneck_layers: 1, "
    "first_conv_channels: 8, dropout: 0.0}"
)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return make_synthetic_dataset(
        tmp_path_factory.mktemp("scenes"), n_train=6, n_val=3, size=(40, 48), seed=5
    )


def tiny(scenes, *extra):
    return [
        "data.dataset=synthetic",
        f"data.root={scenes}",
        "data.crop_size=[32, 32]",
        TINY,
        "model.name=fcdensenet56",
        "train.epochs=1",
        "train.batch_size=3",
        "train.eval_batch_size=3",
        "train.optimizer=adam",
        "train.amp=none",
        "train.patience=null",
        *extra,
    ]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


# ------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "an empty file (0 bytes)"),
        (os.urandom(512).replace(b"PK", b"pk"), "not a PyTorch checkpoint"),
        (b"\x89PNG\r\n\x1a\n" + b"0" * 64, "an image, not a checkpoint"),
    ],
)
def test_unreadable_checkpoints_are_named_plainly(tmp_path, capsys, content, message):
    path = tmp_path / "best.pt"
    path.write_bytes(b"\x00" + content if content[:1] == b"\x80" else content)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_checkpoint(path)
    for argv in (
        ["evaluate", "--checkpoint", str(path)],
        ["export", "--checkpoint", str(path), "--format", "onnx", "--out", str(tmp_path / "m")],
        ["predict", "--checkpoint", str(path), "x.png", "--out", str(tmp_path / "o")],
    ):
        assert main(argv) == 2
        err = one_line_error(capsys)
        assert str(path) in err and message in err and "weights_only" not in err


def test_refusing_a_pickle_never_suggests_unsafe_loading(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "evil.pt")
    text = str(info.value)
    assert "posix.system" in text and "weights_only" not in text and "False" not in text


# -------------------------------------------------------------------------- configurations
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.bn_eval=nope", "train.bn_eval must be one of batch, running, got 'nope'"),
        ("data.classes=abc", "data.classes must be a non-empty list"),
        ("train.lr=-1", "train.lr must be a number > 0"),
        ("train.epochs=2.5", "train.epochs must be an integer >= 1"),
        ("data.mean=x", "data.mean must be a list of numbers or null"),
        ("train.amp=fp8", "train.amp must be one of"),
        ("data.scale_range=[1.5, 0]", "data.scale_range must be a list of 2 positive numbers"),
    ],
)
def test_config_values_are_checked_with_the_key_named(override, message):
    with pytest.raises(TiramisuError, match=message.replace("[", r"\[").replace(".", r"\.")):
        load_config(None, [override])


def test_unknown_keys_suggest_the_closest(tmp_path):
    with pytest.raises(TiramisuError, match=r"'train.learning_rate'; did you mean .*train.lr"):
        load_config(None, ["train.learning_rate=1"])
    (tmp_path / "c.yaml").write_text("data:\n  val_fracton: 0.2\n")
    with pytest.raises(TiramisuError, match=r"c\.yaml: .*did you mean data\.val_fraction"):
        load_config(tmp_path / "c.yaml")


def test_config_is_frozen_and_overrides_make_copies():
    cfg = load_config(None, ["train.lr=0.5"])
    with pytest.raises(Exception, match="cannot assign"):
        cfg.train.lr = 1.0
    changed = cfg.with_overrides(["train.lr=0.25"])
    assert cfg.train.lr == 0.5 and changed.train.lr == 0.25
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


def test_reference_table_lists_every_key():
    table = reference_table()
    for section in ("data", "train", "finetune", "model"):
        for key in RunConfig().to_dict()[section]:
            assert f"| `{section}.{key}` |" in table


def test_crop_smaller_than_the_model_allows_is_an_error(scenes, tmp_path, capsys):
    args = ["train", "--out", str(tmp_path / "run"), "--quiet"]
    for o in tiny(scenes, "data.crop_size=3"):
        args += ["--set", o]
    assert main(args) == 2
    err = one_line_error(capsys)
    assert "data.crop_size=[3, 3]" in err and "at least 4 pixels" in err
    assert not (tmp_path / "run" / "last.pt").exists()


# ------------------------------------------------------------------------ pretrained configs
def tiny_pretrained_folder(tmp_path):
    return tiny_pretrained(
        tmp_path / "w", classes=["a", "b", "c"], colors=[[0, 0, 0], [255, 0, 0], [0, 255, 0]]
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_config.down_blocks": [10000000, 2]}, "down_blocks must list"),
        ({"model_config.growth_rate": 1e6}, "growth_rate must be an integer"),
        ({"model_config.growth_rate": -4}, "growth_rate must be an integer"),
        ({"model_config.num_classes": 10**9}, "num_classes must be an integer"),
        ({"preprocessing.channels": 7}, "preprocessing.channels must be 1, 3 or 4"),
        ({"preprocessing.mean": "x"}, "preprocessing.mean must be null or 3 numbers"),
        ({"bn_eval": "nope"}, "bn_eval must be batch or running"),
        ({"colors": [[1]]}, "colors must list one"),
        ({"classes": "abc"}, "classes must be a non-empty list"),
        ({"model_config.num_classes": 5}, "weights have 3 classes but the config says 5"),
    ],
)
def test_hostile_pretrained_configs_are_refused_before_building(tmp_path, change, message):
    directory = tiny_pretrained_folder(tmp_path)
    config = json.loads((directory / "config.json").read_text())
    for dotted, value in change.items():
        node = config
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message.replace("[", r"\[")):
        load_pretrained(directory)


def test_segmenter_refuses_a_classifier():
    from tiramisu.models import create_model

    model = create_model("densenet40_k12", growth_rate=2)
    config = {
        "task": "classification",
        "model_name": "densenet40_k12",
        "preprocessing": {"channels": 3},
        "classes": ["a"],
        "colors": [[0, 0, 0]],
        "model_config": model.config,
    }
    with pytest.raises(CheckpointError, match="classification model .*Segmenter needs"):
        Segmenter(model, config)


# ------------------------------------------------------------------------ run folders
def test_a_second_run_cannot_write_into_a_locked_folder(scenes, tmp_path, capsys):
    out = tmp_path / "run"
    lock = RunLock(out)
    lock.acquire()  # stands for a run in progress
    try:
        args = ["train", "--out", str(out), "--quiet"]
        for o in tiny(scenes):
            args += ["--set", o]
        assert main(args) == 2
        assert "another tiramisu run is writing to this folder" in one_line_error(capsys)
        assert not (out / "last.pt").exists() and not (out / "history.csv").exists()
    finally:
        lock.release()
    assert main(args) == 0  # free again once the other run has ended


def test_resume_removes_stale_temp_files_and_applies_a_new_lr(scenes, tmp_path):
    out = tmp_path / "run"
    train(load_config(None, tiny(scenes)), out, quiet=True)
    stale = out / ".last.pt.abc123.tmp"
    stale.write_bytes(b"")  # what a SIGKILL mid-write leaves behind
    train(
        load_config(None),
        out,
        resume=True,
        quiet=True,
        resume_overrides=["train.epochs=2", "train.lr=0.05"],
    )
    assert not stale.exists()
    rows = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    # The exponential schedule continues from the new base lr: 0.05 * 0.995^1 at epoch 2.
    assert [r["lr"] for r in rows] == [pytest.approx(1e-3), pytest.approx(0.05 * 0.995)]
    assert load_config(out / "config.yaml").train.lr == 0.05
    with pytest.raises(TiramisuError, match="data.ignore_index: cannot be changed"):
        train(
            load_config(None),
            out,
            resume=True,
            quiet=True,
            resume_overrides=["train.epochs=3", "data.ignore_index=7"],
        )


def test_history_records_training_accuracy(scenes, tmp_path):
    out = tmp_path / "run"
    train(load_config(None, tiny(scenes)), out, quiet=True)
    row = json.loads((out / "history.jsonl").read_text().splitlines()[0])
    assert 0 < row["train_accuracy"] <= 1


def test_written_files_are_readable_by_others(tmp_path):
    path = atomic_write_text(tmp_path / "a.txt", "x")
    assert stat.S_IMODE(path.stat().st_mode) & 0o044 == 0o044
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]  # no temporary left behind


# ------------------------------------------------------------------------ decompression bombs
def bomb_png(path, width=30000, height=30000):
    """A valid PNG header announcing width x height pixels, with almost no data behind it."""
    import struct
    import zlib

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )
    return path


def test_a_decompression_bomb_among_predict_inputs_is_skipped(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    weights = tiny_pretrained_folder(tmp_path)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("a", "c"):
        Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(inputs / f"{name}.png")
    bomb_png(inputs / "b.png")
    out = tmp_path / "out"
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(weights),
                str(inputs),
                "--out",
                str(out),
                "--quiet",
                "--batch-size",
                "4",
            ]
        )
        == 1
    )
    assert sorted(p.name for p in out.glob("?.png")) == ["a.png", "c.png"]
    err = capsys.readouterr().err
    assert "Traceback" not in err and "b.png: 30000x30000 = 900 Mpixels is over the limit" in err
    # A limit of our own, below Pillow's, is honoured too (and restored afterwards).
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(weights),
                str(inputs / "a.png"),
                "--out",
                str(tmp_path / "o2"),
                "--quiet",
                "--max-pixels",
                "1000",
            ]
        )
        == 1
    )
    assert "a.png: 48x40 = 0 Mpixels is over the limit of 0 Mpixels" in capsys.readouterr().err
    from tiramisu.imageio import max_pixels, set_max_pixels

    set_max_pixels(None)
    assert max_pixels() > 100_000_000


def test_a_decompression_bomb_in_training_data_names_the_file(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    for split in ("train", "val"):
        for sub in ("images", "masks"):
            (tmp_path / split / sub).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(
                tmp_path / split / "images" / f"{i}.png"
            )
            Image.fromarray(np.zeros((40, 40), np.uint8)).save(
                tmp_path / split / "masks" / f"{i}.png"
            )
    bomb_png(tmp_path / "train" / "images" / "1.png")
    args = [
        "train",
        "--out",
        str(tmp_path / "run"),
        "--quiet",
        "--set",
        "data.dataset=folder",
        "--set",
        f"data.root={tmp_path}",
        "--set",
        "data.classes=[a, b]",
        "--set",
        "data.channels=3",
        "--set",
        TINY,
        "--set",
        "data.crop_size=[32, 32]",
    ]
    assert main(args) == 2
    err = one_line_error(capsys)
    assert "train/images/1.png: 30000x30000 = 900 Mpixels is over the limit" in err


def test_config_reference_document_is_in_sync():
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "CONFIG.md").read_text()
    assert reference_table() in doc, "regenerate docs/CONFIG.md with tiramisu config --reference"
