import json
import pickle

import numpy as np
import pytest
from PIL import Image

from tiramisu.checkpoint import load_checkpoint
from tiramisu.config import load_config
from tiramisu.data.classification import build_classification_data, stratified_split
from tiramisu.errors import DataError
from tiramisu.training import evaluate_checkpoint, train

TINY = "model.kwargs={block_config: [2, 2, 2], growth_rate: 4, num_init_features: 8}"


def make_folders(root, n_per_class=12, classes=("cat", "dog", "ship")):
    rng = np.random.default_rng(0)
    for i, c in enumerate(classes):
        (root / "train" / c).mkdir(parents=True)
        for j in range(n_per_class):
            img = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
            img[..., i] += 150  # each class has a dominant channel: learnable in a few steps
            Image.fromarray(img).save(root / "train" / c / f"{c}_{j}.png")
    return root


def cls_cfg(root, epochs=3, extra=()):
    return load_config(
        "configs/cifar10_densenet40_k12.yaml",
        [
            f"data.root={root}",
            TINY,
            f"train.epochs={epochs}",
            "train.batch_size=8",
            "train.eval_batch_size=16",
            "train.lr=0.05",
            *extra,
        ],
    )


def test_stratified_split_is_deterministic_and_per_class():
    labels = [0] * 50 + [1] * 30
    a = stratified_split(labels, 0.1)
    assert a == stratified_split(labels, 0.1)
    train_idx, val_idx = a
    assert sorted(train_idx + val_idx) == list(range(80))
    assert sum(labels[i] == 0 for i in val_idx) == 5 and sum(labels[i] == 1 for i in val_idx) == 3


def test_folder_split_and_transforms(tmp_path):
    root = make_folders(tmp_path)
    data = build_classification_data(cls_cfg(root))
    assert data["labels"].classes == ["cat", "dog", "ship"]
    assert len(data["train"]) + len(data["val"]) == 36 and len(data["val"]) == 3
    x, y = data["train"][0]
    assert x.shape == (3, 32, 32) and isinstance(y, int)
    assert abs(float(x.mean())) < 3  # normalised with CIFAR mean/std, not [0, 1]


def test_classification_trains_on_the_same_loop_and_evaluate_reproduces(tmp_path):
    root = make_folders(tmp_path / "d")
    out = tmp_path / "run"
    metrics = train(cls_cfg(root, epochs=4), out, quiet=True)
    for name in (
        "best.pt",
        "last.pt",
        "error.png",
        "loss.png",
        "metrics.json",
        "confusion_matrix_val.png",
        "report_val.txt",
    ):
        assert (out / name).is_file(), name
    assert "top-1 error" in (out / "report_val.txt").read_text()
    stored = json.loads((out / "metrics.json").read_text())
    assert stored["top1_error"] == pytest.approx(1 - stored["global_accuracy"])
    assert len(stored["confusion_matrix"]) == 3 and sum(map(sum, stored["confusion_matrix"])) == 3
    again = evaluate_checkpoint(load_checkpoint(out / "best.pt"), "val", quiet=True)
    assert again["confusion_matrix"] == metrics["confusion_matrix"]
    rows = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == pytest.approx([0.05, 0.05, 0.005, 0.0005])  # 50% / 75%


def test_cifar_python_batches(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar_module
    from torchvision.datasets import CIFAR10

    # The fixture's batches are fakes, so skip torchvision's md5 checks of the real files.
    monkeypatch.setattr(CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cifar_module, "check_integrity", lambda *a, **k: True)
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)

    def batch(n):
        return {
            "data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
            "labels": [i % 10 for i in range(n)],
        }

    for i in range(1, 6):
        (base / f"data_batch_{i}").write_bytes(pickle.dumps(batch(20)))
    (base / "test_batch").write_bytes(pickle.dumps(batch(10)))
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    cfg = cls_cfg(tmp_path, extra=["data.dataset=cifar10", "data.val_fraction=0"])
    data = build_classification_data(cfg)
    assert len(data["train"]) == 100 and len(data["val"]) == 10  # the test batch, paper protocol
    assert data["train"][0][0].shape == (3, 32, 32)


def test_missing_classification_folder_is_named(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        build_classification_data(cls_cfg(tmp_path / "nothing"))


def test_shared_cifar_subset_layout(cifar_root):
    cfg = load_config(
        "configs/cifar10_densenet_bc100_k12.yaml", [f"data.root={cifar_root}", "data.cache=false"]
    )
    data = build_classification_data(cfg)
    assert data["labels"].classes[0] == "airplane" and len(data["labels"].classes) == 10
    assert len(data["val"]) == 2500 and len(data["train"]) == 22500
