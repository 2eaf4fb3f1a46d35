"""Memory-efficient dense blocks (after Pleiss et al., 2017), as a custom autograd function.

The naive block stores, for every layer, its own copy of the concatenated input and of the
BatchNorm output, so memory grows with the square of the block depth. Here the whole block
writes into one pre-allocated buffer ``[input | new maps of layer 1 | layer 2 | ...]``; layer i
reads the first ``c_i`` channels of it as a view (no concatenation copy), and autograd keeps only
that buffer, the dropout masks and the parameters. In backward each layer's cheap part
(BN -> ReLU [-> 1x1 conv -> BN -> ReLU]) is recomputed from the buffer, and the expensive 3x3
convolution is differentiated directly with ``aten.convolution_backward`` -- it is never run
forward a second time, unlike ``torch.utils.checkpoint`` around the layer.

What else keeps FC-DenseNet103's training memory at ~0.27x the naive path's (BENCHMARKS.md):
BN-ReLU and its gradients are computed in channel chunks (``_CHUNK_ELEMENTS``), so no temporary
spans a whole wide block at full resolution; dropout masks drawn on the CPU are kept as their
seeds and redrawn; blocks whose output gradient nobody else can hold reuse it as their gradient
buffer; several inputs (upsampled maps + skip) are copied into the buffer without being
concatenated first; and FC-DenseNet's transition down keeps only its input (below).

Written by hand because no library offers shared-buffer dense blocks; the results equal the
naive path's (same RNG use for dropout), which the tests check.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ops import MaskToken, compute_dtype, draw_keep_mask, rebuild_keep_mask


def _bn_momentum(bn: nn.BatchNorm2d, update_stats: bool) -> float | None:
    """Count one batch as the module would; the running-stat factor, or None for no update."""
    if not (bn.training and update_stats and bn.track_running_stats):
        return None
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
    if bn.momentum is not None:
        return bn.momentum
    return 1.0 / float(bn.num_batches_tracked)


def _bn_args(
    bn: nn.BatchNorm2d, c0: int = 0, c1: int | None = None
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None, bool]:
    """Weight, bias, running mean and variance of BN channels ``c0:c1`` (views), and whether
    batch statistics normalise. BatchNorm is per channel, so a chunk of channels gives the same
    numbers as the whole tensor."""
    c1 = bn.num_features if c1 is None else c1
    rm, rv = _slice(bn.running_mean, c0, c1), _slice(bn.running_var, c0, c1)
    return _slice(bn.weight, c0, c1), _slice(bn.bias, c0, c1), rm, rv, bn.training or rm is None


def _bn(
    x: Tensor, bn: nn.BatchNorm2d, momentum: float | None, c0: int = 0, c1: int | None = None
) -> Tensor:
    """BatchNorm over channels ``c0:c1`` as the module computes it; running stats change iff
    ``momentum``."""
    w, b, rm, rv, batch_stats = _bn_args(bn, c0, c1)
    if batch_stats and momentum is None:
        return F.batch_norm(x, None, None, w, b, True, 0.0, bn.eps)
    return F.batch_norm(x, rm, rv, w, b, batch_stats, momentum or 0.0, bn.eps)


def _first_conv(layer: nn.Module, buf: Tensor, c: int, update_stats: bool) -> Tensor:
    """BN -> ReLU over the layer's ``c`` input maps and its first convolution (the 1x1
    bottleneck, else the 3x3), in channel chunks when the input is large.

    Chunking bounds the temporary BN-ReLU output to ``_CHUNK_ELEMENTS`` instead of the whole
    input (0.5 GB at the last FC-DenseNet103 layer at 360x480 in fp32); the partial
    convolutions are summed in fp32. One chunk is exactly the naive layer's arithmetic.
    """
    bn = layer.norm1
    conv = layer.conv1 if layer.conv1 is not None else layer.conv2
    padding = 0 if layer.conv1 is not None else 1
    momentum = _bn_momentum(bn, update_stats)
    chunks = _chunks(buf, c)
    if len(chunks) == 1:
        h = F.relu(_bn(_dense_view(buf, 0, c), bn, momentum), inplace=True)
        return F.conv2d(h, conv.weight, conv.bias, padding=padding)
    out: Tensor | None = None
    for c0, c1 in chunks:
        h = F.relu(_bn(_dense_view(buf, c0, c1), bn, momentum, c0, c1), inplace=True)
        bias = conv.bias if c0 == 0 else None
        part = F.conv2d(h, conv.weight[:, c0:c1], bias, padding=padding)
        del h
        out = part.float() if out is None else out.add_(part)
    assert out is not None
    return out.to(part.dtype)


def _dropout_(z: Tensor, p: float) -> MaskToken:
    """Dropout on ``z`` in place with the RNG calls and arithmetic of ``layers.dropout`` (so
    seeded runs match the naive path); returns what rebuilds the mask."""
    keep, token = draw_keep_mask(z, p)
    z.mul_(keep.to(z.dtype).div_(1 - p))
    return token


def _stash_masks(ctx: Any, tokens: list[MaskToken]) -> list[Tensor]:
    """Keep masks drawn on the CPU as their seeds on ``ctx``; return the tensor masks, which
    go to ``save_for_backward``."""
    ctx.tokens = [None if isinstance(t, Tensor) else t for t in tokens]
    return [t for t in tokens if isinstance(t, Tensor)]


def _masks(tokens: list[MaskToken | None], saved: list[Tensor]) -> Iterator[Tensor]:
    """The masks of ``tokens`` in order, redrawn from seeds or taken from ``saved``."""
    saved_iter = iter(saved)
    return (next(saved_iter) if t is None else rebuild_keep_mask(t) for t in tokens)


def _layer_params(layer: nn.Module) -> list[Tensor]:
    mods = [layer.norm1, layer.conv1, layer.norm2]
    params = [p for m in mods if m is not None for p in (m.weight, m.bias) if p is not None]
    return params


def block_buffer_forward(
    block: nn.Module,
    inputs: Sequence[Tensor],
    masks: list[MaskToken] | None,
    update_stats: bool,
) -> Tensor:
    """Run every layer into one buffer; returns the full buffer ``[inputs..., new maps]``.

    Several inputs (FC-DenseNet's upsampled maps and skip) are copied straight into the buffer,
    so their concatenation is never materialised.
    """
    layers = block.layers
    k = block.growth_rate
    x = inputs[0]
    c_in = sum(t.shape[1] for t in inputs)
    buf = torch.empty(
        x.shape[0],
        c_in + len(layers) * k,
        *x.shape[2:],
        dtype=compute_dtype(x),
        device=x.device,
        memory_format=_memory_format(x),
    )
    c = 0
    for t in inputs:
        buf[:, c : c + t.shape[1]].copy_(t)
        c += t.shape[1]
    for layer in layers:
        z = _first_conv(layer, buf, c, update_stats)
        if layer.conv1 is not None:
            z = F.relu(_bn(z, layer.norm2, _bn_momentum(layer.norm2, update_stats)), inplace=True)
            z = F.conv2d(z, layer.conv2.weight, layer.conv2.bias, padding=1)
        if layer.dropout > 0 and layer.training:
            token = _dropout_(z, layer.dropout)
            if masks is not None:
                masks.append(token)
        buf[:, c : c + k].copy_(z)
        c += k
    return buf


def _dense_view(buf: Tensor, c0: int, c1: int) -> Tensor:
    """Channels ``c0:c1`` of the block buffer, in a layout the fast kernels accept.

    In NCHW a channel slice is a plain view. In channels_last it is strided in the innermost
    dimension, which sends BatchNorm and oneDNN convolutions to slow generic kernels, so it is
    copied into a temporary dense tensor; the copy is freed after the layer, keeping memory linear.
    """
    view = buf[:, c0:c1]
    if buf.is_contiguous(memory_format=torch.channels_last) and c1 - c0 < buf.shape[1]:
        return view.contiguous(memory_format=torch.channels_last)
    return view


def _memory_format(x: Tensor) -> torch.memory_format:
    """channels_last when channels are x's innermost dimension, also for cropped views (the
    upsampled maps FC-DenseNet crops to its skip's size are neither layout's contiguous)."""
    if x.dim() == 4 and x.stride(1) < x.stride(3):
        return torch.channels_last
    return torch.contiguous_format


# Backward works on channel chunks of at most this many elements, so the recomputed
# BN-ReLU output and its gradients never span a whole wide, full-resolution block at once
# (240 maps at 360x480, batch 3, would be 0.5 GB per temporary in fp32).
_CHUNK_ELEMENTS = 1 << 25


def _chunks(x: Tensor, c: int) -> list[tuple[int, int]]:
    per_channel = max(1, x.numel() // max(1, x.shape[1]))
    step = max(1, _CHUNK_ELEMENTS // per_channel)
    return [(s, min(c, s + step)) for s in range(0, c, step)]


def _slice(t: Tensor | None, c0: int, c1: int) -> Tensor | None:
    return None if t is None else t[c0:c1]


def _bn_relu_recompute(
    bn: nn.BatchNorm2d, x: Tensor, c0: int = 0, c1: int | None = None
) -> tuple[Tensor, Tensor, Tensor, bool]:
    """ReLU(BN(x)) for BN channels ``c0:c1`` exactly as forward computed it, plus its
    statistics; the running statistics are not touched."""
    w, b, rm, rv, train = _bn_args(bn, c0, c1)
    if train:
        rm = rv = None
    out, mean, invstd = torch.ops.aten.native_batch_norm(x, w, b, rm, rv, train, 0.0, bn.eps)
    return out.relu_(), mean, invstd, train


def _bn_relu_backward(
    bn: nn.BatchNorm2d,
    grad: Tensor,
    h: Tensor,
    x: Tensor,
    stats: tuple[Tensor, Tensor, bool],
    c0: int = 0,
    c1: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradient through ReLU (in place on ``grad``, using the output ``h``) and then BN."""
    mean, invstd, train = stats
    w, _, rm, rv, _ = _bn_args(bn, c0, c1)
    if train:
        rm = rv = None
    # In place and vectorised (masked_fill_ with a bool mask was 15x slower in bf16).
    torch.ops.aten.threshold_backward.grad_input(grad, h, 0, grad_input=grad)
    return torch.ops.aten.native_batch_norm_backward(
        grad, x, w, rm, rv, mean, invstd, train, bn.eps, [True, True, True]
    )


