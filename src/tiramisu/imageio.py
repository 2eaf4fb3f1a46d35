"""Reading image files: one place, one set of errors, one pixel limit; and streaming them.

Every image or mask the project reads goes through ``open_image``, so that any failure
(missing file, unknown format, truncated data, a decompression bomb) becomes a ``DataError``
whose message starts with the file's name, and no command dies with a traceback.

The pixel limit guards against decompression bombs (a few hundred KB of PNG that decode to
gigabytes). It defaults to Pillow's own hard limit (about 179 million pixels, e.g. 13,000 x
13,000), enough for tiled prediction on large scans; ``set_max_pixels`` (``--max-pixels``,
``data.max_pixels``) moves it either way.
"""

from __future__ import annotations

import contextlib
import struct
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import DataError

_PIL_LIMIT = 2 * (Image.MAX_IMAGE_PIXELS or 89_478_485)
_max_pixels = _PIL_LIMIT


def max_pixels() -> int:
    return _max_pixels


def set_max_pixels(limit: int | None) -> None:
    """Images with more pixels are refused; ``None`` restores the default."""
    global _max_pixels
    if limit is not None and limit <= 0:
        raise ValueError(f"the pixel limit must be positive, got {limit}")
    _max_pixels = _PIL_LIMIT if limit is None else int(limit)


@contextlib.contextmanager
def _own_limit_only() -> Iterator[None]:
    # Pillow refuses images above 2 * MAX_IMAGE_PIXELS inside Image.open, before the size is
    # known to us, and warns above MAX_IMAGE_PIXELS. Our check (with the size in the message
    # and a limit the user can move) replaces both for the duration of the call.
    saved = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def open_image(path: str | Path, kind: str = "image", header_only: bool = False) -> Image.Image:
    """Open and decode ``path``; every failure is a one-line ``DataError`` naming the file.

    ``header_only`` checks the file (size, limit, ``verify``) without decoding the pixels; the
    returned image is then closed and only its ``size`` and ``mode`` may be used."""
    limit = _max_pixels
    try:
        with _own_limit_only():
            im = Image.open(path)
            w, h = im.size
            if w * h > limit:
                im.close()
                raise DataError(
                    f"{path}: {w}x{h} = {w * h / 1e6:.0f} Mpixels is over the limit of "
                    f"{limit / 1e6:.0f} Mpixels (a decompression bomb?); raise it with "
                    f"--max-pixels / data.max_pixels if the image is genuine"
                )
            if header_only:
                im.verify()
                im.close()
            else:
                im.load()
            return im
    except DataError:
        raise
    except Image.DecompressionBombError:
        raise DataError(
            f"{path}: over the limit of {limit / 1e6:.0f} Mpixels (a decompression bomb?); "
            f"raise it with --max-pixels / data.max_pixels if the image is genuine"
        ) from None
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, MemoryError) as e:
        raise DataError(f"{path}: cannot read {kind} ({e})") from None


# ------------------------------------------------------------------------- streamed reading
# Modes whose pixels libvips decodes to the same numbers as Pillow, by the bands and sample
# format libvips reports (a palette image arrives expanded to its colours). Anything else is
# decoded whole by Pillow.
_VIPS_MODES: dict[str, dict[tuple[int, str], str]] = {
    "L": {(1, "uchar"): "L"},
    "LA": {(2, "uchar"): "LA"},
    "RGB": {(3, "uchar"): "RGB"},
    "RGBA": {(4, "uchar"): "RGBA"},
    "P": {(1, "uchar"): "L", (3, "uchar"): "RGB", (4, "uchar"): "RGBA"},
    "I;16": {(1, "ushort"): "I;16"},
    "I;16B": {(1, "ushort"): "I;16"},
    "I;16L": {(1, "ushort"): "I;16"},
}
_VIPS_FORMATS = {"PNG", "JPEG", "TIFF"}
# Rows per libvips request. Small requests keep its buffers small; every request starts on a
# multiple of it, because a sequential reader refuses a request that starts inside the block of
# lines (e.g. 16 for PNG) that an earlier one ended in.
_READ_ROWS = 128


