"""What every model class shares: its constructor arguments recorded as ``model.config``."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any


def _plain(value: Any) -> Any:
    # JSON/YAML-friendly: tuples become lists (config.json and checkpoints store them).
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def records_config(init: Callable[..., None]) -> Callable[..., None]:
    """Decorate ``__init__`` so that ``self.config`` holds every argument, defaults included.

    ``type(model)(**model.config)`` then rebuilds the same architecture: the config is what
    the constructor was called with, never a hand-kept copy that could miss a new argument.
    """
    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        init(self, *args, **kwargs)
        self.config = {k: _plain(v) for k, v in bound.arguments.items() if k != "self"}

    return wrapper
