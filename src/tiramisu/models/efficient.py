"""Memory-efficient dense blocks (after Pleiss et al., 2017), as a custom autograd function.

The naive block stores, for every layer, its own copy of the concatenated input and of the
BatchNorm output, so memory grows with the square of the block depth. Here the whole block
writes into one pre-allocated buffer ``[input | new maps of layer 1 | layer 2 | ...]``; layer i
reads the first ``c_i`` channels of it as a view (no concatenation copy), and autograd keeps only
that buffer, the dropout masks and the parameters. In backward each layer's cheap part
(BN -> ReLU [-> 1x1 conv -> BN -> ReLU]) is recomputed from the buffer, and the expensive 3x3
convolution is differentiated directly with ``aten.convolution_backward`` -- it is never run
forward a second time, unlike ``torch.utils.checkpoint`` around the layer.

Written by hand because no library offers shared-buffer dense blocks; the results equal the
naive path's (same RNG use for dropout), which the tests check.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _bn(x: Tensor, bn: nn.BatchNorm2d, update_stats: bool) -> Tensor:
    """BatchNorm as the module would compute it; running stats change only if ``update_stats``."""
    if bn.training:
        if update_stats and bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            return F.batch_norm(
                x, bn.running_mean, bn.running_var, bn.weight, bn.bias, True, factor, bn.eps
            )
        return F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def pre_conv(layer: nn.Module, x: Tensor, update_stats: bool) -> Tensor:
    """The part of a dense layer before its 3x3 conv, written functionally."""
    x = F.relu(_bn(x, layer.norm1, update_stats))
    if layer.conv1 is not None:
        x = F.conv2d(x, layer.conv1.weight, layer.conv1.bias)
        x = F.relu(_bn(x, layer.norm2, update_stats))
    return x


def _layer_params(layer: nn.Module) -> list[Tensor]:
    mods = [layer.norm1, layer.conv1, layer.norm2]
    params = [p for m in mods if m is not None for p in (m.weight, m.bias) if p is not None]
    return params


def block_buffer_forward(
    block: nn.Module, x: Tensor, masks: list[Tensor] | None, update_stats: bool
) -> Tensor:
    """Run every layer into one buffer; returns the full buffer ``[x, new maps]``."""
    layers = block.layers
    k = block.growth_rate
    c_in = x.shape[1]
    dtype = (
        torch.get_autocast_dtype(x.device.type)
        if torch.is_autocast_enabled(x.device.type)
        else x.dtype
    )
    buf = torch.empty(
        x.shape[0],
        c_in + len(layers) * k,
        *x.shape[2:],
        dtype=dtype,
        device=x.device,
        memory_format=_memory_format(x),
    )
    buf[:, :c_in].copy_(x)
    c = c_in
    for layer in layers:
        a = pre_conv(layer, _dense_view(buf, c), update_stats)
        z = F.conv2d(a, layer.conv2.weight, layer.conv2.bias, padding=1)
        if layer.dropout > 0 and layer.training:
            # Same RNG calls as F.dropout, so seeded runs match the naive path exactly.
            noise = torch.empty_like(z).bernoulli_(1 - layer.dropout)
            if masks is not None:
                masks.append(noise.bool())
            z = z * noise.div_(1 - layer.dropout)
        buf[:, c : c + k].copy_(z)
        c += k
    return buf


def _dense_view(buf: Tensor, c: int) -> Tensor:
    """The first ``c`` channels of the block buffer, in a layout the fast kernels accept.

    In NCHW a channel slice is a plain view. In channels_last it is strided in the innermost
    dimension, which sends BatchNorm and oneDNN convolutions to slow generic kernels, so it is
    copied into a temporary dense tensor; the copy is freed after the layer, keeping memory linear.
    """
    view = buf[:, :c]
    if buf.is_contiguous(memory_format=torch.channels_last) and c < buf.shape[1]:
        return view.contiguous(memory_format=torch.channels_last)
    return view


def _memory_format(x: Tensor) -> torch.memory_format:
    if (
        x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    ):
        return torch.channels_last
    return torch.contiguous_format


class _EfficientDenseBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, block: nn.Module, *params: Tensor) -> Tensor:
        device_type = x.device.type
        ctx.autocast = (
            torch.is_autocast_enabled(device_type),
            torch.get_autocast_dtype(device_type),
        )
        masks: list[Tensor] = []
        buf = block_buffer_forward(block, x, masks, update_stats=True)
        ctx.block = block
        ctx.x_dtype = x.dtype
        ctx.c_in = x.shape[1]
        ctx.save_for_backward(buf, *masks)
        return buf

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        buf, *masks = ctx.saved_tensors
        block = ctx.block
        layers = block.layers
        k = block.growth_rate
        grad_buf = grad_out.to(buf.dtype).clone()
        param_grads: list[Tensor | None] = []
        mask_iter = iter(reversed(masks))
        enabled, dtype = ctx.autocast
        with torch.autocast(buf.device.type, dtype=dtype, enabled=enabled):
            for i in reversed(range(len(layers))):
                layer = layers[i]
                c = ctx.c_in + i * k
                g = grad_buf[:, c : c + k]
                if layer.dropout > 0 and layer.training:
                    g = g * next(mask_iter).to(g.dtype) / (1 - layer.dropout)
                with torch.enable_grad():
                    inp = _dense_view(buf, c).detach().requires_grad_(True)
                    a = pre_conv(layer, inp, update_stats=False)
                w = layer.conv2.weight
                grad_a, grad_w, grad_b = torch.ops.aten.convolution_backward(
                    g.to(a.dtype),
                    a.detach(),
                    w.to(a.dtype),
                    [k] if layer.conv2.bias is not None else None,
                    [1, 1],
                    [1, 1],
                    [1, 1],
                    False,
                    [0, 0],
                    1,
                    [True, True, layer.conv2.bias is not None],
                )
                pre_params = _layer_params(layer)
                grads = torch.autograd.grad(a, [inp, *pre_params], grad_a)
                grad_buf[:, :c] += grads[0].to(grad_buf.dtype)
                own = [*grads[1:], grad_w.to(w.dtype)]
                if layer.conv2.bias is not None:
                    own.append(grad_b.to(layer.conv2.bias.dtype))
                param_grads = own + param_grads
        grad_x = grad_buf[:, : ctx.c_in].to(ctx.x_dtype)
        return (grad_x, None, *param_grads)


def block_params(block: nn.Module) -> list[Tensor]:
    out: list[Tensor] = []
    for layer in block.layers:
        out += _layer_params(layer)
        out.append(layer.conv2.weight)
        if layer.conv2.bias is not None:
            out.append(layer.conv2.bias)
    return out


def efficient_block_forward(block: nn.Module, x: Tensor) -> Tensor:
    """The block's full output ``[x, new maps]``, memory-efficiently."""
    params = block_params(block)
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        return _EfficientDenseBlock.apply(x, block, *params)
    with torch.no_grad():
        return block_buffer_forward(block, x, None, update_stats=True)
