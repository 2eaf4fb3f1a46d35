"""The dense layer and dense block shared by FC-DenseNet and the DenseNet classifiers.

A dense layer sees the concatenation of everything before it in its block and adds
``growth_rate`` new feature maps. The two model families differ only in details that are
parameters here: the 1x1 bottleneck (DenseNet-B), whether convolutions carry a bias
(FC-DenseNet's official code does, DenseNet's does not) and dropout.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .efficient import efficient_block_forward
from .norm import BatchNorm2d, per_image_norm
from .ops import dropout


class DenseLayer(nn.Module):
    """BN -> ReLU -> [1x1 conv (bottleneck) -> BN -> ReLU] -> 3x3 conv -> dropout.

    ``forward`` takes the list of feature maps produced so far in the block (the naive path).
    With ``memory_efficient`` the enclosing ``DenseBlock`` runs all its layers through one shared
    buffer instead (see ``efficient.py``); the parameters are the same either way.
    """

    def __init__(
        self,
        in_channels: int,
        growth_rate: int,
        *,
        bottleneck_width: int | None = None,
        dropout: float = 0.0,
        conv_bias: bool = False,
        memory_efficient: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.growth_rate = growth_rate
        self.dropout = dropout
        self.memory_efficient = memory_efficient
        self.norm1 = BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        if bottleneck_width is not None:
            inner = bottleneck_width * growth_rate
            self.conv1: nn.Conv2d | None = nn.Conv2d(in_channels, inner, 1, bias=conv_bias)
            self.norm2: BatchNorm2d | None = BatchNorm2d(inner)
            self.relu2: nn.ReLU | None = nn.ReLU(inplace=True)
        else:
            inner = in_channels
            self.conv1 = self.norm2 = self.relu2 = None
        self.conv2 = nn.Conv2d(inner, growth_rate, 3, padding=1, bias=conv_bias)

    def _pre_conv(self, *features: Tensor) -> Tensor:
        x = torch.cat(features, 1) if len(features) > 1 else features[0]
        x = self.relu1(self.norm1(x))
        if self.conv1 is not None:
            assert self.norm2 is not None and self.relu2 is not None
            x = self.relu2(self.norm2(self.conv1(x)))
        return x

    def _pre_dropout(self, *features: Tensor) -> Tensor:
        return self.conv2(self._pre_conv(*features))

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        x = self._pre_dropout(*features)
        if self.dropout > 0:
            x = dropout(x, self.dropout, self.training)
        return x


def per_image_norm_active(bn: nn.Module) -> bool:
    """True inside ``batch_statistics``: the norm uses each image's own statistics."""
    return bool(getattr(bn, "per_image", False)) or "forward" in bn.__dict__


def _has_patched_norms(block: nn.Module) -> bool:
    return per_image_norm_active(block.layers[0].norm1)


class DenseBlock(nn.Module):
    """``num_layers`` dense layers; output is ``[input, new maps]`` or only the new maps.

    FC-DenseNet's down path keeps the block input (``keep_input=True``); its bottleneck and up
    path pass only the ``num_layers * growth_rate`` new maps upward to avoid a feature explosion.
    """

    def __init__(
        self,
        num_layers: int,
        in_channels: int,
        growth_rate: int,
        *,
        keep_input: bool = True,
        bottleneck_width: int | None = None,
        dropout: float = 0.0,
        conv_bias: bool = False,
        memory_efficient: bool = False,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"a dense block needs at least one layer, got {num_layers}")
        self.in_channels = in_channels
        self.growth_rate = growth_rate
        self.keep_input = keep_input
        # The memory-efficient backward may turn the output's gradient into the block's
        # gradient buffer in place (saving a copy of the widest tensor) when nothing else can
        # hold that gradient: true when only the new maps leave the block, since slicing them
        # off makes autograd allocate a fresh gradient; FCDenseNet also sets it for its last
        # block, whose only consumer is the classifier's convolution.
        self.owns_output_grad = not keep_input
        self.layers = nn.ModuleList(
            DenseLayer(
                in_channels + i * growth_rate,
                growth_rate,
                bottleneck_width=bottleneck_width,
                dropout=dropout,
                conv_bias=conv_bias,
                memory_efficient=memory_efficient,
            )
            for i in range(num_layers)
        )

    @property
    def new_channels(self) -> int:
        return len(self.layers) * self.growth_rate

    @property
    def stack_channels(self) -> int:
        """Channels of the full stack (input plus every new map), the paper's "m"."""
        return self.in_channels + self.new_channels

    @property
    def out_channels(self) -> int:
        return self.stack_channels if self.keep_input else self.new_channels

    @property
    def memory_efficient(self) -> bool:
        return all(layer.memory_efficient for layer in self.layers)

    def forward(self, x: Tensor | Sequence[Tensor]) -> Tensor:
        """``x`` is the block input, or several maps that together form it (concatenated along
        channels), such as FC-DenseNet's upsampled maps and skip connection."""
        inputs = [x] if isinstance(x, Tensor) else list(x)
        n_in = len(inputs)
        if self.memory_efficient and not _has_patched_norms(self):
            out = efficient_block_forward(self, inputs)
            return out if self.keep_input else out[:, self.in_channels :]
        # The naive path: every layer concatenates everything before it (kept for comparison
        # and for the per-image BatchNorm mode, whose patched modules it calls directly).
        features = inputs
        for layer in self.layers:
            features.append(layer(features))
        return torch.cat(features if self.keep_input else features[n_in:], 1)


def set_memory_efficient(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch every dense layer (and FC-DenseNet transition) between the naive and the
    recomputing path."""
    for module in model.modules():
        if not isinstance(module, DenseBlock) and hasattr(module, "memory_efficient"):
            module.memory_efficient = enabled
    return model


def he_uniform_(model: nn.Module) -> None:
    """He-uniform (ReLU gain) weights and zero biases on every conv and transposed conv.

    For ``ConvTranspose2d`` PyTorch's fan-in is computed from dim 1 (the output channels) times
    the kernel area, which is also what the official Lasagne code's ``HeUniform`` used.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.kaiming_uniform_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


@contextmanager
def batch_statistics(model: nn.Module) -> Iterator[None]:
    """Normalise with each image's own statistics (the paper's test-time BatchNorm), for the
    duration of the block; see ``norm.BatchNorm2d``.

    Our models' norms switch with their ``per_image`` flag. A BatchNorm that is not ours (e.g.
    after ``convert_sync_batchnorm``) gets the same function as an instance ``forward``,
    removed again on exit.
    """
    switched, patched = [], []
    for m in model.modules():
        if isinstance(m, BatchNorm2d):
            if not m.per_image:
                m.per_image = True
                switched.append(m)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and "forward" not in m.__dict__:
            m.forward = functools.partial(per_image_norm, m)
            patched.append(m)
    try:
        yield
    finally:
        for m in switched:
            m.per_image = False
        for m in patched:
            del m.forward
