"""Published weight sets: lookup by name, SHA-256 checks, untrained and unknown sets."""

import json
import os
import stat

import numpy as np
import pytest
import torch
from PIL import Image

import tiramisu
from tiramisu import zoo
from tiramisu.cli import main
from tiramisu.config import load_config
from tiramisu.data import make_synthetic_dataset
from tiramisu.errors import CheckpointError
from tiramisu.inference import Segmenter
from tiramisu.training import train


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = make_synthetic_dataset(
        tmp_path_factory.mktemp("scenes"), n_train=6, n_val=3, size=(40, 48), seed=1
    )
    cfg = load_config(
        None,
        [
            "data.dataset=synthetic",
            f"data.root={root}",
            "data.crop_size=[32, 32]",
            "model.name=fcdensenet56",
            "model.kwargs={growth_rate: 4, down_blocks: [1, 1], bottleneck_layers: 1, "
            "first_conv_channels: 8}",
            "train.epochs=1",
            "train.batch_size=3",
            "train.amp=none",
        ],
    )
    out = tmp_path_factory.mktemp("run")
    train(cfg, out, quiet=True)
    return out


@pytest.fixture
def zoo_root(tmp_path, trained_run, monkeypatch):
    root = tmp_path / "zoo"
    root.mkdir()
    (root / "index.json").write_text(
        json.dumps(
            {
                "tiny-scenes": {
                    "model": "fcdensenet56",
                    "dataset": "synthetic",
                    "recipe": "see test",
                },
                "big-untrained": {
                    "model": "fcdensenet103",
                    "dataset": "CamVid",
                    "recipe": "configs/camvid_fcdensenet103.yaml",
                },
            }
        )
    )
    zoo.publish(
        trained_run / "best.pt",
        "tiny-scenes",
        dataset="synthetic",
        recipe="see test",
        metrics={"val_miou": 0.5},
        root=root,
    )
    monkeypatch.setattr(zoo, "BUNDLED_ROOT", root)
    return root


def test_publish_writes_fp16_weights_with_hashes_and_public_permissions(zoo_root):
    entry = zoo.load_index(zoo_root)["tiny-scenes"]
    assert entry.trained and entry.metrics == {"val_miou": 0.5}
    weights = zoo_root / "tiny-scenes" / "model.safetensors"
    assert entry.sha256["model.safetensors"] == zoo.sha256_file(weights)
    from safetensors.torch import load_file

    state = load_file(str(weights))
    floats = [v.dtype for v in state.values() if v.is_floating_point()]
    assert floats and set(floats) == {torch.float16}
    assert stat.S_IMODE(os.stat(weights).st_mode) & 0o044 == 0o044  # group/others can read


def test_republishing_the_same_checkpoint_gives_the_same_bytes(zoo_root, trained_run):
    """The index pins SHA-256s: republishing unchanged weights must not change them (the
    safetensors metadata map was written in a random order)."""
    hashes = set()
    for _ in range(4):
        entry = zoo.publish(
            trained_run / "best.pt", "tiny-scenes", dataset="synthetic", recipe="x", root=zoo_root
        )
        hashes.add(entry.sha256["model.safetensors"])
    assert hashes == {zoo.load_index(zoo_root)["tiny-scenes"].sha256["model.safetensors"]}
    assert len(hashes) == 1


def test_load_by_name_matches_the_training_checkpoint(zoo_root, trained_run):
    by_name = tiramisu.from_pretrained("tiny-scenes")
    from_ckpt = Segmenter.load(trained_run / "best.pt")
    image = np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    p_name = by_name.predict_proba(image)
    p_ckpt = from_ckpt.predict_proba(image)
    assert p_name.shape == (by_name.model.num_classes, 40, 48)
    np.testing.assert_allclose(p_name, p_ckpt, atol=2e-2)  # fp16 weights, fp32 compute


def test_predict_cli_takes_a_set_name(zoo_root, tmp_path):
    Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(tmp_path / "a.png")
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                "tiny-scenes",
                str(tmp_path / "a.png"),
                "--out",
                str(tmp_path / "out"),
                "--quiet",
            ]
        )
        == 0
    )
    assert Image.open(tmp_path / "out" / "a.png").size == (48, 40)


def test_hash_mismatch_is_refused(zoo_root):
    weights = zoo_root / "tiny-scenes" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: SHA-256 .* does not match"):
        tiramisu.from_pretrained("tiny-scenes")


def test_untrained_and_unknown_sets_are_clear_errors(zoo_root, capsys):
    with pytest.raises(CheckpointError, match="big-untrained: not trained yet.*tiny-scenes"):
        tiramisu.from_pretrained("big-untrained")
    with pytest.raises(CheckpointError, match="no such directory.*did you mean tiny-scenes"):
        tiramisu.from_pretrained("tiny-scene")
    assert main(["predict", "--checkpoint", "big-untrained", "x.png", "--out", "o"]) == 2
    assert "not trained yet" in capsys.readouterr().err


def test_missing_files_without_a_hub_repository(zoo_root):
    (zoo_root / "tiny-scenes" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="not installed with this package"):
        zoo.resolve_named("tiny-scenes")


def test_list_pretrained(zoo_root, capsys):
    assert main(["list-pretrained"]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = next(line for line in lines if line.startswith("tiny-scenes"))
    assert row.split()[1:3] == ["trained", "50.0"]
    assert any(line.startswith("big-untrained") and "not trained" in line for line in lines)
    assert main(["list-pretrained", "--format", "json"]) == 0
    sets = {s["name"]: s for s in json.loads(capsys.readouterr().out)}
    assert sets["tiny-scenes"]["trained"] and not sets["big-untrained"]["trained"]


def test_shipped_index_is_consistent():
    """Every set the package ships as trained loads offline and passes its hash check."""
    for entry in zoo.list_pretrained():
        assert entry.model in tiramisu.list_models()
        if entry.trained:
            seg = tiramisu.from_pretrained(entry.name)
            assert seg.config["model_name"] == entry.model
            assert 0 < entry.metrics["val_miou"] <= 1
            mask = seg.predict(np.zeros((64, 96, 3), np.uint8))
            assert mask.shape == (64, 96)
