"""The training run: stages (training, then optional full-frame fine-tuning) of epochs.

The same code runs on one CPU, one GPU, or many processes under ``torchrun``: DDP wraps the
model, a DistributedSampler shards the training set, validation is sharded and its confusion
matrices are summed, and only rank 0 writes to the run folder.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import FORMAT, load_checkpoint, rng_state, set_rng_state
from ..config import RunConfig, TrainConfig
from ..data.builders import build_run_data, make_loader, with_crop
from ..errors import TiramisuError
from ..hardware import describe_machine, native_bf16, precision_label, resolve_precision
from ..imageio import set_max_pixels
from ..models import build_model
from .loop import EpochStats, evaluate, train_one_epoch
from .optim import build_criterion, build_optimizer, build_scheduler, class_weights, lr_factor
from .report import final_report
from .run_folder import BestTracker, RunFolder, tracker_from_state
from .runtime import (
    Deadline,
    Runtime,
    ShardSampler,
    epoch_seed,
    seed_everything,
    set_deterministic,
    setup_runtime,
    teardown_runtime,
)

# Keys a resumed run cannot change: the stored weights and labels depend on them.
FIXED_ON_RESUME = (
    "task",
    "model.name",
    "data.dataset",
    "data.classes",
    "data.num_classes",
    "data.palette",
    "data.label_map",
    "data.ignore_index",
)


def train(
    config: RunConfig | dict[str, Any],
    out_dir: str | Path,
    resume: bool = False,
    device: str = "auto",
    quiet: bool = False,
    resume_overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Run the configured stages; returns the best model's validation metrics.

    With ``resume=True`` the run's own stored config is used, with ``resume_overrides``
    (``key=value`` strings, e.g. a larger ``train.epochs`` or a new ``train.lr``) applied on top.
    """
    if not isinstance(config, RunConfig):
        config = RunConfig.from_dict(config)
    rt = setup_runtime(device)
    folder = RunFolder(Path(out_dir), writer=rt.is_main)
    try:
        return Trainer(config, folder, rt, quiet).run(resume, resume_overrides or [])
    finally:
        folder.close()
        teardown_runtime(rt)


