"""A run folder: checkpoints, history, TensorBoard scalars and curves, and who may write them.

Layout: ``last.pt`` (the exact state to resume from) and ``best.pt`` (the best validation
score so far), ``config.yaml`` (the run's configuration; ``auto`` precision is resolved per
machine and recorded in each checkpoint's ``precision``), ``history.csv``/``history.jsonl``,
``tensorboard/``, ``loss.png``/``miou.png`` (``error.png`` for classifiers)/``accuracy.png``,
and after training ``metrics.json``, ``report_val.txt`` and ``confusion_matrix_val.png``.
Every file is written atomically; an exclusive lock keeps a second run out of the folder.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..checkpoint import atomic_save, load_checkpoint
from ..errors import TiramisuError
from ..fileio import atomic_write_text, remove_stale_temp_files

LOCK_NAME = ".lock"


@dataclass
class BestTracker:
    """The best monitored score so far, and early stopping's count of evaluations since."""

    metric: float = -math.inf
    epoch: int | None = None
    stage: str | None = None
    bad_epochs: int = 0

    def update(self, score: float, epoch: int, stage: str) -> bool:
        if not math.isnan(score) and score > self.metric:
            self.metric, self.epoch, self.stage, self.bad_epochs = score, epoch, stage, 0
            return True
        self.bad_epochs += 1
        return False

    def exhausted(self, patience: int | None) -> bool:
        return patience is not None and self.bad_epochs >= patience

    def as_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "epoch": self.epoch, "stage": self.stage}


class RunLock:
    """An exclusive advisory lock on ``DIR/.lock`` held for the whole run (POSIX ``flock``)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_NAME
        self.file: Any = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; runs are not guarded there
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = self.path.open("a+")
        try:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.close()
            self.file = None
            raise TiramisuError(
                f"{self.path.parent}: another tiramisu run is writing to this folder; "
                f"wait for it to finish or choose another --out"
            ) from None

    def release(self) -> None:
        if self.file is not None:
            self.file.close()  # closing the descriptor releases the flock
            self.file = None


class RunFolder:
    """Everything a training run writes, in one place; only the main process writes."""

    def __init__(self, path: Path, writer: bool = True) -> None:
        self.path = Path(path)
        self.writer = writer
        self.lock = RunLock(self.path)
        self.records: list[dict[str, Any]] = []
        self.tensorboard: Any = None

    @property
    def last(self) -> Path:
        return self.path / "last.pt"

    @property
    def best(self) -> Path:
        return self.path / "best.pt"

    def open(self, resume: bool) -> dict[str, Any] | None:
        """Lock the folder, clear a killed writer's temporary files, load the resume state."""
        if self.writer:
            self.lock.acquire()
            remove_stale_temp_files(self.path)
        if not resume and self.last.exists():
            self.close()
            raise TiramisuError(
                f"{self.path}: already holds a run (last.pt); pass --resume to continue it "
                f"or choose another --out"
            )
        if not resume:
            return None
        try:
            state = load_checkpoint(self.last)  # raises if there is none
        except BaseException:
            self.close()
            raise
        self.records = list(state.get("history") or [])
        return state

    def start(self, config: dict[str, Any]) -> None:
        if not self.writer:
            return
        atomic_write_text(self.path / "config.yaml", yaml.safe_dump(config, sort_keys=False))
        from torch.utils.tensorboard import SummaryWriter

        self.tensorboard = SummaryWriter(str(self.path / "tensorboard"))

    def record_epoch(
        self, record: dict[str, Any], checkpoint: dict[str, Any], improved: bool, task: str
    ) -> None:
        """Append the epoch to the history and save ``best.pt`` (if improved) and ``last.pt``."""
        self.records.append(record)
        if not self.writer:
            return
        checkpoint["history"] = self.records
        if improved:
            atomic_save(checkpoint, self.best)
        atomic_save(checkpoint, self.last)
        self._write_history()
        self._log_scalars(record)
        from ..plots import plot_history

        plot_history(self.records, self.path, task)

    def _write_history(self) -> None:
        keys: list[str] = []
        for r in self.records:
            keys += [k for k in r if k not in keys]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(self.records)
        atomic_write_text(self.path / "history.csv", buf.getvalue())
        lines = "".join(json.dumps(r) + "\n" for r in self.records)
        atomic_write_text(self.path / "history.jsonl", lines)

    def _log_scalars(self, record: dict[str, Any]) -> None:
        step = len(self.records)
        for key, value in record.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and key != "epoch":
                group = "val" if key.startswith("val_") else "train"
                name = key.removeprefix("val_").removeprefix("train_")
                self.tensorboard.add_scalar(f"{group}/{name}", value, step)
        self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        self.lock.release()


def stage_bad_epochs(history: list[dict[str, Any]], stage: str, best: dict[str, Any]) -> int:
    """Evaluations without improvement in ``stage``, counted from the history.

    Patience is per stage: fine-tuning starts from the best model with a count of zero (its
    best may still be a first-stage epoch, which it has to beat to replace ``best.pt``). The
    count is rebuilt from the history, not read from the checkpoint, so that runs saved while
    the count leaked across stages (before 2026-12-04 fine-tuning stopped after its first
    epoch, still counting the first stage's evaluations) resume correctly.
    """
    count = 0
    for record in reversed(history):
        if record.get("stage") != stage:
            break  # stages follow each other, so this stage's records are the last ones
        if record.get("stage") == best.get("stage") and record.get("epoch") == best.get("epoch"):
            break
        if "val_loss" in record:
            count += 1
    return count


def tracker_from_state(state: dict[str, Any] | None) -> BestTracker:
    if state is None:
        return BestTracker()
    best = state["best"]
    history = state.get("history")
    bad = stage_bad_epochs(history, state["stage"], best) if history else int(state["bad_epochs"])
    return BestTracker(best["metric"], best["epoch"], best["stage"], bad)


__all__ = ["BestTracker", "RunFolder", "RunLock", "stage_bad_epochs", "tracker_from_state"]
