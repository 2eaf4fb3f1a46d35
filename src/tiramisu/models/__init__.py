"""Model zoo: FC-DenseNet segmenters and DenseNet classifiers sharing one dense block."""

from .densenet import DenseNet, Transition
from .fcdensenet import FCDenseNet, TransitionDown, TransitionUp, center_crop
from .layers import (
    DenseBlock,
    DenseLayer,
    batch_statistics,
    he_uniform_,
    set_memory_efficient,
)
from .registry import (
    build_architecture,
    build_model,
    create_model,
    list_models,
    model_classes,
    model_config,
    model_info,
    register_model,
)

__all__ = [
    "DenseBlock",
    "DenseLayer",
    "DenseNet",
    "FCDenseNet",
    "Transition",
    "TransitionDown",
    "TransitionUp",
    "batch_statistics",
    "build_architecture",
    "build_model",
    "center_crop",
    "create_model",
    "he_uniform_",
    "list_models",
    "model_classes",
    "model_config",
    "model_info",
    "register_model",
    "set_memory_efficient",
]
