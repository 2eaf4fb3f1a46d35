"""One epoch of training and one pass of evaluation: tensors in, numbers out, no file I/O."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from ..config import TrainConfig
from ..errors import TiramisuError
from ..hardware import autocast_context, to_device
from ..metrics import ConfusionMatrix
from ..models import batch_statistics
from .runtime import Runtime


class TrainingDiverged(TiramisuError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class EpochStats:
    loss: float  # mean over the images seen
    images: int  # all ranks together
    accuracy: float  # pixel accuracy (segmentation) or top-1 accuracy on the training batches
    seconds: float
    stopped_early: bool  # the time budget ended the epoch before its last step


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    tcfg: TrainConfig,
    rt: Runtime,
    desc: str,
    quiet: bool = False,
    out_of_time: Callable[[], bool] | None = None,
) -> EpochStats:
    from tqdm import tqdm

    model.train()
    ignore = getattr(criterion, "ignore_index", -100)
    sums = torch.zeros(4, dtype=torch.float64, device=rt.device)  # loss*n, n, correct, labelled
    steps = len(loader)
    if tcfg.max_steps_per_epoch is not None:
        steps = min(steps, tcfg.max_steps_per_epoch)
    bar = tqdm(
        total=steps,
        desc=desc,
        leave=False,
        dynamic_ncols=True,
        unit="step",
        disable=quiet or not rt.is_main,
    )
    t0, n_images, stopped = time.perf_counter(), 0, False
    for step, (images, targets) in enumerate(loader):
        if step >= steps:
            break
        if out_of_time is not None and out_of_time():
            stopped = True  # the budget ran out mid-epoch: validate what we have
            break
        images = to_device(images, rt.device, tcfg.channels_last)
        targets = targets.to(rt.device, non_blocking=True)
        with autocast_context(rt.device, tcfg.amp):
            logits = model(images)
        loss = criterion(logits.float(), targets)
        loss_value = _checked_loss(loss, rt, f"{desc}, step {step + 1}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if tcfg.grad_clip:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        with torch.no_grad():
            valid = (targets >= 0) & (targets != ignore)
            sums[2] += ((logits.argmax(1) == targets) & valid).sum()
            sums[3] += valid.sum()
        sums[0] += loss_value * images.shape[0]
        sums[1] += images.shape[0]
        n_images += images.shape[0] * rt.world_size
        bar.update(1)
        rate = n_images / (time.perf_counter() - t0)
        bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{rate:.2f}")
    bar.close()
    if rt.distributed:
        dist.all_reduce(sums)
    return EpochStats(
        loss=(sums[0] / sums[1].clamp(min=1)).item(),
        images=n_images,
        accuracy=(sums[2] / sums[3].clamp(min=1)).item(),
        seconds=time.perf_counter() - t0,
        stopped_early=stopped,
    )


def _checked_loss(loss: torch.Tensor, rt: Runtime, where: str) -> float:
    """The loss as a float (one host sync per step); stop every rank if any rank diverged."""
    finite = torch.isfinite(loss.detach()).to(torch.float32)
    if rt.distributed:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    value = loss.item()
    if finite.item() == 0:
        raise TrainingDiverged(
            f"loss became {value} at {where}; stopped. The last good checkpoint is kept. "
            f"Try a lower train.lr, train.grad_clip or train.amp=none."
        )
    return value


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    num_classes: int,
    ignore_index: int | None,
    device: torch.device,
    *,
    bn_eval: str = "batch",
    amp: Any = "none",
    channels_last: bool = False,
    criterion: nn.Module | None = None,
    progress: bool = False,
    tta: bool = False,
) -> dict[str, Any]:
    """Confusion-matrix metrics over ``loader`` (summed across processes when distributed).

    With ``tta`` the prediction averages the class probabilities of each image and its
    horizontal mirror, as ``Segmenter.predict(tta=True)`` does (the loss stays the plain one).
    """
    if bn_eval not in ("batch", "running"):
        raise TiramisuError(f"bn_eval must be batch or running, got {bn_eval!r}")
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(num_classes, ignore_index, device=device)
    loss_sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss*pixels, pixels
    bn_ctx = batch_statistics(model) if bn_eval == "batch" else contextlib.nullcontext()
    iterator = loader
    if progress:
        from tqdm import tqdm

        iterator = tqdm(loader, desc="evaluate", leave=False, dynamic_ncols=True)
    with bn_ctx:
        for images, targets in iterator:
            images = to_device(images, device, channels_last)
            targets = targets.to(device, non_blocking=True)
            with autocast_context(device, amp):
                logits = model(images).float()
            if criterion is not None:
                n = (targets != ignore_index).sum() if ignore_index is not None else targets.numel()
                loss_sums[0] += criterion(logits, targets).double() * n
                loss_sums[1] += n
            if tta and logits.dim() == 4:
                with autocast_context(device, amp):
                    mirrored = model(images.flip(-1)).float().flip(-1)
                prediction = (logits.softmax(1) + mirrored.softmax(1)).argmax(1)
            else:
                prediction = logits.argmax(1)
            cm.update(prediction, targets)
    cm.all_reduce()
    if dist.is_available() and dist.is_initialized() and criterion is not None:
        dist.all_reduce(loss_sums)
    model.train(was_training)
    metrics = cm.compute()
    metrics["loss"] = (loss_sums[0] / loss_sums[1]).item() if loss_sums[1] > 0 else None
    return metrics
