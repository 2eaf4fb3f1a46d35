"""The training loop and evaluation: one loop for CPU, one GPU, or many under torchrun.

Everything is plain PyTorch: a DataLoader, a model (wrapped in DistributedDataParallel when
launched by torchrun), an optimizer and a per-epoch schedule. A run folder holds ``last.pt`` and
``best.pt`` (atomic writes), ``history.csv``/``history.jsonl``, TensorBoard scalars, PNG curves,
and after training ``metrics.json``, ``report.txt`` and ``confusion_matrix.png`` for the best model.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from .checkpoint import FORMAT, atomic_save, load_checkpoint, rng_state, set_rng_state
from .errors import TiramisuError
from .metrics import PAPER_CAMVID, ConfusionMatrix, format_report
from .models import batch_statistics, create_model


class TrainingDiverged(TiramisuError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


# --------------------------------------------------------------------------- distributed set-up
@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; asking for CUDA without a GPU is an error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TiramisuError("--device cuda was asked for but no CUDA GPU is available")
    return torch.device(name)


def setup_runtime(device: str = "auto") -> Runtime:
    """Read torchrun's environment (if any) and pick the device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Runtime(dev, rank, world_size, local_rank)


def teardown_runtime(rt: Runtime) -> None:
    if rt.distributed and dist.is_initialized():
        dist.destroy_process_group()


class ShardSampler(Sampler[int]):
    """Every ``world_size``-th index starting at ``rank``, in order, without padding.

    ``DistributedSampler`` pads the last shard by repeating samples, which would count some
    validation images twice in the summed confusion matrix; evaluation must see each exactly once.
    """

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, length, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


# --------------------------------------------------------------------------- small helpers
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_deterministic(enabled: bool) -> None:
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # warn_only: a few CUDA backward kernels (max-pool) have no deterministic variant.
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def resolve_amp(device: torch.device, amp: str | None) -> str:
    """``auto`` -> bf16 where the hardware computes it natively (CPUs with AVX512-BF16/AMX,
    Ampere+ GPUs), fp16 on older GPUs, else none. Measured in BENCHMARKS.md: bf16 autocast +
    channels_last makes an FC-DenseNet103 training step 2-4x faster on such a CPU."""
    if amp != "auto":
        return "none" if amp in (None, False) else amp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "bf16"
    return "none"


def resolve_fast_paths(cfg_train: dict[str, Any], device: torch.device) -> None:
    """Replace ``auto`` in train.amp and train.channels_last by what this device gets."""
    cfg_train["amp"] = resolve_amp(device, cfg_train["amp"])
    if cfg_train["channels_last"] == "auto":
        # channels_last is what oneDNN and tensor cores want for reduced precision.
        cfg_train["channels_last"] = cfg_train["amp"] != "none"


