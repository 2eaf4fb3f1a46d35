"""tiramisu: FC-DenseNets ("The One Hundred Layers Tiramisu") and DenseNets in PyTorch."""

from .models import (
    DenseBlock,
    DenseLayer,
    DenseNet,
    FCDenseNet,
    create_model,
    list_models,
    set_memory_efficient,
)

__version__ = "0.1.0"

__all__ = [
    "DenseBlock",
    "DenseLayer",
    "DenseNet",
    "FCDenseNet",
    "__version__",
    "create_model",
    "list_models",
    "set_memory_efficient",
]
