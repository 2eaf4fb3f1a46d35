"""tiramisu: FC-DenseNets ("The One Hundred Layers Tiramisu") and DenseNets in PyTorch."""

from .inference import Segmenter
from .models import (
    DenseBlock,
    DenseLayer,
    DenseNet,
    FCDenseNet,
    create_model,
    list_models,
    set_memory_efficient,
)
from .pretrained import load_pretrained, save_pretrained

__version__ = "0.1.0"


def from_pretrained(path_or_id: str, device: str = "cpu", **kwargs) -> Segmenter:
    """A ready-to-use ``Segmenter`` from a pretrained directory or Hugging Face Hub id."""
    return Segmenter.from_pretrained(path_or_id, device=device, **kwargs)


__all__ = [
    "DenseBlock",
    "DenseLayer",
    "DenseNet",
    "FCDenseNet",
    "Segmenter",
    "__version__",
    "create_model",
    "from_pretrained",
    "list_models",
    "load_pretrained",
    "save_pretrained",
    "set_memory_efficient",
]