def autocast_context(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    amp = resolve_amp(device, amp)
    if amp == "none":
        return contextlib.nullcontext()
    if amp not in ("bf16", "fp16"):
        raise TiramisuError(f"train.amp must be auto, none, bf16 or fp16, got {amp!r}")
    if amp == "fp16" and device.type != "cuda":
        raise TiramisuError("train.amp=fp16 needs a CUDA GPU; use bf16 on CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def lr_factor(train_cfg: dict[str, Any], epochs: int) -> Any:
    kind = train_cfg["lr_schedule"]
    if kind == "exponential":
        decay = float(train_cfg["lr_decay"])
        return lambda e: decay**e
    if kind == "multistep":
        steps = [round(f * epochs) if f < 1 else int(f) for f in train_cfg["milestones"]]
        gamma = float(train_cfg["gamma"])
        return lambda e: gamma ** sum(e >= s for s in steps)
    if kind == "constant":
        return lambda e: 1.0
    raise TiramisuError(
        f"train.lr_schedule must be exponential, multistep or constant, got {kind!r}"
    )


def build_optimizer(params: Any, train_cfg: dict[str, Any], lr: float) -> torch.optim.Optimizer:
    name, wd = train_cfg["optimizer"], float(train_cfg["weight_decay"])
    if name == "rmsprop":
        # Lasagne's rmsprop (the official code): rho 0.9, epsilon 1e-6 added outside the sqrt.
        return torch.optim.RMSprop(params, lr=lr, alpha=0.9, eps=1e-6, weight_decay=wd)
    if name == "sgd":
        return torch.optim.SGD(
            params,
            lr=lr,
            momentum=float(train_cfg["momentum"]),
            nesterov=bool(train_cfg["nesterov"]),
            weight_decay=wd,
        )
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    raise TiramisuError(f"train.optimizer must be rmsprop, sgd, adam or adamw, got {name!r}")


def to_device(x: Tensor, device: torch.device, channels_last: bool = False) -> Tensor:
    x = x.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    num_classes: int,
    ignore_index: int | None,
    device: torch.device,
    *,
    bn_eval: str = "batch",
    amp: str = "none",
    channels_last: bool = False,
    criterion: nn.Module | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Confusion-matrix metrics over ``loader`` (summed across processes when distributed)."""
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(num_classes, ignore_index, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    loss_count = torch.zeros((), dtype=torch.float64, device=device)
    bn_ctx = batch_statistics(model) if bn_eval == "batch" else contextlib.nullcontext()
    if bn_eval not in ("batch", "running"):
        raise TiramisuError(f"bn_eval must be batch or running, got {bn_eval!r}")
    iterator = loader
    if progress:
        from tqdm import tqdm

        iterator = tqdm(loader, desc="evaluate", leave=False, dynamic_ncols=True)
    with bn_ctx:
        for images, targets in iterator:
            images = to_device(images, device, channels_last)
            targets = targets.to(device, non_blocking=True)
            with autocast_context(device, amp):
                logits = model(images)
            logits = logits.float()
            if criterion is not None:
                valid = targets != ignore_index if ignore_index is not None else None
                n = valid.sum() if valid is not None else targets.numel()
                loss_sum += criterion(logits, targets).double() * n
                loss_count += n
            cm.update(logits.argmax(1), targets)
    cm.all_reduce()
    if dist.is_available() and dist.is_initialized() and criterion is not None:
        dist.all_reduce(loss_sum)
        dist.all_reduce(loss_count)
    model.train(was_training)
    metrics = cm.compute()
    metrics["loss"] = (loss_sum / loss_count).item() if loss_count > 0 else None
    return metrics


# --------------------------------------------------------------------------- building a run
def build_data(cfg: dict[str, Any]) -> dict[str, Any]:
    """Datasets and the label specification for a config (segmentation or classification)."""
    from .data import build_dataset, label_spec, resolve_channels

    data = cfg["data"]
    if cfg["task"] == "classification":
        from .data.classification import build_classification_data

        return build_classification_data(cfg)
    if data["dataset"] == "synthetic" and data["root"] is None:
        raise TiramisuError("data.root must be set for the synthetic dataset")
    labels = label_spec(data)
    channels = resolve_channels(data)
    train_ds = build_dataset(cfg, "train", train=True, labels=labels, channels=channels)
    val_ds = build_dataset(cfg, "val", train=False, labels=labels, channels=channels)
    return {"labels": labels, "channels": channels, "train": train_ds, "val": val_ds}


def build_model_from_cfg(cfg: dict[str, Any], num_classes: int, in_channels: int) -> nn.Module:
    kwargs = dict(cfg["model"]["kwargs"] or {})
    kwargs.update(num_classes=num_classes, in_channels=in_channels)
    return create_model(cfg["model"]["name"], **kwargs)


def _loader(
    ds: Dataset,
    batch_size: int,
    sampler: Sampler | None,
    shuffle: bool,
    workers: int,
    device: torch.device,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> DataLoader:
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=shuffle if sampler is None else False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        drop_last=drop_last,
        generator=generator,
        persistent_workers=False,
    )


def _epoch_seed(base: int, stage: int, epoch: int) -> int:
    # Each epoch's randomness is a function of (seed, stage, epoch) alone, so a resumed run
    # replays exactly what an uninterrupted one would have drawn.
    return (base * 1_000_003 + stage * 10_007 + epoch) % (2**63 - 1)


class History:
    """Per-epoch records, mirrored to CSV and JSON lines (rewritten whole, so resume is clean)."""

    def __init__(self, out_dir: Path, records: list[dict[str, Any]] | None = None) -> None:
        self.out_dir = out_dir
        self.records = list(records or [])

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def write(self) -> None:
        keys: list[str] = []
        for r in self.records:
            keys += [k for k in r if k not in keys]
        tmp = self.out_dir / ".history.csv.tmp"
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.records)
        os.replace(tmp, self.out_dir / "history.csv")
        tmp = self.out_dir / ".history.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        os.replace(tmp, self.out_dir / "history.jsonl")


# --------------------------------------------------------------------------- training
def train(
    cfg: dict[str, Any],
    out_dir: str | Path,
    resume: bool = False,
    device: str = "auto",
    quiet: bool = False,
    resume_overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Run the configured stages; returns the best model's validation metrics.

    With ``resume=True`` the run's own stored config is used, with ``resume_overrides``
    (``key=value`` strings, e.g. a larger ``train.epochs``) applied on top.
    """
    rt = setup_runtime(device)
    try:
        return _train(cfg, Path(out_dir), resume, rt, quiet, resume_overrides or [])
    finally:
        teardown_runtime(rt)


def _train(
    cfg: dict[str, Any],
    out: Path,
    resume: bool,
    rt: Runtime,
    quiet: bool,
    resume_overrides: list[str],
) -> dict[str, Any]:
    tcfg = cfg["train"]
    log = (lambda *a: None) if (quiet or not rt.is_main) else print
    ckpt_path, best_path = out / "last.pt", out / "best.pt"
    if not resume and ckpt_path.exists():
        raise TiramisuError(
            f"{out}: already holds a run (last.pt); pass --resume to continue it "
            f"or choose another --out"
        )
    state = load_checkpoint(ckpt_path) if resume else None  # raises if there is none
    if state is not None:
        from .config import set_key

        cfg = state["config"]  # the run's own config, plus what the command line changes
        for item in resume_overrides:
            set_key(cfg, item)
        tcfg = cfg["train"]

    seed_everything(int(tcfg["seed"]))
    set_deterministic(bool(tcfg["deterministic"]))
    resolve_fast_paths(tcfg, rt.device)  # recorded resolved in the run's config.yaml
    log(f"device {rt.device}, amp {tcfg['amp']}, channels_last {tcfg['channels_last']}")
    data = build_data(cfg)
    labels, channels = data["labels"], data["channels"]
    if cfg["data"].get("validate", True):
        for split in ("train", "val"):
            validate = getattr(data[split], "validate", None)
            if validate is not None:
                validate()
    num_classes, ignore = labels.num_classes, labels.ignore_index

    model = build_model_from_cfg(cfg, num_classes, channels).to(rt.device)
    if tcfg["sync_bn"] and rt.distributed:
        if rt.device.type != "cuda":
            raise TiramisuError("train.sync_bn needs CUDA: PyTorch's SyncBatchNorm is GPU-only")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if tcfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    raw_model = model

    weights = None
    cw = tcfg["class_weights"]
    if cw == "median_frequency":
        from .data import median_frequency_weights

        weights = median_frequency_weights(data["train"]).to(rt.device)
        log("class weights (median frequency):", [round(w, 3) for w in weights.tolist()])
    elif isinstance(cw, list | tuple):
        if len(cw) != num_classes:
            raise TiramisuError(
                f"train.class_weights has {len(cw)} values for {num_classes} classes"
            )
        weights = torch.tensor([float(w) for w in cw], device=rt.device)
    elif cw is not None:
        raise TiramisuError(
            f"train.class_weights must be null, median_frequency or a list, got {cw!r}"
        )
    criterion = nn.CrossEntropyLoss(weight=weights, ignore_index=ignore)

    if rt.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(_dump_yaml(cfg))
    stages = [("train", tcfg)]
    if cfg["finetune"]["enabled"]:
        stages.append(
            ("finetune", {**tcfg, **{k: v for k, v in cfg["finetune"].items() if k != "enabled"}})
        )

    history = History(out, state["history"] if state else None)
    best = dict(state["best"]) if state else {"metric": -math.inf, "epoch": None, "stage": None}
    writer = None
    if rt.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tensorboard"))
    monitor = tcfg["monitor"]

    deadline = (
        time.monotonic() + 60 * float(tcfg["max_minutes"]) if tcfg.get("max_minutes") else None
    )
    out_of_time = False
    start_stage = [s for s, _ in stages].index(state["stage"]) if state else 0
    for stage_idx in range(start_stage, len(stages)):
        if out_of_time:
            break
        stage, scfg = stages[stage_idx]
        resuming_here = state is not None and stage_idx == start_stage
        if stage == "finetune" and not resuming_here and best_path.exists():
            # Fine-tuning starts from the best model of the first stage, as in the paper.
            raw_model.load_state_dict(load_checkpoint(best_path, rt.device)["model"])
        epochs = int(scfg["epochs"])
        optimizer = build_optimizer(raw_model.parameters(), scfg, float(scfg["lr"]))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(scfg, epochs))
        scaler = torch.amp.GradScaler("cuda", enabled=scfg["amp"] == "fp16")
        start_epoch, bad_epochs = 0, 0
        if resuming_here:
            raw_model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            start_epoch, bad_epochs = int(state["epoch"]), int(state["bad_epochs"])
            set_rng_state(state["rng"])
            if state.get("stopped"):
                start_epoch = epochs  # early stopping had already ended this stage
            log(f"resuming {stage} at epoch {start_epoch + 1}")

        model = raw_model
        if rt.distributed:
            model = nn.parallel.DistributedDataParallel(
                raw_model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None
            )
        if scfg.get("compile"):
            model = torch.compile(model)

        train_ds = data["train"]
        if stage == "finetune" and cfg["task"] == "segmentation":
            train_ds = _with_crop(cfg, data, scfg.get("crop_size"))
        val_sampler = ShardSampler(len(data["val"]), rt.rank, rt.world_size)
        val_loader = _loader(
            data["val"],
            int(scfg["eval_batch_size"]),
            val_sampler,
            False,
            int(cfg["data"]["num_workers"]),
            rt.device,
        )
        patience = scfg.get("patience")
        for epoch in range(start_epoch, epochs):
            seed = _epoch_seed(int(tcfg["seed"]), stage_idx, epoch)
            torch.manual_seed(seed + rt.rank)
            generator = torch.Generator().manual_seed(seed)
            sampler = None
            if rt.distributed:
                sampler = torch.utils.data.DistributedSampler(
                    train_ds, rt.world_size, rt.rank, shuffle=True, seed=seed, drop_last=True
                )
            loader = _loader(
                train_ds,
                int(scfg["batch_size"]),
                sampler,
                True,
                int(cfg["data"]["num_workers"]),
                rt.device,
                generator,
                drop_last=len(train_ds) > int(scfg["batch_size"]),
            )
            t0 = time.perf_counter()
            train_loss, n_images, _train_acc = _train_one_epoch(
                model,
                loader,
                criterion,
                optimizer,
                scaler,
                scfg,
                rt,
                f"{stage} {epoch + 1}/{epochs}",
                quiet,
                deadline,
            )
            train_time = time.perf_counter() - t0
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()

            record: dict[str, Any] = {
                "stage": stage,
                "epoch": epoch + 1,
                "lr": lr,
                "train_loss": train_loss,
                "train_images_per_s": n_images / max(train_time, 1e-9),
                "train_time_s": train_time,
            }
            improved, m = False, None
            if (epoch + 1) % int(scfg["val_every"]) == 0 or epoch + 1 == epochs:
                t1 = time.perf_counter()
                m = evaluate(
                    raw_model,
                    val_loader,
                    num_classes,
                    ignore,
                    rt.device,
                    bn_eval=scfg["bn_eval"],
                    amp=scfg["amp"],
                    channels_last=scfg["channels_last"],
                    criterion=criterion,
                )
                record.update(
                    val_loss=m["loss"],
                    val_miou=m["miou"],
                    val_accuracy=m["global_accuracy"],
                    val_mean_class_accuracy=m["mean_class_accuracy"],
                    val_time_s=time.perf_counter() - t1,
                )
                score = m["global_accuracy"] if monitor == "accuracy" else m["miou"]
                if not math.isnan(score) and score > best["metric"]:
                    best = {"metric": score, "epoch": epoch + 1, "stage": stage}
                    improved, bad_epochs = True, 0
                else:
                    bad_epochs += 1
            history.append(record)
            stop = patience is not None and bad_epochs >= int(patience)
            if rt.is_main:
                ckpt = {
                    "format": FORMAT,
                    "version": 1,
                    "model": raw_model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "stage": stage,
                    "epoch": epoch + 1,
                    "bad_epochs": bad_epochs,
                    "stopped": stop,
                    "best": best,
                    "rng": rng_state(),
                    "config": cfg,
                    "history": history.records,
                    "labels": labels.to_json(),
                    "in_channels": channels,
                    "model_name": cfg["model"]["name"],
                    "model_config": getattr(raw_model, "config", {}),
                    "val_metrics": m,
                }
                if improved:
                    atomic_save(ckpt, best_path)
                atomic_save(ckpt, ckpt_path)
                history.write()
                _log_epoch(writer, record, len(history.records))
                from .plots import plot_history

                plot_history(history.records, out, cfg["task"])
                log(_epoch_line(record))
            if deadline is not None and _all_agree(time.monotonic() >= deadline, rt):
                log(f"time budget of {tcfg['max_minutes']} minutes used up; stopping")
                out_of_time = True
                break
            if stop:
                log(f"early stopping: no {monitor} improvement for {bad_epochs} evaluations")
                break
        state = None

    if writer is not None:
        writer.close()
    return _final_report(cfg, data, raw_model, out, best, rt, quiet)


def _with_crop(cfg: dict[str, Any], data: dict[str, Any], crop: Any) -> Dataset:
    from .data import build_dataset

    c2 = json.loads(json.dumps(cfg))
    c2["data"]["crop_size"] = crop
    ds = build_dataset(c2, "train", train=True, labels=data["labels"], channels=data["channels"])
    ds._cache = data["train"]._cache  # share decoded frames with the first stage
    return ds


def _train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    scfg: dict[str, Any],
    rt: Runtime,
    desc: str,
    quiet: bool,
    deadline: float | None = None,
) -> tuple[float, int, float]:
    """Mean loss, images seen (all ranks) and pixel/sample accuracy on the training batches."""
    from tqdm import tqdm

    model.train()
    total, count, n_images = 0.0, 0, 0
    correct = torch.zeros((), dtype=torch.float64, device=rt.device)
    labelled = torch.zeros((), dtype=torch.float64, device=rt.device)
    max_steps = scfg.get("max_steps_per_epoch")
    steps = len(loader) if max_steps is None else min(len(loader), int(max_steps))
    bar = tqdm(
        total=steps,
        desc=desc,
        leave=False,
        dynamic_ncols=True,
        disable=quiet or not rt.is_main,
        unit="step",
    )
    t0 = time.perf_counter()
    for step, (images, targets) in enumerate(loader):
        if step >= steps:
            break
        if deadline is not None:
            over = torch.tensor(float(time.monotonic() >= deadline), device=rt.device)
            if rt.distributed:  # every rank must stop at the same step, or DDP hangs
                dist.all_reduce(over, op=dist.ReduceOp.MAX)
            if over.item():
                break  # the budget ran out mid-epoch: validate what we have
        images = to_device(images, rt.device, scfg["channels_last"])
        targets = targets.to(rt.device, non_blocking=True)
        with autocast_context(rt.device, scfg["amp"]):
            logits = model(images)
        loss = criterion(logits.float(), targets)
        finite = torch.isfinite(loss.detach()).to(torch.float32)
        if rt.distributed:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        loss_value = loss.item()  # one host sync per step, reused below
        if finite.item() == 0:
            raise TrainingDiverged(
                f"loss became {loss_value} at {desc}, step {step + 1}; stopped. The last good "
                f"checkpoint is kept. Try a lower train.lr, train.grad_clip or train.amp=none."
            )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if scfg.get("grad_clip"):
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), float(scfg["grad_clip"]))
        scaler.step(optimizer)
        scaler.update()
        with torch.no_grad():
            valid = (targets >= 0) & (targets != getattr(criterion, "ignore_index", -100))
            correct += ((logits.argmax(1) == targets) & valid).sum()
            labelled += valid.sum()
        total += loss_value * images.shape[0]
        count += images.shape[0]
        n_images += images.shape[0] * rt.world_size
        bar.update(1)
        bar.set_postfix(
            loss=f"{loss_value:.4f}", img_s=f"{n_images / (time.perf_counter() - t0):.2f}"
        )
    bar.close()
    sums = torch.stack(
        [
            torch.tensor(total, dtype=torch.float64, device=rt.device),
            torch.tensor(float(count), dtype=torch.float64, device=rt.device),
            correct,
            labelled,
        ]
    )
    if rt.distributed:
        dist.all_reduce(sums)
    return (
        (sums[0] / sums[1].clamp(min=1)).item(),
        n_images,
        (sums[2] / sums[3].clamp(min=1)).item(),
    )


