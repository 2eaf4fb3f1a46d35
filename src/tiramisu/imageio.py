"""Reading image files: one place, one set of errors, one pixel limit.

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
import warnings
from collections.abc import Iterator
from pathlib import Path

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
