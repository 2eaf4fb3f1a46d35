"""The process's place in a run: device, torchrun rank, seeding, and agreeing across ranks."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from ..hardware import flush_denormals, resolve_device


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

    def any_rank(self, flag: bool) -> bool:
        """True on every rank if it is true on any (so all ranks take the same branch)."""
        if not self.distributed:
            return flag
        t = torch.tensor(float(flag), device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


def setup_runtime(device: str = "auto") -> Runtime:
    """Read torchrun's environment (if any), pick the device, join the process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    flush_denormals()  # for library callers; effective on threads started from here on
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


def epoch_seed(base: int, stage: int, epoch: int) -> int:
    # Each epoch's randomness is a function of (seed, stage, epoch) alone, so a resumed run
    # replays exactly what an uninterrupted one would have drawn.
    return (base * 1_000_003 + stage * 10_007 + epoch) % (2**63 - 1)


class Deadline:
    """A wall-clock budget (``train.max_minutes``), checked the same way on every rank."""

    def __init__(self, minutes: float | None, rt: Runtime) -> None:
        self.minutes = minutes
        self.rt = rt
        self.end = time.monotonic() + 60 * minutes if minutes else None

    def remaining_s(self) -> float:
        return float("inf") if self.end is None else self.end - time.monotonic()

    def expired(self, reserve_s: float = 0.0) -> bool:
        """Out of time, keeping ``reserve_s`` seconds for work that must still follow."""
        if self.end is None:
            return False
        return self.rt.any_rank(self.remaining_s() <= reserve_s)