def _all_agree(flag: bool, rt: Runtime) -> bool:
    """True if any rank says so (all ranks then take the same branch)."""
    if not rt.distributed:
        return flag
    t = torch.tensor(float(flag), device=rt.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _epoch_line(r: dict[str, Any]) -> str:
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


def _log_epoch(writer: Any, record: dict[str, Any], step: int) -> None:
    if writer is None:
        return
    for key, value in record.items():
        if isinstance(value, int | float) and key != "epoch":
            group = "val" if key.startswith("val_") else "train"
            writer.add_scalar(
                f"{group}/{key.removeprefix('val_').removeprefix('train_')}", value, step
            )
    writer.flush()


def _final_report(
    cfg: dict[str, Any],
    data: dict[str, Any],
    model: nn.Module,
    out: Path,
    best: dict[str, Any],
    rt: Runtime,
    quiet: bool,
) -> dict[str, Any]:
    best_path = out / "best.pt"
    if rt.distributed:
        dist.barrier()  # rank 0 has finished writing best.pt
    labels = data["labels"]
    stored = load_checkpoint(best_path, rt.device) if best_path.exists() else None
    if stored is not None and stored.get("val_metrics") is not None:
        # The best epoch's validation pass already measured these weights; evaluation is
        # deterministic, so re-running it (minutes on CPU for CamVid) would only repeat it.
        metrics = dict(stored["val_metrics"])
    else:
        if stored is not None:
            model.load_state_dict(stored["model"])
        tcfg = cfg["train"]
        loader = _loader(
            data["val"],
            int(tcfg["eval_batch_size"]),
            ShardSampler(len(data["val"]), rt.rank, rt.world_size),
            False,
            int(cfg["data"]["num_workers"]),
            rt.device,
        )
        metrics = evaluate(
            model,
            loader,
            labels.num_classes,
            labels.ignore_index,
            rt.device,
            bn_eval=tcfg["bn_eval"],
            amp=tcfg["amp"],
            channels_last=tcfg["channels_last"],
        )
    metrics.pop("loss", None)
    metrics.update(
        split="val",
        checkpoint=str(best_path),
        best_epoch=best["epoch"],
        best_stage=best["stage"],
        classes=labels.classes,
    )
    if rt.is_main:
        write_report(cfg, metrics, labels.classes, out, "val", quiet)
    return metrics


def write_report(
    cfg: dict[str, Any],
    metrics: dict[str, Any],
    classes: list[str],
    out: Path,
    split: str,
    quiet: bool = False,
    json_path: Path | None = None,
) -> str:
    from .metrics import format_classification_report
    from .plots import plot_confusion

    if cfg["task"] == "classification":
        metrics["top1_error"] = 1.0 - metrics["global_accuracy"]
        text = format_classification_report(metrics, classes)
    else:
        is_camvid = cfg["data"]["dataset"] == "camvid"
        paper = PAPER_CAMVID.get(cfg["model"]["name"]) if is_camvid else None
        text = format_report(metrics, classes, paper)
        if paper:
            text += f"\n(paper column: Jégou et al. 2017, Table 3, CamVid test set; ours: {split})"
    out.mkdir(parents=True, exist_ok=True)
    json_path = json_path or out / "metrics.json"
    tmp = json_path.with_name(f".{json_path.name}.tmp")
    tmp.write_text(json.dumps(metrics, indent=2))
    os.replace(tmp, json_path)
    (out / f"report_{split}.txt").write_text(text + "\n")
    plot_confusion(metrics["confusion_matrix"], classes, out / f"confusion_matrix_{split}.png")
    if not quiet:
        print(text)
    return text


def _dump_yaml(cfg: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(cfg, sort_keys=False)


# ------------------------------------------------------------------ evaluating a checkpoint
def build_eval_dataset(cfg: dict[str, Any], split: str, labels: Any, channels: int) -> Dataset:
    if cfg["task"] == "classification":
        from .data.classification import build_classification_split

        return build_classification_split(cfg, split)
    from .data import build_dataset

    return build_dataset(cfg, split, train=False, labels=labels, channels=channels)


def load_model_state(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise TiramisuError(
            f"{source}: weights do not match the model "
            f"({first[1].strip() if len(first) > 1 else first[0]})"
        ) from None


def evaluate_checkpoint(
    ckpt: dict[str, Any],
    split: str,
    data_root: str | None = None,
    out_dir: Path | None = None,
    json_path: Path | None = None,
    device: str = "auto",
    quiet: bool = False,
) -> dict[str, Any]:
    """Evaluate a training checkpoint on one split, single process, writing the report."""
    from .data import LabelSpec

    cfg = json.loads(json.dumps(ckpt["config"]))
    if data_root is not None:
        cfg["data"]["root"] = str(data_root)
    if cfg["task"] == "classification":
        lab = ckpt["labels"]
        labels = LabelSpec(
            list(lab["classes"]), [tuple(c) for c in lab["colors"]], int(lab["ignore_index"])
        )
    else:
        from .data import label_spec

        labels = label_spec(cfg["data"])  # also restores palettes / label maps for decoding
    channels = int(ckpt["in_channels"])
    dataset = build_eval_dataset(cfg, split, labels, channels)
    if hasattr(dataset, "validate"):
        dataset.validate()
    dev = resolve_device(device)
    model = build_model_from_cfg(cfg, labels.num_classes, channels)
    load_model_state(model, ckpt["model"], "checkpoint")
    model.to(dev)
    tcfg = cfg["train"]
    loader = _loader(
        dataset, int(tcfg["eval_batch_size"]), None, False, int(cfg["data"]["num_workers"]), dev
    )
    metrics = evaluate(
        model,
        loader,
        labels.num_classes,
        labels.ignore_index,
        dev,
        bn_eval=tcfg["bn_eval"],
        amp=tcfg["amp"],
        channels_last=tcfg["channels_last"],
        progress=not quiet,
    )
    metrics.pop("loss", None)
    metrics.update(
        split=split, classes=labels.classes, epoch=ckpt.get("epoch"), stage=ckpt.get("stage")
    )
    if out_dir is not None:
        write_report(cfg, metrics, labels.classes, out_dir, split, quiet=quiet)
        if json_path is not None:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(metrics, indent=2))
    return metrics
