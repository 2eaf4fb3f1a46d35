"""FC-DenseNet (Jégou et al., 2017), after the official Lasagne code where the paper is vague."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import records_config
from .efficient import efficient_transition_down
from .layers import DenseBlock, he_uniform_, per_image_norm_active
from .norm import BatchNorm2d
from .ops import Dropout, compute_dtype

Upsampling = Literal["transposed", "bilinear"]


class TransitionDown(nn.Module):
    """BN -> ReLU -> 1x1 conv (same width, no compression) -> dropout -> 2x2 max-pool.

    With ``memory_efficient`` training keeps only the input (the dense block's buffer, kept
    anyway) and the dropout mask, and recomputes the rest in backward (``efficient.py``).
    """

    def __init__(self, channels: int, dropout: float = 0.2, memory_efficient: bool = False) -> None:
        super().__init__()
        self.norm = BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(channels, channels, 1, bias=True)
        self.drop = Dropout(dropout)
        self.pool = nn.MaxPool2d(2)
        self.out_channels = channels
        self.memory_efficient = memory_efficient
        self.register_load_state_dict_pre_hook(_positional_to_named)

    def forward(self, x: Tensor) -> Tensor:
        if (
            self.memory_efficient
            and torch.is_grad_enabled()
            and not per_image_norm_active(self.norm)
            and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        ):
            return efficient_transition_down(self, x)
        return self.pool(self.drop(self.conv(self.relu(self.norm(x)))))


# Checkpoints written before the transition's children had names used nn.Sequential's indices.
_POSITIONAL = re.compile(r"^(.*trans_down\.\d+\.)([02])\.")
_NAMES = {"0": "norm", "2": "conv"}


def upgrade_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A state dict with FC-DenseNet's older positional transition keys renamed."""
    return {_POSITIONAL.sub(lambda m: f"{m[1]}{_NAMES[m[2]]}.", k): v for k, v in state.items()}


def _positional_to_named(module: nn.Module, state: dict, prefix: str, *_: object) -> None:
    for name, new in _NAMES.items():
        for key in [k for k in state if k.startswith(f"{prefix}{name}.")]:
            state[f"{prefix}{new}.{key[len(prefix) + 2 :]}"] = state.pop(key)


def center_crop(x: Tensor, size: Sequence[int]) -> Tensor:
    h, w = x.shape[-2:]
    th, tw = size
    top, left = (h - th) // 2, (w - tw) // 2
    return x[..., top : top + th, left : left + tw]


# Which of a 3x3 stride-2 transposed conv's taps reach output row 2m + a from input rows m - 1
# (first column) and m (second); 3 indexes the zero padding appended to the kernel.
_SUBPIXEL_TAPS = ((2, 0), (3, 1))


