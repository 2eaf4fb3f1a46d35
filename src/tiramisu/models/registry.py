"""Named model configurations: ``create_model(name, **overrides)`` and ``list_models()``."""

from __future__ import annotations

import fnmatch
from typing import Any

from torch import nn

from .densenet import DenseNet
from .fcdensenet import FCDenseNet

_REGISTRY: dict[str, tuple[type[nn.Module], dict[str, Any], str]] = {}


def register_model(name: str, cls: type[nn.Module], description: str, **defaults: Any) -> None:
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = (cls, defaults, description)


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching a shell-style ``pattern`` (e.g. ``"fcdensenet*"``)."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def model_info(name: str) -> tuple[type[nn.Module], dict[str, Any], str]:
    try:
        cls, defaults, description = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}") from None
    return cls, dict(defaults), description


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a registered model; keyword overrides replace the named configuration's values."""
    cls, kwargs, _ = model_info(name)
    kwargs.update(overrides)
    try:
        return cls(**kwargs)
    except TypeError as e:  # an unknown keyword: say which model and what it accepts
        raise ValueError(f"cannot build {name!r}: {e}") from None


def build_model(name: str, kwargs: dict[str, Any] | None = None, **fixed: Any) -> nn.Module:
    """The one way a run builds its model: a registered name, the config's ``model.kwargs``,
    and what the data decides (``num_classes``, ``in_channels``) on top."""
    return create_model(name, **{**(kwargs or {}), **fixed})


def model_classes() -> dict[str, type[nn.Module]]:
    """Architecture classes by class name (``config.json``'s ``architecture``)."""
    return {cls.__name__: cls for cls, _, _ in _REGISTRY.values()}


def build_architecture(architecture: str, model_config: dict[str, Any]) -> nn.Module:
    """Rebuild a model from its class name and recorded constructor arguments."""
    classes = model_classes()
    if architecture not in classes:
        raise ValueError(f"unknown architecture {architecture!r} (known: {', '.join(classes)})")
    return classes[architecture](**model_config)


def model_config(model: nn.Module) -> dict[str, Any]:
    """The constructor arguments a model was built with (see ``records_config``)."""
    config = getattr(model, "config", None)
    if not isinstance(config, dict):
        raise ValueError(f"{type(model).__name__} does not record its constructor arguments")
    return dict(config)


def _cifar_layers(depth: int, bottleneck: bool) -> int:
    # depth counts the first conv, two transitions and the classifier (4) plus one conv per
    # plain dense layer or two per bottleneck layer, spread over 3 blocks.
    per_block, rest = divmod(depth - 4, 6 if bottleneck else 3)
    if rest:
        raise ValueError(f"depth {depth} does not give whole dense blocks")
    return per_block


_FCDN: dict[str, tuple[int, tuple[int, ...], int, str]] = {
    "fcdensenet56": (12, (4,) * 5, 4, "FC-DenseNet56 (k=12, 4 layers per block), 1.4M params"),
    "fcdensenet67": (16, (5,) * 5, 5, "FC-DenseNet67 (k=16, 5 layers per block), 3.5M params"),
    "fcdensenet103": (16, (4, 5, 7, 10, 12), 15, "FC-DenseNet103 (k=16), 9.3M params"),
}
for _name, (_k, _down, _bottleneck, _desc) in _FCDN.items():
    register_model(
        _name, FCDenseNet, _desc, growth_rate=_k, down_blocks=_down, bottleneck_layers=_bottleneck
    )

# CIFAR DenseNets from Huang et al., Table 2 (first conv: 16 maps, or 2k for BC).
_CIFAR: dict[str, tuple[int, int, bool]] = {
    "densenet40_k12": (40, 12, False),
    "densenet100_k12": (100, 12, False),
    "densenet100_k24": (100, 24, False),
    "densenet_bc100_k12": (100, 12, True),
    "densenet_bc250_k24": (250, 24, True),
    "densenet_bc190_k40": (190, 40, True),
}
for _name, (_depth, _k, _bc) in _CIFAR.items():
    _n = _cifar_layers(_depth, _bc)
    register_model(
        _name,
        DenseNet,
        f"DenseNet{'-BC' if _bc else ''} L={_depth} k={_k} for 32x32 images",
        block_config=(_n, _n, _n),
        growth_rate=_k,
        num_init_features=2 * _k if _bc else 16,
        bottleneck_width=4 if _bc else None,
        compression=0.5 if _bc else 1.0,
        num_classes=10,
        stem="cifar",
    )

# ImageNet DenseNet-BC, the same shapes as torchvision.models.densenet*.
_IMAGENET: dict[str, tuple[tuple[int, ...], int, int]] = {
    "densenet121": ((6, 12, 24, 16), 32, 64),
    "densenet161": ((6, 12, 36, 24), 48, 96),
    "densenet169": ((6, 12, 32, 32), 32, 64),
    "densenet201": ((6, 12, 48, 32), 32, 64),
}
for _name, (_blocks, _k, _init) in _IMAGENET.items():
    register_model(
        _name,
        DenseNet,
        f"DenseNet-BC-{_name[8:]} (k={_k}) for ImageNet-sized inputs",
        block_config=_blocks,
        growth_rate=_k,
        num_init_features=_init,
        bottleneck_width=4,
        compression=0.5,
        num_classes=1000,
        stem="imagenet",
    )
