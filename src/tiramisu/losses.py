"""Segmentation losses that respect ``ignore_index``: cross-entropy, soft Dice, Dice + CE, focal.

Written here rather than taken from a library because every one of them must skip the void /
outside-the-region pixels exactly as the metrics do, and take the same class weights.

For rare foreground classes (vessels, lesions, cracks) plain cross-entropy lets the model
predict background almost everywhere; Dice optimises the overlap directly and focal loss
down-weights the easy background pixels. ``dice_ce`` (the sum) is the usual robust choice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SoftDiceLoss(nn.Module):
    """1 - mean over classes of the soft Dice coefficient, on softmax probabilities.

    Intersections and cardinalities are summed over the whole batch (as the metric sums over
    the split); ignored pixels contribute to neither. Classes absent from both the targets and
    (almost) the predictions of the batch are left out of the mean, so an empty class does not
    reward predicting nothing. ``smooth`` keeps the ratio defined for tiny classes.
    """

    def __init__(
        self, ignore_index: int = -100, smooth: float = 1.0, weight: Tensor | None = None
    ) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.smooth = smooth
        self.register_buffer("weight", weight if weight is not None else None)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        num_classes = logits.shape[1]
        valid = target != self.ignore_index
        probs = logits.float().softmax(1) * valid.unsqueeze(1)
        safe = torch.where(valid, target, torch.zeros_like(target))
        onehot = F.one_hot(safe, num_classes).permute(0, 3, 1, 2).to(probs.dtype)
        onehot = onehot * valid.unsqueeze(1)
        dims = (0, 2, 3)
        intersection = (probs * onehot).sum(dims)
        cardinality = probs.sum(dims) + onehot.sum(dims)
        dice = (2 * intersection + self.smooth) / (cardinality + self.smooth)
        present = onehot.sum(dims) > 0
        weight = self.weight if self.weight is not None else torch.ones_like(dice)
        weight = weight * present
        if weight.sum() == 0:
            return logits.sum() * 0.0  # nothing labelled in this batch
        return ((1 - dice) * weight).sum() / weight.sum()


class DiceCELoss(nn.Module):
    """Soft Dice plus cross-entropy (both ignoring ``ignore_index``)."""

    def __init__(
        self, ignore_index: int = -100, weight: Tensor | None = None, smooth: float = 1.0
    ) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.dice = SoftDiceLoss(ignore_index, smooth, weight)
        self.ce = nn.CrossEntropyLoss(weight=weight, ignore_index=ignore_index)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return self.dice(logits, target) + self.ce(logits, target)


class FocalLoss(nn.Module):
    """Lin et al.'s focal loss, -(1 - p_t)^gamma log p_t, averaged over labelled pixels
    (weighted by ``weight[target]`` when class weights are given)."""

    def __init__(
        self, ignore_index: int = -100, gamma: float = 2.0, weight: Tensor | None = None
    ) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.gamma = gamma
        self.register_buffer("weight", weight if weight is not None else None)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        valid = target != self.ignore_index
        safe = torch.where(valid, target, torch.zeros_like(target))
        log_p = logits.float().log_softmax(1).gather(1, safe.unsqueeze(1)).squeeze(1)
        loss = -((1 - log_p.exp()) ** self.gamma) * log_p
        w = valid.to(loss.dtype)
        if self.weight is not None:
            w = w * self.weight[safe]
        return (loss * w).sum() / w.sum().clamp(min=1e-12)


LOSSES = ("cross_entropy", "dice", "dice_ce", "focal")


def build_loss(
    name: str,
    ignore_index: int | None,
    weight: Tensor | None = None,
    focal_gamma: float = 2.0,
) -> nn.Module:
    ignore = -100 if ignore_index is None else ignore_index
    if name == "cross_entropy":
        return nn.CrossEntropyLoss(weight=weight, ignore_index=ignore)
    if name == "dice":
        return SoftDiceLoss(ignore, weight=weight)
    if name == "dice_ce":
        return DiceCELoss(ignore, weight=weight)
    if name == "focal":
        return FocalLoss(ignore, focal_gamma, weight)
    raise ValueError(f"unknown loss {name!r} (one of {', '.join(LOSSES)})")