class ImageRows:
    """An image file read from the top down, one window of rows at a time.

    ``window(y0, y1, x0, x1)`` returns that part of the image as a PIL image in the mode that
    Pillow would have decoded the whole file to, so any conversion applied to it matches the
    whole-image path pixel for pixel. Windows must come in non-decreasing ``y0`` order (rows
    above the latest ``y0`` are released).

    With libvips installed (``pip install tiramisu[large]``: pyvips and its binary wheel),
    PNG, JPEG and TIFF files are decoded sequentially, so only the current band of rows is
    ever in memory, whatever the image's height. Without it, or for other formats, Pillow
    decodes the whole picture first; the windows are then crops of it.
    """

    def __init__(self, path: str | Path, header: Image.Image | None = None) -> None:
        """``header``: what ``open_image(path, header_only=True)`` returned, if the caller has
        it already (checking a large PNG reads the whole file)."""
        self.path = Path(path)
        if header is None:
            header = open_image(path, header_only=True)  # checks the pixel limit first
        self.size: tuple[int, int] = header.size
        self._vips: Any = None
        self._pil: Image.Image | None = None
        # Decoded rows [_top, _top + _have) sit at the start of _rows, a buffer allocated once
        # (grown only for a taller window) and shifted in place as rows are released.
        self._top = self._have = 0
        self._next = 0  # the next row libvips decodes (beyond _top + _have after a jump)
        self._rows: np.ndarray | None = None
        self.mode = _open_vips(self, header.format, header.mode)
        if self._vips is None:
            self._pil = open_image(path)
            self.mode = self._pil.mode

    @property
    def streamed(self) -> bool:
        """True when rows are decoded as needed rather than the whole image at once."""
        return self._vips is not None

    def window(self, y0: int, y1: int, x0: int = 0, x1: int | None = None) -> Image.Image:
        x1 = self.size[0] if x1 is None else x1
        if not (0 <= y0 < y1 <= self.size[1] and 0 <= x0 < x1 <= self.size[0]):
            raise ValueError(f"window {(y0, y1, x0, x1)} is outside the {self.size} image")
        if self._pil is not None:
            return self._pil.crop((x0, y0, x1, y1))
        rows = self._band(y0, y1)[:, x0:x1]
        # A copy: the buffer is reused, and Pillow may share an array's memory.
        return Image.fromarray(rows.copy())  # uint8 L/LA/RGB/RGBA or I;16

    def _band(self, y0: int, y1: int) -> np.ndarray:
        if y0 < self._top:
            raise ValueError(f"rows from {y0} were already released (now at {self._top})")
        self._release(y0)
        width, height = self.size
        import pyvips

        try:
            while self._next < y1:
                start = self._next
                n = min(_READ_ROWS, height - start)  # whole steps: see _READ_ROWS
                chunk = self._vips.crop(0, start, width, n).numpy().reshape(n, width, -1)
                self._next += n
                skip = max(0, self._top - start)  # rows above y0 (a window that jumped ahead)
                if skip < n:
                    self._store(chunk[skip:], y1 - y0 + _READ_ROWS)
        except pyvips.Error as e:  # a truncated or corrupt file, found mid-way
            lines = [line for line in str(e).splitlines() if line.strip()]
            reason = lines[-1].strip() if lines else "decoding failed"
            raise DataError(f"{self.path}: cannot read image ({reason})") from None
        assert self._rows is not None
        rows = self._rows[: y1 - y0]
        return rows[..., 0] if rows.shape[2] == 1 else rows

    def _release(self, y0: int) -> None:
        """Forget rows above ``y0``, moving the kept ones to the buffer's start."""
        drop = min(y0 - self._top, self._have)
        keep = self._have - drop
        if self._rows is not None and drop and keep:
            # In steps of ``drop`` rows, so that source and destination never overlap
            # (numpy would copy an overlapping source to a temporary first).
            for a in range(0, keep, drop):
                b = min(a + drop, keep)
                self._rows[a:b] = self._rows[a + drop : b + drop]
        self._top, self._have = y0, keep

    def _store(self, chunk: np.ndarray, capacity: int) -> None:
        """Append decoded rows after the kept ones."""
        end = self._have + len(chunk)
        if self._rows is None or len(self._rows) < end:
            grown = np.empty((max(capacity, end), *chunk.shape[1:]), dtype=chunk.dtype)
            if self._rows is not None:
                grown[: self._have] = self._rows[: self._have]
            self._rows = grown
        self._rows[self._have : end] = chunk
        self._have = end

    def close(self) -> None:
        if self._pil is not None:
            self._pil.close()
        self._vips = self._pil = self._rows = None

    def __enter__(self) -> ImageRows:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_vips(rows: ImageRows, fmt: str | None, mode: str) -> str:
    """Open ``rows.path`` with libvips where it decodes like Pillow; returns the PIL mode."""
    if fmt not in _VIPS_FORMATS or mode not in _VIPS_MODES:
        return mode
    try:
        import pyvips
    except (ImportError, OSError):  # not installed, or its shared library is missing
        return mode
    try:
        image = pyvips.Image.new_from_file(str(rows.path), access="sequential")
    except pyvips.Error:
        return mode  # Pillow read the header; let it decode (and report) the rest
    as_mode = _VIPS_MODES[mode].get((image.bands, image.format))
    if as_mode is None or (image.width, image.height) != rows.size:
        return mode
    rows._vips = image
    return as_mode


