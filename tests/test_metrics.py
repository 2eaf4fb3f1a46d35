import math

import pytest
import torch

from tiramisu.metrics import ConfusionMatrix, metrics_from_confusion


def test_hand_computed_iou_with_void_and_an_absent_class():
    # 4 classes; class 3 never appears in labels or predictions; 9 = void.
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 9, 9]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 3, 1]])
    cm = ConfusionMatrix(4, ignore_index=9)
    cm.update(pred, target)
    # Void pixels (predicted 3 and 1) are dropped, so class 3 stays absent.
    assert cm.matrix.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    m = cm.compute()
    # class 0: tp 1, union = 2 (true) + 2 (pred) - 1 = 3; class 1: 2 / (2 + 3 - 2) = 2/3;
    # class 2: 1 / (2 + 1 - 1) = 1/2; class 3: no pixels at all -> NaN, excluded from the mean.
    assert m["iou"][:3] == pytest.approx([1 / 3, 2 / 3, 1 / 2])
    assert math.isnan(m["iou"][3])
    assert m["miou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert m["global_accuracy"] == pytest.approx(4 / 6)
    assert m["mean_class_accuracy"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    assert m["support"] == [2, 2, 2, 0]


def test_class_predicted_but_absent_from_labels_counts_as_zero_iou():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 0, 2]), torch.tensor([0, 0, 0]))
    m = cm.compute()
    assert m["iou"][0] == pytest.approx(2 / 3)
    assert math.isnan(m["iou"][1])
    assert m["iou"][2] == 0.0  # false positives only: union 1, intersection 0
    assert m["miou"] == pytest.approx((2 / 3 + 0) / 2)


def test_intersections_are_summed_over_the_split_not_averaged_per_image():
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([1, 1, 1, 1]), torch.tensor([1, 1, 1, 1]))  # image 1: IoU(1) = 1
    cm.update(torch.tensor([0, 0, 0, 0]), torch.tensor([1, 0, 0, 0]))  # image 2: IoU(1) = 0
    # Whole split: class 1 tp 4, true 5, predicted 4 -> 4/5 (a per-image mean would say 1/2).
    assert cm.compute()["iou"][1] == pytest.approx(4 / 5)


def test_logits_are_argmaxed_and_shapes_checked():
    cm = ConfusionMatrix(3)
    logits = torch.zeros(1, 3, 2, 2)
    logits[:, 2] = 1
    cm.update(logits, torch.full((1, 2, 2), 2))
    assert cm.matrix[2, 2] == 4
    with pytest.raises(ValueError, match="does not match"):
        cm.update(torch.zeros(1, 2, 2), torch.zeros(1, 3, 3))


def test_empty_confusion_gives_nan_not_an_error():
    m = metrics_from_confusion(torch.zeros(2, 2, dtype=torch.int64))
    assert math.isnan(m["miou"]) and math.isnan(m["global_accuracy"])