def _conv_backward(
    grad: Tensor, inp: Tensor, weight: Tensor, bias: bool, padding: int
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Input, weight (and bias) gradients of a stride-1 convolution, without re-running it."""
    weight = weight.to(inp.dtype).contiguous(memory_format=_memory_format(inp))
    return torch.ops.aten.convolution_backward(
        grad.to(inp.dtype),
        inp,
        weight,
        [weight.shape[0]] if bias else None,
        [1, 1],
        [padding, padding],
        [1, 1],
        False,
        [0, 0],
        1,
        [True, True, bias],
    )


def _layer_backward(layer: nn.Module, buf: Tensor, c: int, g: Tensor, grad_buf: Tensor) -> list:
    """Add layer's input gradient into ``grad_buf[:, :c]``; return its parameter gradients.

    ``g`` is the gradient of the layer's output (after dropout). The order of the returned
    gradients is that of ``_layer_params`` followed by conv2's weight and bias.
    """
    dtype = buf.dtype
    conv2 = layer.conv2
    if layer.conv1 is not None:
        # DenseNet-B: recompute the narrow bottleneck, then go back through its BN-ReLU; the
        # wide part before the 1x1 conv is handled in chunks below like a plain layer.
        h1 = _bn_relu_recompute(layer.norm1, _dense_view(buf, 0, c))[0]
        w1, b1 = layer.conv1.weight, layer.conv1.bias
        t = F.conv2d(h1, w1.to(dtype), None if b1 is None else b1.to(dtype))
        del h1
        a, *stats2 = _bn_relu_recompute(layer.norm2, t)
        grad_a, gw2, gb2 = _conv_backward(g, a, conv2.weight, conv2.bias is not None, 1)
        grad_t, gn2w, gn2b = _bn_relu_backward(layer.norm2, grad_a, a, t, tuple(stats2))
        del a, t, grad_a
        first, grad_first, padding = layer.conv1, grad_t, 0
    else:
        first, grad_first, padding = conv2, g, 1

    norm1 = layer.norm1
    gn1w = torch.zeros_like(norm1.weight)
    gn1b = torch.zeros_like(norm1.bias)
    gwf = torch.zeros_like(first.weight)
    gbf = None
    for c0, c1 in _chunks(buf, c):
        x = _dense_view(buf, c0, c1)
        h, *stats = _bn_relu_recompute(norm1, x, c0, c1)
        want_bias = first.bias is not None and gbf is None
        grad_h, gw, gb = _conv_backward(grad_first, h, first.weight[:, c0:c1], want_bias, padding)
        gwf[:, c0:c1] = gw
        if want_bias:
            gbf = gb.to(first.bias.dtype)
        grad_x, gw_n, gb_n = _bn_relu_backward(norm1, grad_h, h, x, tuple(stats), c0, c1)
        del h, grad_h
        grad_buf[:, c0:c1] += grad_x
        gn1w[c0:c1] = gw_n
        gn1b[c0:c1] = gb_n
    grads = [gn1w, gn1b, gwf, *([gbf] if first.bias is not None else [])]
    if layer.conv1 is not None:
        grads += [gn2w, gn2b, gw2.to(conv2.weight.dtype)]
        if conv2.bias is not None:
            grads.append(gb2.to(conv2.bias.dtype))
    return grads


class _EfficientDenseBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, block: nn.Module, n_inputs: int, *tensors: Tensor) -> Tensor:
        inputs = tensors[:n_inputs]
        tokens: list[MaskToken] = []
        buf = block_buffer_forward(block, inputs, tokens, update_stats=True)
        ctx.block = block
        ctx.inputs = [(t.shape[1], t.dtype) for t in inputs]
        ctx.c_in = sum(c for c, _ in ctx.inputs)
        ctx.save_for_backward(buf, *_stash_masks(ctx, tokens))
        return buf

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        buf, *saved_masks = ctx.saved_tensors
        block = ctx.block
        layers = block.layers
        k = block.growth_rate
        fmt = _memory_format(buf)
        if (
            block.owns_output_grad
            and grad_out.dtype == buf.dtype
            and grad_out.shape == buf.shape
            and grad_out.is_contiguous(memory_format=fmt)
        ):
            grad_buf = grad_out
        else:
            grad_buf = grad_out.to(buf.dtype).clone(memory_format=fmt)
        param_grads: list[Tensor | None] = []
        mask_iter = _masks(ctx.tokens[::-1], saved_masks[::-1])
        for i in reversed(range(len(layers))):
            layer = layers[i]
            c = ctx.c_in + i * k
            g = grad_buf[:, c : c + k]
            if layer.dropout > 0 and layer.training:
                g = g * next(mask_iter).to(g.dtype) / (1 - layer.dropout)
            param_grads = _layer_backward(layer, buf, c, g, grad_buf) + param_grads
        # Copies, so the wide gradient buffer can be freed while these wait in autograd.
        grads_in, c = [], 0
        for channels, dtype in ctx.inputs:
            grads_in.append(grad_buf[:, c : c + channels].to(dtype, copy=True))
            c += channels
        return (None, None, *grads_in, *param_grads)


def block_params(block: nn.Module) -> list[Tensor]:
    out: list[Tensor] = []
    for layer in block.layers:
        out += _layer_params(layer)
        out.append(layer.conv2.weight)
        if layer.conv2.bias is not None:
            out.append(layer.conv2.bias)
    return out


def efficient_block_forward(block: nn.Module, inputs: Sequence[Tensor]) -> Tensor:
    """The block's full output ``[inputs..., new maps]``, memory-efficiently."""
    params = block_params(block)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (*inputs, *params)):
        return _EfficientDenseBlock.apply(block, len(inputs), *inputs, *params)
    with torch.no_grad():
        return block_buffer_forward(block, inputs, None, update_stats=True)


