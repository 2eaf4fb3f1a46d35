"""DenseNet classifiers (Huang et al., 2017): plain, -B, -C and -BC, CIFAR and ImageNet stems."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from torch import Tensor, nn

from .common import records_config
from .layers import DenseBlock
from .norm import BatchNorm2d
from .ops import Dropout

Stem = Literal["cifar", "imagenet"]


class Transition(nn.Sequential):
    """Classification transition: BN -> ReLU -> 1x1 conv (may compress) -> 2x2 avg-pool."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        layers: list[nn.Module] = [
            BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
        ]
        if dropout > 0:
            layers.append(Dropout(dropout))
        layers.append(nn.AvgPool2d(2))
        super().__init__(*layers)
        self.out_channels = out_channels


class DenseNet(nn.Module):
    """A DenseNet classifier built from the same dense blocks as FC-DenseNet.

    ``bottleneck_width`` (the "B": a 1x1 conv to ``bottleneck_width * growth_rate`` maps before
    each 3x3 conv) and ``compression`` (the "C": transitions keep ``floor(compression * m)`` maps)
    select the variant. ``stem="cifar"`` is a single 3x3 conv; ``stem="imagenet"`` is the 7x7
    stride-2 conv + max-pool of torchvision's ImageNet models.
    """

    @records_config
    def __init__(
        self,
        block_config: Sequence[int] = (12, 12, 12),
        growth_rate: int = 12,
        num_init_features: int | None = None,
        bottleneck_width: int | None = None,
        compression: float = 1.0,
        dropout: float = 0.0,
        num_classes: int = 10,
        in_channels: int = 3,
        stem: Stem = "cifar",
        memory_efficient: bool = False,
    ) -> None:
        super().__init__()
        if not 0 < compression <= 1:
            raise ValueError(f"compression must be in (0, 1], got {compression}")
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        if num_init_features is None:
            # The papers' convention: 16 maps, or 2k for the -BC variants.
            num_init_features = 2 * growth_rate if bottleneck_width and compression < 1 else 16
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.num_init_features = num_init_features

        stem_layers: list[nn.Module]
        if stem == "cifar":
            stem_layers = [nn.Conv2d(in_channels, num_init_features, 3, padding=1, bias=False)]
        else:
            stem_layers = [
                nn.Conv2d(in_channels, num_init_features, 7, stride=2, padding=3, bias=False),
                BatchNorm2d(num_init_features),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1),
            ]
        self.stem = nn.Sequential(*stem_layers)

        channels = num_init_features
        self.blocks = nn.ModuleList()
        self.transitions = nn.ModuleList()
        for i, n in enumerate(block_config):
            block = DenseBlock(
                n,
                channels,
                growth_rate,
                keep_input=True,
                bottleneck_width=bottleneck_width,
                dropout=dropout,
                conv_bias=False,
                memory_efficient=memory_efficient,
            )
            self.blocks.append(block)
            channels = block.out_channels
            if i < len(block_config) - 1:
                out = math.floor(compression * channels)
                self.transitions.append(Transition(channels, out, dropout))
                channels = out
        self.head = nn.Sequential(
            BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(1),
        )
        self.classifier = nn.Linear(channels, num_classes)
        self.num_features = channels

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def stages(self) -> list[tuple[str, str, int]]:
        """(module name, description, feature maps) per stage, in forward order."""
        kind = "3x3 conv" if self.config["stem"] == "cifar" else "7x7 conv stride 2, 3x3 max-pool"
        rows = [("stem", kind, self.num_init_features)]
        for i, block in enumerate(self.blocks):
            rows.append(
                (f"blocks.{i}", f"dense block, {len(block.layers)} layers", block.stack_channels)
            )
            if i < len(self.transitions):
                rows.append(
                    (
                        f"transitions.{i}",
                        "transition: 1x1 conv, 2x2 avg-pool",
                        self.transitions[i].out_channels,
                    )
                )
        rows.append(("head", "BN, ReLU, global average pool", self.num_features))
        rows.append(("classifier", "linear", self.num_classes))
        return rows

    def skip_connections(self) -> list[tuple[str, str]]:
        return []

    def check_input(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input of shape (N, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        x = self.stem(x)
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i < len(self.transitions):
                x = self.transitions[i](x)
        return self.classifier(self.head(x))