class Trainer:
    def __init__(self, config: RunConfig, folder: RunFolder, rt: Runtime, quiet: bool) -> None:
        self.config = config
        self.folder = folder
        self.rt = rt
        self.quiet = quiet
        self.val_seconds = 0.0  # the last validation's duration, kept free of the time budget
        self.train_seconds = 0.0  # the last epoch's training time in this process

    def log(self, *parts: Any) -> None:
        if not self.quiet and self.rt.is_main:
            print(*parts)

    # ------------------------------------------------------------------------------ set-up
    def run(self, resume: bool, overrides: list[str]) -> dict[str, Any]:
        state = self.folder.open(resume)
        if state is not None:
            self.config = self._resumed_config(state, overrides)
        # config.yaml and checkpoints keep what was asked (``amp: auto``), so a run resumed on
        # other hardware picks that machine's precision; the choice made here goes into each
        # checkpoint's "precision" and the log.
        self.requested = self.config
        self.config = self._resolve_precision(self.config)
        tcfg = self.config.train
        # Each epoch's record says where it ran: a run resumed across machines is otherwise
        # impossible to account for (its epoch times and precision change with the machine).
        self.machine = describe_machine(self.rt.device)
        if self.rt.world_size > 1:
            self.machine += f"; {self.rt.world_size} processes"
        self.precision = precision_label(tcfg.amp, tcfg.channels_last)
        seed_everything(tcfg.seed)
        set_deterministic(tcfg.deterministic)
        self.log(f"device {self.rt.device}, amp {tcfg.amp}, channels_last {tcfg.channels_last}")
        self._build()
        self.folder.start(self.requested.to_dict())
        tracker = tracker_from_state(state)
        deadline = Deadline(tcfg.max_minutes, self.rt)
        stages = ["train", "finetune"] if self.config.finetune.enabled else ["train"]
        start = stages.index(state["stage"]) if state else 0
        for index in range(start, len(stages)):
            resume_state = state if index == start else None
            if not self._run_stage(index, stages[index], resume_state, tracker, deadline):
                break
        return final_report(
            self.config, self.data, self.model, self.folder.path, tracker, self.rt, self.quiet
        )

    def _resumed_config(self, state: dict[str, Any], overrides: list[str]) -> RunConfig:
        stored = RunConfig.from_dict(state["config"], where=str(self.folder.last))
        changed = stored.with_overrides(overrides)
        before, after = _flat(stored.to_dict()), _flat(changed.to_dict())
        diff = [k for k in after if after[k] != before.get(k)]
        for key in diff:
            if key in FIXED_ON_RESUME:
                raise TiramisuError(
                    f"--set {key}: cannot be changed when resuming (the checkpoint's weights "
                    f"and labels depend on it); start a new run in another --out"
                )
        if diff:
            self.log(
                "resuming with changed settings, applied from the next epoch: "
                + ", ".join(f"{k}={after[k]!r} (was {before.get(k)!r})" for k in diff)
            )
        return changed

    def _resolve_precision(self, config: RunConfig) -> RunConfig:
        """``auto`` amp / channels_last -> this device's choice (recorded as ``precision``)."""
        amp, channels_last = resolve_precision(
            self.rt.device, config.train.amp, config.train.channels_last
        )
        if amp == "fp16" and self.rt.device.type != "cuda":
            raise TiramisuError("train.amp=fp16 needs a CUDA GPU; use bf16 on CPU")
        if amp == "bf16" and not native_bf16(self.rt.device):
            # Measured on a 2-core AVX2 EPYC (BENCHMARKS.md, FC-DenseNet56 224x224): 34.5 s/step
            # in emulated bf16 against 3.9 s/step in fp32.
            self.log(
                f"warning: train.amp=bf16 but {self.rt.device} has no native bf16 "
                "(AVX512-BF16/AMX, Ampere+): autocast emulates it, several times slower than "
                "fp32; --set train.amp=auto picks this machine's fastest precision"
            )
        if channels_last and amp == "none" and self.rt.device.type == "cpu":
            # Runs started on a bf16 machine may carry an explicit ``true`` from that machine;
            # in fp32 on a 2-core AVX2 EPYC it made a training step 1.25x slower (BENCHMARKS.md).
            self.log(
                "warning: train.channels_last=true in fp32 on the CPU, which oneDNN runs slower "
                "than the default layout; --set train.channels_last=auto uses it only with bf16"
            )
        train = dataclasses.replace(
            config.train,
            amp=amp,
            channels_last=channels_last,
        )
        return dataclasses.replace(config, train=train)

    def _build(self) -> None:
        set_max_pixels(self.config.data.max_pixels)
        cfg = self.config.to_dict()
        self.data = data = build_run_data(cfg)
        if self.config.data.validate:
            for split in ("train", "val"):
                check = getattr(data[split], "validate", None)
                if check is not None:
                    check()
        for split in ("train", "val"):
            if getattr(data[split], "note", ""):
                self.log(f"data ({split}): {data[split].note}")
                break
        labels, tcfg = data["labels"], self.config.train
        model = build_model(
            self.config.model.name,
            self.config.model.kwargs,
            num_classes=labels.num_classes,
            in_channels=data["channels"],
        )
        self._check_crop(model)
        model = model.to(self.rt.device)
        if tcfg.sync_bn and self.rt.distributed:
            if self.rt.device.type != "cuda":
                raise TiramisuError("train.sync_bn needs CUDA: PyTorch's SyncBatchNorm is GPU-only")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if tcfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        weights = class_weights(tcfg, data["train"], labels.num_classes, self.rt.device)
        if weights is not None:
            self.log("class weights:", [round(w, 3) for w in weights.tolist()])
        if self.config.task == "classification" and tcfg.loss != "cross_entropy":
            raise TiramisuError(f"train.loss={tcfg.loss} is for segmentation; use cross_entropy")
        self.criterion = build_criterion(tcfg, weights, labels.ignore_index).to(self.rt.device)

    def _check_crop(self, model: nn.Module) -> None:
        min_size = getattr(model, "min_size", None)
        if self.config.task != "segmentation" or min_size is None:
            return
        for key, crop in (
            ("data.crop_size", self.config.data.crop_size),
            ("finetune.crop_size", self.config.finetune.crop_size),
        ):
            sizes = [crop, crop] if isinstance(crop, int) else crop
            if sizes is not None and min(sizes) < min_size:
                raise TiramisuError(
                    f"{key}={crop}: {self.config.model.name} needs at least {min_size} pixels "
                    f"per side ({min_size} = 2^number of poolings)"
                )

    # ------------------------------------------------------------------------------ stages
    def _run_stage(
        self,
        index: int,
        stage: str,
        state: dict[str, Any] | None,
        tracker: BestTracker,
        deadline: Deadline,
    ) -> bool:
        """Train one stage; False if the time budget ran out."""
        scfg = self.config.stage(stage)
        if stage == "finetune" and state is None and self.folder.best.exists():
            # Fine-tuning starts from the best model of the first stage, as in the paper.
            best = load_checkpoint(self.folder.best, self.rt.device)
            self.model.load_state_dict(best["model"])
        optimizer = build_optimizer(self.model.parameters(), scfg)
        scheduler = build_scheduler(optimizer, scfg)
        scaler = torch.amp.GradScaler("cuda", enabled=scfg.amp == "fp16")
        start = 0
        if state is None:
            tracker.bad_epochs = 0  # patience counts within a stage (the paper's fine-tuning)
        else:
            start = self._restore(state, optimizer, scheduler, scaler, scfg)
            if tracker.exhausted(scfg.patience):
                # Decided afresh with the current config, so that resuming with a larger
                # --set <stage>.patience continues a run that early stopping ended.
                start = scfg.epochs
                self.log(
                    f"{stage} stage already ended by early stopping ({tracker.bad_epochs} "
                    f"evaluations without improvement, patience {scfg.patience})"
                )
            else:
                self.log(
                    f"resuming {stage} at epoch {start + 1} ({tracker.bad_epochs} evaluations "
                    f"without improvement, patience {scfg.patience})"
                )
        model = self._wrap(scfg)
        train_ds = self.data["train"]
        if stage == "finetune" and self.config.task == "segmentation":
            train_ds = with_crop(self.config.to_dict(), self.data, self.config.finetune.crop_size)
        val_loader = make_loader(
            self.data["val"],
            scfg.eval_batch_size,
            self.rt.device,
            workers=self.config.data.num_workers,
            sampler=ShardSampler(len(self.data["val"]), self.rt.rank, self.rt.world_size),
        )
        for epoch in range(start, scfg.epochs):
            if not self._next_epoch_fits(deadline, scfg, epoch):
                return False
            loader = self._train_loader(train_ds, scfg, index, epoch)
            stats = train_one_epoch(
                model,
                loader,
                self.criterion,
                optimizer,
                scaler,
                scfg,
                self.rt,
                f"{stage} {epoch + 1}/{scfg.epochs}",
                self.quiet,
                lambda: deadline.expired(reserve_s=self.val_seconds),
            )
            if stats.stopped_early and stats.images == 0:
                # Out of time before this epoch's first step: nothing new to validate or save.
                self._log_budget_used()
                return False
            stop = self._end_epoch(
                stage, epoch, stats, (optimizer, scheduler, scaler), tracker, val_loader
            )
            if stats.stopped_early or deadline.expired(reserve_s=0.0):
                self._log_budget_used()
                return False
            if stop:
                self.log(
                    f"early stopping: no {scfg.monitor} improvement for "
                    f"{tracker.bad_epochs} evaluations"
                )
                break
        return True

    def _end_epoch(
        self,
        stage: str,
        epoch: int,
        stats: EpochStats,
        state: tuple[Any, Any, Any],
        tracker: BestTracker,
        val_loader: Any,
    ) -> bool:
        """Schedule, validate, checkpoint and log a trained epoch; True if patience ran out."""
        optimizer, scheduler, scaler = state
        scfg = self.config.stage(stage)
        self.train_seconds = stats.seconds
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        record = self._record(stage, epoch, lr, stats)
        metrics, improved = None, False
        if _validates_at(scfg, epoch) or stats.stopped_early:
            metrics = self._validate(val_loader, scfg, record)
            score = metrics["global_accuracy"] if scfg.monitor == "accuracy" else metrics["miou"]
            improved = tracker.update(score, epoch + 1, stage)
        stop = tracker.exhausted(scfg.patience)
        checkpoint = self._checkpoint(
            stage, epoch, optimizer, scheduler, scaler, tracker, stop, metrics
        )
        self.folder.record_epoch(record, checkpoint, improved, self.config.task)
        self.log(epoch_line(record))
        return stop

    def _log_budget_used(self) -> None:
        self.log(f"time budget of {self.config.train.max_minutes} minutes used up; stopping")

    def _next_epoch_fits(self, deadline: Deadline, scfg: TrainConfig, epoch: int) -> bool:
        """With ``train.whole_epochs``, whether the previous epoch's time is still left."""
        if not self.config.train.whole_epochs or not self.train_seconds:
            # The first epoch of a process has no measure of its own (a resumed run's history
            # may come from other hardware); the in-epoch deadline check still guards it.
            return True
        needed = self.train_seconds + (self.val_seconds if _validates_at(scfg, epoch) else 0.0)
        if not deadline.expired(reserve_s=needed):
            return True
        self.log(
            f"time budget: epoch {epoch + 1} would take about {needed:.0f} s and "
            f"{max(deadline.remaining_s(), 0):.0f} s are left; stopping between epochs"
        )
        return False

    def _restore(
        self, state: dict[str, Any], optimizer: Any, scheduler: Any, scaler: Any, scfg: TrainConfig
    ) -> int:
        """Load the exact state of the interrupted epoch; returns the epoch to start at."""
        self.model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        # The stored optimizer state carries the old hyperparameters; the config (with any
        # --set overrides) is what the user asked for, so it wins from the next epoch on.
        scheduler.base_lrs = [scfg.lr for _ in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] = scfg.lr * lr_factor(scfg)(scheduler.last_epoch)
            group["weight_decay"] = scfg.weight_decay
        return int(state["epoch"])

    def _wrap(self, scfg: TrainConfig) -> nn.Module:
        model = self.model
        if self.rt.distributed:
            ids = [self.rt.device.index] if self.rt.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        return torch.compile(model) if scfg.compile else model

    def _train_loader(self, ds: Any, scfg: TrainConfig, stage_index: int, epoch: int) -> Any:
        seed = epoch_seed(self.config.train.seed, stage_index, epoch)
        torch.manual_seed(seed + self.rt.rank)
        sampler = None
        if self.rt.distributed:
            sampler = torch.utils.data.DistributedSampler(
                ds, self.rt.world_size, self.rt.rank, shuffle=True, seed=seed, drop_last=True
            )
        return make_loader(
            ds,
            scfg.batch_size,
            self.rt.device,
            workers=self.config.data.num_workers,
            sampler=sampler,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
            drop_last=len(ds) > scfg.batch_size,
        )

    def _validate(self, loader: Any, scfg: TrainConfig, record: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        labels = self.data["labels"]
        m = evaluate(
            self.model,
            loader,
            labels.num_classes,
            labels.ignore_index,
            self.rt.device,
            bn_eval=scfg.bn_eval,
            amp=scfg.amp,
            channels_last=scfg.channels_last,
            criterion=self.criterion,
        )
        self.val_seconds = time.perf_counter() - t0
        record.update(
            val_loss=m["loss"],
            val_miou=m["miou"],
            val_accuracy=m["global_accuracy"],
            val_mean_class_accuracy=m["mean_class_accuracy"],
            val_time_s=self.val_seconds,
        )
        return m

    def _record(self, stage: str, epoch: int, lr: float, stats: EpochStats) -> dict[str, Any]:
        record: dict[str, Any] = {
            "stage": stage,
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": stats.loss,
            "train_accuracy": stats.accuracy,
            "train_images_per_s": stats.images / max(stats.seconds, 1e-9),
            "train_time_s": stats.seconds,
            "machine": self.machine,
            "precision": self.precision,
        }
        if stats.stopped_early:
            record["partial_epoch"] = True
        return record

    def _checkpoint(
        self,
        stage: str,
        epoch: int,
        optimizer: Any,
        scheduler: Any,
        scaler: Any,
        tracker: BestTracker,
        stop: bool,
        metrics: dict[str, Any] | None,
    ) -> dict[str, Any]:
        from ..models import model_config

        return {
            "format": FORMAT,
            "version": 1,
            "model": self.model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "stage": stage,
            "epoch": epoch + 1,
            "bad_epochs": tracker.bad_epochs,
            "stopped": stop,
            "best": tracker.as_dict(),
            "rng": rng_state(),
            "config": self.requested.to_dict(),
            "precision": {
                "device": str(self.rt.device),
                "amp": self.config.train.amp,
                "channels_last": self.config.train.channels_last,
            },
            "labels": self.data["labels"].to_json(),
            "in_channels": self.data["channels"],
            "model_name": self.config.model.name,
            "model_class": type(self.model).__name__,
            "model_config": model_config(self.model),
            "val_metrics": metrics,
        }


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "kwargs":
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def epoch_line(r: dict[str, Any]) -> str:
    line = (
        f"[{r['stage']}] epoch {r['epoch']:4d}  lr {r['lr']:.2e}  "
        f"train loss {r['train_loss']:.4f}  {r['train_images_per_s']:.2f} img/s"
    )
    if "val_miou" in r:
        line += (
            f"  val loss {r['val_loss']:.4f}  mIoU {100 * r['val_miou']:.2f}  "
            f"acc {100 * r['val_accuracy']:.2f}"
        )
    return line


def _validates_at(scfg: TrainConfig, epoch: int) -> bool:
    """Whether 0-based ``epoch`` ends with a validation (every ``val_every``, and the last)."""
    return (epoch + 1) % scfg.val_every == 0 or epoch + 1 == scfg.epochs
