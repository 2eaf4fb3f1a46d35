"""Optimizer, learning-rate schedule and loss for a training stage."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..config import TrainConfig
from ..errors import TiramisuError


def build_optimizer(params: Iterable[Any], tcfg: TrainConfig) -> torch.optim.Optimizer:
    lr, wd = tcfg.lr, tcfg.weight_decay
    if tcfg.optimizer == "rmsprop":
        # Lasagne's rmsprop (the official code): rho 0.9, epsilon 1e-6 added outside the sqrt.
        return torch.optim.RMSprop(params, lr=lr, alpha=0.9, eps=1e-6, weight_decay=wd)
    if tcfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=tcfg.momentum, nesterov=tcfg.nesterov, weight_decay=wd
        )
    if tcfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd)


def lr_factor(tcfg: TrainConfig) -> Callable[[int], float]:
    """The multiplier of the initial lr after ``e`` epochs."""
    if tcfg.lr_schedule == "exponential":
        decay = tcfg.lr_decay
        return lambda e: decay**e
    if tcfg.lr_schedule == "multistep":
        # Milestones below 1 are fractions of the stage's epochs.
        steps = [round(f * tcfg.epochs) if f < 1 else int(f) for f in tcfg.milestones]
        gamma = tcfg.gamma
        return lambda e: gamma ** sum(e >= s for s in steps)
    return lambda e: 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, tcfg: TrainConfig) -> Any:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(tcfg))


def class_weights(
    tcfg: TrainConfig, train_ds: Any, num_classes: int, device: torch.device
) -> torch.Tensor | None:
    cw = tcfg.class_weights
    if cw is None:
        return None
    if cw in ("median_frequency", "sqrt_median_frequency"):
        from ..data import median_frequency_weights

        weights = median_frequency_weights(train_ds)
        if cw == "sqrt_median_frequency":
            # Square roots compress a rare class's 20-50x weight to 4-7x, and renormalising to
            # mean 1 over the classes present keeps the effective learning rate unchanged.
            weights = weights.sqrt()
            present = weights > 0
            weights = weights / weights[present].mean()
        return weights.to(device)
    if len(cw) != num_classes:
        raise TiramisuError(f"train.class_weights has {len(cw)} values for {num_classes} classes")
    return torch.tensor([float(w) for w in cw], device=device)


def build_criterion(
    tcfg: TrainConfig, weights: torch.Tensor | None, ignore_index: int | None
) -> nn.Module:
    from ..losses import build_loss

    return build_loss(tcfg.loss, ignore_index, weights, tcfg.focal_gamma)
