"""Training, one concern per module.

- ``runtime``: the process's device, torchrun rank, seeding, the time budget
- ``optim``: optimizer, learning-rate schedule, loss and class weights
- ``loop``: one training epoch and one evaluation pass (tensors in, numbers out)
- ``run_folder``: checkpoints, history, TensorBoard, curves, the folder lock, best/early stop
- ``trainer``: stages x epochs, resume
- ``report``: the end-of-run report, and evaluating a checkpoint or exported weights on a split
"""

from .loop import EpochStats, TrainingDiverged, evaluate, train_one_epoch
from .report import evaluate_checkpoint, evaluate_pretrained, write_report
from .trainer import train

__all__ = [
    "EpochStats",
    "TrainingDiverged",
    "evaluate",
    "evaluate_checkpoint",
    "evaluate_pretrained",
    "train",
    "train_one_epoch",
    "write_report",
]