class _EfficientTransitionDown(torch.autograd.Function):
    """BN -> ReLU -> 1x1 conv -> dropout -> 2x2 max-pool, saving only its input and the mask.

    Autograd would keep four full-resolution tensors per transition (BN output, conv input,
    pool input, int64 pool indices) -- more than the dense block before it. The input is the
    block buffer, which is kept anyway; everything else is recomputed in backward (one extra
    1x1 convolution, a few percent of the step's arithmetic).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, td: nn.Module, *params: Tensor) -> Tensor:
        bn, conv, drop = td.norm, td.conv, td.drop
        h = F.relu(_bn(x, bn, _bn_momentum(bn, update_stats=True)), inplace=True)
        z = F.conv2d(h, conv.weight, conv.bias)
        del h
        tokens = [_dropout_(z, drop.p)] if drop.p > 0 and td.training else []
        ctx.td = td
        ctx.z_dtype = z.dtype
        ctx.save_for_backward(x, *_stash_masks(ctx, tokens))
        return F.max_pool2d(z, 2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        x, *saved_mask = ctx.saved_tensors
        td = ctx.td
        bn, conv, drop = td.norm, td.conv, td.drop
        zd = ctx.z_dtype
        h, *stats = _bn_relu_recompute(bn, x)
        hz = h.to(zd)
        z = F.conv2d(hz, conv.weight.to(zd), None if conv.bias is None else conv.bias.to(zd))
        # The dropout scale (mask / (1 - p)), or None without dropout.
        scale = next((m.to(zd).div_(1 - drop.p) for m in _masks(ctx.tokens, saved_mask)), None)
        if scale is not None:
            z.mul_(scale)
        _, indices = torch.ops.aten.max_pool2d_with_indices(z, [2, 2], [2, 2])
        grad_z = torch.ops.aten.max_pool2d_with_indices_backward(
            grad_y.to(zd), z, [2, 2], [2, 2], [0, 0], [1, 1], False, indices
        )
        del z, indices
        if scale is not None:
            grad_z.mul_(scale)
            del scale
        grad_hz, gw, gb = _conv_backward(grad_z, hz, conv.weight, conv.bias is not None, 0)
        del grad_z, hz
        grad_x, gbn_w, gbn_b = _bn_relu_backward(bn, grad_hz.to(h.dtype), h, x, tuple(stats))
        grads = [gbn_w, gbn_b, gw.to(conv.weight.dtype)]
        if conv.bias is not None:
            grads.append(gb.to(conv.bias.dtype))
        return (grad_x, None, *grads)


def efficient_transition_down(td: nn.Module, x: Tensor) -> Tensor:
    params = [p for m in (td.norm, td.conv) for p in (m.weight, m.bias) if p is not None]
    return _EfficientTransitionDown.apply(x, td, *params)