# ------------------------------------------------------------------------- streamed writing
class PngRowWriter:
    """Writes an 8-bit greyscale or RGB PNG whose rows arrive in bands, top to bottom.

    Pillow, torchvision and libvips encode a PNG only from a whole image (or a libvips
    pipeline), so a 12000 x 12000 mask would have to exist in memory first; the PNG format
    itself is simple to stream (zlib-compressed rows in IDAT chunks), which is what this does.
    Rows are stored with the "Sub" filter (each byte minus the one a pixel before), which
    turns flat regions into zeros for zlib.
    """

    _CHUNK = 1 << 20  # IDAT payload per chunk

    def __init__(self, f: BinaryIO, width: int, height: int, channels: int, level: int = 6):
        if channels not in (1, 3):
            raise ValueError(f"PngRowWriter writes 1 or 3 channels, not {channels}")
        self.f, self.width, self.height, self.channels = f, width, height, channels
        self.rows_written = 0
        self._zlib = zlib.compressobj(level)
        self._pending = bytearray()
        f.write(b"\x89PNG\r\n\x1a\n")
        colour_type = 0 if channels == 1 else 2
        self._chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0))

    def write(self, rows: np.ndarray) -> None:
        """``rows``: n x W (greyscale) or n x W x 3 (RGB) uint8."""
        n = rows.shape[0]
        expected = (n, self.width) if self.channels == 1 else (n, self.width, 3)
        if rows.shape != expected or rows.dtype != np.uint8:
            raise ValueError(f"expected {expected} uint8 rows, got {rows.shape} {rows.dtype}")
        if self.rows_written + n > self.height:
            raise ValueError(f"more than {self.height} rows written")
        flat = rows.reshape(n, -1)
        filtered = np.empty((n, flat.shape[1] + 1), dtype=np.uint8)
        filtered[:, 0] = 1  # filter type Sub
        filtered[:, 1 : 1 + self.channels] = flat[:, : self.channels]
        np.subtract(
            flat[:, self.channels :],
            flat[:, : -self.channels],
            out=filtered[:, 1 + self.channels :],
        )
        self._pending += self._zlib.compress(filtered.tobytes())
        self.rows_written += n
        self._emit(final=False)

    def close(self) -> None:
        if self.rows_written != self.height:
            raise ValueError(f"{self.rows_written} of {self.height} rows written")
        self._pending += self._zlib.flush()
        self._emit(final=True)
        self._chunk(b"IEND", b"")

    def _emit(self, final: bool) -> None:
        while len(self._pending) >= self._CHUNK or (final and self._pending):
            self._chunk(b"IDAT", bytes(self._pending[: self._CHUNK]))
            del self._pending[: self._CHUNK]

    def _chunk(self, kind: bytes, data: bytes) -> None:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        self.f.write(struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc))
