"""Sliding-window inference: the tile grid, blending weights and streamed label bands.

Tile origins sit on multiples of ``align`` (2 ** number of poolings) so that every tile's pooling
grid coincides with the whole image's, and are spread evenly, so that every overlap is between
``overlap`` and ``overlap + align`` pixels on large images; the last row/column of tiles extends
to the border (a tile can be up to ``align - 1`` pixels larger than ``tile``). Overlaps are
blended with linear ramps (``_ramp``).

``tiled_proba`` keeps K x H x W sums (what ``--probs`` needs). ``tiled_label_bands`` gives the
same argmax while keeping only one tile's sums, the strip of rows that the next row of tiles
still overlaps, and one band of finished labels: its memory does not grow with the image's
height, and grows with its width only by that strip (K x (overlap .. overlap + align) x W floats).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

TileProbs = Callable[[int, int, int, int], Tensor]


def _ramp(length: int, overlap: int, at_start: bool, at_end: bool) -> Tensor:
    """1-D blending weights: 0 -> 1 over ``overlap`` pixels at interior edges, 1 elsewhere.

    The outer quarter of the ramp is 0: predictions there lack context beyond the tile, and
    the neighbouring tile (which overlaps by at least ``overlap``) covers those pixels well
    inside itself.
    """
    w = torch.ones(length)
    n = min(overlap, length // 2)
    if n > 0:
        t = (torch.arange(n, dtype=torch.float32) + 0.5) / n
        ramp = ((t - 0.25) / 0.75).clamp(min=0)
        if not at_start:
            w[:n] = ramp
        if not at_end:
            w[length - n :] = ramp.flip(0)
    return w


def _starts(size: int, tile: int, stride: int, align: int) -> list[int]:
    """Tile origins along one axis: as few tiles as ``stride`` allows, spread evenly.

    Even spacing keeps every overlap near the requested one; appending a last tile flush with
    the border would leave one overlap of up to ``tile - align`` pixels, which costs compute
    and, in ``tiled_label_bands``, a carried strip that many rows high.
    """
    if size <= tile:
        return [0]
    n = -(-(size - tile) // stride) + 1  # tiles needed at this stride
    last = ((size - tile) // align) * align  # the last tile runs to the border from here
    steps = last // align
    # Gaps of floor or ceil(steps / (n - 1)) aligned steps: never more than the stride.
    return list(dict.fromkeys(align * ((k * steps) // (n - 1)) for k in range(n)))


def tile_grid(h: int, w: int, tile: int, overlap: int, align: int) -> tuple[list[int], list[int]]:
    """Tile origins (rows, columns) shared by ``tiled_proba`` and ``tiled_label_bands``."""
    if tile < align:
        raise ValueError(f"tile size {tile} is smaller than the model's minimum {align}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got {overlap} for tile {tile}")
    stride = max(align, ((tile - overlap) // align) * align)
    return _starts(h, tile, stride, align), _starts(w, tile, stride, align)


def _spans(starts: list[int], size: int, tile: int) -> Iterator[tuple[int, int, bool]]:
    """(start, end, is_last) of each tile along one axis."""
    for k, s in enumerate(starts):
        last = k == len(starts) - 1
        yield s, size if last else min(size, s + tile), last


def tiled_proba(
    probs_fn: Callable[[Tensor], Tensor], x: Tensor, tile: int, overlap: int, align: int = 32
) -> Tensor:
    """Sliding-window probabilities for one 1 x C x H x W image, blended in the overlaps.

    Only one tile's activations exist at a time; the accumulators are K x H x W floats.
    """
    _, _, h, w = x.shape
    ys, xs = tile_grid(h, w, tile, overlap, align)
    acc: Tensor | None = None
    weight = torch.zeros(1, 1, h, w)
    for y0, y1, _ in _spans(ys, h, tile):
        wy = _ramp(y1 - y0, overlap, y0 == 0, y1 == h)
        for x0, x1, _ in _spans(xs, w, tile):
            wx = _ramp(x1 - x0, overlap, x0 == 0, x1 == w)
            p = probs_fn(x[..., y0:y1, x0:x1])
            if acc is None:
                acc = torch.zeros(1, p.shape[1], h, w)
            win = (wy[:, None] * wx[None, :])[None, None]
            acc[..., y0:y1, x0:x1] += p * win
            weight[..., y0:y1, x0:x1] += win
    assert acc is not None
    return acc / weight


def tiled_label_bands(
    tile_probs: TileProbs,
    h: int,
    w: int,
    tile: int,
    overlap: int,
    align: int = 32,
    dtype: Any = np.uint8,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(y0, labels)``: consecutive bands of the sliding-window class-index mask.

    ``tile_probs(y0, y1, x0, x1)`` returns the 1 x K x (y1 - y0) x (x1 - x0) probabilities of
    that window; it is called once per tile, row of tiles by row of tiles, left to right. The
    tiles and their blending are those of ``tiled_proba``, so the bands put together equal
    ``tiled_proba(...).argmax(1)``: the weights need no division, as each pixel's sum is
    scaled by a positive weight, which leaves its argmax unchanged.

    Once tile (i, j) is added, columns left of tile j + 1 receive nothing more from row i, and
    rows above row i + 1 receive nothing more at all; so those pixels are reduced to labels at
    once, and only the rows that row i + 1 overlaps are carried over as sums. Every pixel's
    contributions are added in the same order as ``tiled_proba`` adds them.
    """
    ys, xs = tile_grid(h, w, tile, overlap, align)
    # Buffers are allocated once and reused (tile after tile, row after row): allocating them
    # afresh each time lets the allocator keep ever more of the freed ones, so that peak memory
    # would creep up with the number of tiles.
    carry = torch.empty(0)  # sums left by the previous row of tiles, from its ``done`` on
    carry_rows = 0
    most_carried = max(
        (y1 - ys[i + 1] for i, (_, y1, _) in enumerate(_spans(ys, h, tile)) if i + 1 < len(ys)),
        default=0,
    )
    sums: list[Tensor] = []
    for i, (y0, y1, last_row) in enumerate(_spans(ys, h, tile)):
        done = h if last_row else ys[i + 1]  # rows [y0, done) are final after this row
        wy = _ramp(y1 - y0, overlap, y0 == 0, y1 == h)
        labels = np.empty((done - y0, w), dtype=dtype)
        pending: Tensor | None = None  # sums of columns [x0, previous tile's x1)
        for j, (x0, x1, last_col) in enumerate(_spans(xs, w, tile)):
            p = tile_probs(y0, y1, x0, x1)[0]
            k = p.shape[0]
            if not sums:
                side = tile + align  # the last tile of a row or column may exceed ``tile``
                # two accumulators (a tile's and its left neighbour's) and a product
                sums = [torch.empty(k, side, side) for _ in range(3)]
                carry = torch.empty(k, most_carried, w)
            local = sums[j % 2][:, : y1 - y0, : x1 - x0].zero_()
            seen = 0 if pending is None else pending.shape[2]
            if pending is not None:
                local[:, :, :seen] = pending
            if carry_rows:  # each column takes the carried sums once, as it enters
                local[:, :carry_rows, seen:] += carry[:, :carry_rows, x0 + seen : x1]
            wx = _ramp(x1 - x0, overlap, x0 == 0, x1 == w)
            weighted = sums[2][:, : y1 - y0, : x1 - x0]  # the same products as ``tiled_proba``
            local += torch.mul(p, wy[:, None] * wx[None, :], out=weighted)
            final = x1 - x0 if last_col else xs[j + 1] - x0  # columns [x0, x0 + final) are done
            labels[:, x0 : x0 + final] = local[:, : done - y0, :final].argmax(0).numpy()
            if not last_row:  # in place: these columns' carried sums were all read above
                carry[:, : y1 - done, x0 : x0 + final] = local[:, done - y0 :, :final]
            pending = local[:, :, final:]
        yield y0, labels
        carry_rows = 0 if last_row else y1 - done


def tiled_labels(
    tile_probs: TileProbs,
    h: int,
    w: int,
    tile: int,
    overlap: int,
    align: int = 32,
    dtype: Any = np.uint8,
) -> np.ndarray:
    """The whole H x W mask of ``tiled_label_bands``."""
    mask = np.empty((h, w), dtype=dtype)
    for y0, band in tiled_label_bands(tile_probs, h, w, tile, overlap, align, dtype):
        mask[y0 : y0 + band.shape[0]] = band
    return mask