def subpixel_transposed_conv(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.conv_transpose2d(x, weight, bias, stride=2)`` for a 3x3 kernel, as one ordinary conv.

    Output pixel (2m + a, 2n + b) only sees input pixels m-1..m, n-1..n, so the four output
    phases are four 2x2 convolutions of the zero-padded input; they run as one conv with
    4x the output channels, which ``pixel_shuffle`` interleaves. Written by hand because
    PyTorch's CPU transposed convolution has no fast bf16 kernel: on the development CPU this
    is 2.1x faster (forward + backward, bf16, channels_last) and exact up to summation order.
    """
    c_out = weight.shape[1]
    taps = torch.tensor(_SUBPIXEL_TAPS, device=weight.device)
    padded = F.pad(weight.transpose(0, 1), (0, 1, 0, 1))  # (c_out, c_in, 4, 4)
    kernel = padded[:, :, taps[:, None, :, None], taps[None, :, None, :]]
    kernel = kernel.permute(0, 2, 3, 1, 4, 5).reshape(c_out * 4, weight.shape[0], 2, 2)
    bias = None if bias is None else bias.repeat_interleave(4)
    z = F.conv2d(F.pad(x, (1, 1, 1, 1)), kernel, bias)
    return F.pixel_shuffle(z, 2)[..., : 2 * x.shape[-2] + 1, : 2 * x.shape[-1] + 1]


class TransitionUp(nn.Module):
    """Upsample the previous block's new maps by 2, match the skip's size, concatenate.

    ``transposed`` is the paper's 3x3 stride-2 transposed conv without padding: it gives
    2n+1 pixels, which the centre crop trims to the skip's size (this is what lets any input
    size >= 2**depth work without padding). ``bilinear`` resizes straight to the skip's size and
    then applies a 3x3 conv with the same parameter count, avoiding checkerboard artefacts.
    """

    def __init__(self, channels: int, mode: Upsampling = "transposed") -> None:
        super().__init__()
        if mode not in ("transposed", "bilinear"):
            raise ValueError(f"upsampling must be 'transposed' or 'bilinear', got {mode!r}")
        self.mode = mode
        self.channels = channels
        if mode == "transposed":
            self.conv: nn.Module = nn.ConvTranspose2d(channels, channels, 3, stride=2, bias=True)
        else:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=True)

    def upsample(self, x: Tensor, size: Sequence[int]) -> Tensor:
        """The new maps, upsampled to ``size`` (the skip's height and width)."""
        if self.mode == "transposed":
            if x.device.type == "cpu" and compute_dtype(x) == torch.bfloat16:
                y = subpixel_transposed_conv(x, self.conv.weight, self.conv.bias)
            else:
                y = self.conv(x)
            return center_crop(y, size)
        return self.conv(F.interpolate(x, size=size, mode="bilinear", align_corners=False))

    def forward(self, x: Tensor, skip: Tensor, concat: bool = True) -> Tensor | list[Tensor]:
        """``[upsampled, skip]`` concatenated, or as a list with ``concat=False`` (what
        FCDenseNet passes on: its next dense block takes the pieces without the copy)."""
        parts = [self.upsample(x, skip.shape[-2:]), skip]
        return torch.cat(parts, 1) if concat else parts


class FCDenseNet(nn.Module):
    """Fully convolutional DenseNet for semantic segmentation.

    Channel bookkeeping (FC-DenseNet103, k=16): 48 after the first conv; each down block adds
    n*k and keeps its input (112, 192, 304, 464, 656); the bottleneck's 15*16=240 new maps are
    upsampled and concatenated with the skips; the last up block's full stack (256 maps) feeds the
    1x1 classifier.
    """

    @records_config
    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 11,
        growth_rate: int = 16,
        down_blocks: Sequence[int] = (4, 5, 7, 10, 12),
        bottleneck_layers: int = 15,
        up_blocks: Sequence[int] | None = None,
        first_conv_channels: int = 48,
        dropout: float = 0.2,
        upsampling: Upsampling = "transposed",
        memory_efficient: bool = False,
    ) -> None:
        super().__init__()
        down_blocks = tuple(int(n) for n in down_blocks)
        up_blocks = tuple(
            int(n) for n in (up_blocks if up_blocks is not None else down_blocks[::-1])
        )
        if len(up_blocks) != len(down_blocks):
            raise ValueError(
                f"up_blocks must have as many entries as down_blocks ({len(down_blocks)}), "
                f"got {len(up_blocks)}"
            )
        if not down_blocks:
            raise ValueError("down_blocks must name at least one block")
        self.in_channels = in_channels
        self.num_classes = num_classes
        block_kwargs = {"dropout": dropout, "conv_bias": True, "memory_efficient": memory_efficient}

        self.first_conv = nn.Conv2d(in_channels, first_conv_channels, 3, padding=1, bias=True)
        channels = first_conv_channels
        skip_channels = []
        self.down_blocks = nn.ModuleList()
        self.trans_down = nn.ModuleList()
        for n in down_blocks:
            block = DenseBlock(n, channels, growth_rate, keep_input=True, **block_kwargs)
            channels = block.out_channels
            skip_channels.append(channels)
            self.down_blocks.append(block)
            self.trans_down.append(TransitionDown(channels, dropout, memory_efficient))

        self.bottleneck = DenseBlock(
            bottleneck_layers, channels, growth_rate, keep_input=False, **block_kwargs
        )
        upsample_channels = self.bottleneck.new_channels

        self.trans_up = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for i, (n, skip) in enumerate(zip(up_blocks, reversed(skip_channels), strict=True)):
            self.trans_up.append(TransitionUp(upsample_channels, upsampling))
            last = i == len(up_blocks) - 1
            block = DenseBlock(
                n, upsample_channels + skip, growth_rate, keep_input=last, **block_kwargs
            )
            self.up_blocks.append(block)
            upsample_channels = block.new_channels
        self.classifier = nn.Conv2d(self.up_blocks[-1].out_channels, num_classes, 1, bias=True)
        self.up_blocks[-1].owns_output_grad = True  # only the classifier reads its output
        he_uniform_(self)

    def stages(self) -> list[tuple[str, str, int]]:
        """(module name, description, feature maps) per stage, in forward order."""
        rows = [("first_conv", "3x3 conv", self.first_conv.out_channels)]
        for i, (block, down) in enumerate(zip(self.down_blocks, self.trans_down, strict=True)):
            rows.append(
                (
                    f"down_blocks.{i}",
                    f"dense block, {len(block.layers)} layers",
                    block.stack_channels,
                )
            )
            rows.append(
                (f"trans_down.{i}", "transition down: 1x1 conv, 2x2 max-pool", down.out_channels)
            )
        rows.append(
            (
                "bottleneck",
                f"dense block, {len(self.bottleneck.layers)} layers (bottleneck)",
                self.bottleneck.stack_channels,
            )
        )
        upsampler = (
            "3x3 transposed conv, stride 2"
            if self.config["upsampling"] == "transposed"
            else "bilinear x2 + 3x3 conv"
        )
        for i, (_up, block) in enumerate(zip(self.trans_up, self.up_blocks, strict=True)):
            rows.append(
                (
                    f"trans_up.{i}",
                    f"transition up: {upsampler}, crop, concat skip",
                    block.in_channels,
                )
            )
            rows.append(
                (f"up_blocks.{i}", f"dense block, {len(block.layers)} layers", block.stack_channels)
            )
        rows.append(("classifier", "1x1 conv", self.num_classes))
        return rows

    def skip_connections(self) -> list[tuple[str, str]]:
        """(source stage, destination stage) for every skip connection."""
        n = len(self.down_blocks)
        return [(f"down_blocks.{i}", f"trans_up.{n - 1 - i}") for i in range(n)]

    @property
    def min_size(self) -> int:
        """Smallest height/width that survives every 2x2 pooling with at least one pixel."""
        return 2 ** len(self.down_blocks)

    def check_input(self, x: Tensor) -> None:
        shape = tuple(x.shape)
        if x.dim() != 4:
            raise ValueError(f"expected a 4-D input (N, C, H, W), got shape {shape}")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected {self.in_channels} input channels, got shape {shape} "
                f"({x.shape[1]} channels)"
            )
        if min(x.shape[-2:]) < self.min_size:
            raise ValueError(
                f"input height and width must be at least {self.min_size} for "
                f"{len(self.down_blocks)} poolings, got shape {shape}"
            )

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        x = self.first_conv(x)
        skips = []
        for block, down in zip(self.down_blocks, self.trans_down, strict=True):
            x = block(x)
            skips.append(x)
            x = down(x)
        x = self.bottleneck(x)
        for up, block, skip in zip(self.trans_up, self.up_blocks, reversed(skips), strict=True):
            # The block takes [upsampled, skip] unconcatenated: the memory-efficient path
            # copies both straight into its buffer, the naive one concatenates in its first layer.
            x = block(up(x, skip, concat=False))
        return self.classifier(x)
