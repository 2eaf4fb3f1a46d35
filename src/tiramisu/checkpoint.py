"""Checkpoints: written atomically, read without unpickling arbitrary objects."""

from __future__ import annotations

import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError
from .fileio import atomic_write

FORMAT = "tiramisu-checkpoint"


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` through ``atomic_write``: a crash mid-write keeps the previous file."""
    atomic_write(path, lambda f: torch.save(obj, f))


def _describe_unreadable(path: Path) -> str | None:
    """Say what a file is when it cannot be a PyTorch checkpoint, without unpickling it."""
    size = path.stat().st_size
    if size == 0:
        return "an empty file (0 bytes), not a checkpoint: an interrupted copy or download?"
    with path.open("rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive; very old versions wrote a bare pickle (protocol 2+).
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return None
    if head.startswith(b"\x89PNG") or head[:2] == b"\xff\xd8":
        return "an image, not a checkpoint"
    return f"not a PyTorch checkpoint (unrecognised content, {size} bytes)"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with ``weights_only=True``: tensors and plain containers only, never code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    problem = _describe_unreadable(path)
    if problem is not None:
        raise CheckpointError(f"{path}: {problem}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(
            f"{path}: refused: it contains Python objects{what} besides tensors and plain "
            f"data; tiramisu never loads such files because unpickling them can run code"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: a damaged or truncated checkpoint ({first})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a tiramisu training checkpoint")
    return ckpt


def rng_state() -> dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
