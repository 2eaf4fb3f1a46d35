"""Segmenting images: preprocessing that travels with the weights, TTA, tiling, file output.

``Segmenter`` wraps a model (PyTorch, or an ONNX file run by onnxruntime) together with its
pretrained config, so ``Segmenter.from_pretrained(dir).predict("photo.jpg")`` needs no knowledge
of how the model was trained.
"""

from __future__ import annotations

import contextlib
import glob
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from .data.segmentation import IMAGE_EXTENSIONS, image_to_tensor, pil_to_array
from .errors import CheckpointError, DataError
from .fileio import atomic_open, atomic_write
from .hardware import autocast_context, release_freed_memory, zero_subnormals_
from .imageio import ImageRows, PngRowWriter, open_image
from .models import batch_statistics
from .tiling import tile_grid, tiled_label_bands, tiled_labels, tiled_proba

ImageLike = str | Path | Image.Image | np.ndarray | Tensor


def colorize(
    mask: np.ndarray, colors: Sequence[Sequence[int]], ignore_color=(0, 0, 0)
) -> np.ndarray:
    """H x W class indices -> H x W x 3 uint8 using the class colours (others: ``ignore_color``)."""
    size = max(256, int(mask.max(initial=0)) + 1)
    lut = np.zeros((size, 3), dtype=np.uint8)
    lut[:] = ignore_color
    lut[: len(colors)] = np.asarray(colors, dtype=np.uint8)
    return lut[mask]


def overlay(
    image_rgb: np.ndarray,
    colored: np.ndarray,
    alpha: float = 0.5,
    mask: np.ndarray | None = None,
    skip_class: int | None = None,
    outline: bool = False,
) -> np.ndarray:
    """Blend class colours over the image.

    With ``mask``: pixels of ``skip_class`` (e.g. background) keep the image untouched, and
    ``outline`` draws class boundaries in black, which keeps regions visible even where a class
    colour resembles the image (a red class on a red car).
    """
    blend = (1 - alpha) * image_rgb.astype(np.float32) + alpha * colored.astype(np.float32)
    out = np.clip(blend + 0.5, 0, 255).astype(np.uint8)
    if mask is not None and skip_class is not None:
        keep = mask == skip_class
        out[keep] = image_rgb[keep]
    if mask is not None and outline:
        edge = np.zeros(mask.shape, dtype=bool)
        edge[:-1] |= mask[:-1] != mask[1:]
        edge[:, :-1] |= mask[:, :-1] != mask[:, 1:]
        out[edge] = 0
    return out


def legend_image(classes: Sequence[str], colors: Sequence[Sequence[int]]) -> np.ndarray:
    """A PNG-ready legend: one colour swatch and class name per row."""
    from PIL import ImageDraw

    row, width = 22, 16 + 8 * max(len(c) for c in classes) + 40
    im = Image.new("RGB", (width, row * len(classes) + 8), "white")
    draw = ImageDraw.Draw(im)
    for i, (name, color) in enumerate(zip(classes, colors, strict=True)):
        y = 4 + i * row
        draw.rectangle([6, y + 2, 22, y + 18], fill=tuple(int(v) for v in color), outline="black")
        draw.text((30, y + 4), str(name), fill="black")
    return np.asarray(im)


def read_colors(path: str | Path, classes: Sequence[str]) -> list[tuple[int, int, int]]:
    """Class colours from a JSON/YAML file: ``{name: [r, g, b]}`` or a list of ``[r, g, b]``."""
    from .config import parse_yaml

    try:
        raw = parse_yaml(Path(path).read_text())
    except OSError as e:
        raise DataError(f"{path}: cannot read the colours ({e.strerror or e})") from None
    except Exception as e:  # YAML syntax errors
        raise DataError(f"{path}: not valid YAML/JSON ({str(e).splitlines()[0]})") from None
    if isinstance(raw, dict):
        missing = [c for c in classes if c not in raw]
        if missing:
            raise DataError(f"{path}: no colour for class {missing[0]!r}")
        raw = [raw[c] for c in classes]
    ok = (
        isinstance(raw, list)
        and len(raw) == len(classes)
        and all(
            isinstance(c, list)
            and len(c) == 3
            and all(isinstance(v, int) and 0 <= v <= 255 for v in c)
            for c in raw
        )
    )
    if not ok:
        raise DataError(
            f"{path}: expected one [r, g, b] (0-255) per class for {len(classes)} classes"
        )
    return [tuple(c) for c in raw]


def load_image(path: str | Path) -> Image.Image:
    return open_image(path)


def display_rgb(image: Image.Image) -> np.ndarray:
    """8-bit RGB version of any input, for overlays."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = (np.asarray(image, dtype=np.float32) / 257.0).clip(0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    return np.asarray(image.convert("RGB"))


@dataclass
class OnnxModel:
    """An exported ONNX model behind the same ``logits = model(x)`` call as a PyTorch one."""

    path: Path
    session: Any = field(repr=False)

    @classmethod
    def load(cls, path: str | Path) -> tuple[OnnxModel, dict[str, Any]]:
        import json

        try:
            import onnxruntime as ort
        except ImportError:
            raise CheckpointError(
                "running .onnx files needs onnxruntime (pip install 'tiramisu[export]')"
            ) from None
        try:
            session = ort.InferenceSession(str(path), providers=ort.get_available_providers())
        except Exception as e:  # onnxruntime raises its own exception types
            raise CheckpointError(f"{path}: not a loadable ONNX model ({str(e)[:200]})") from None
        meta = session.get_modelmeta().custom_metadata_map
        if "tiramisu_config" not in meta:
            raise CheckpointError(
                f"{path}: no tiramisu config in the ONNX metadata "
                f"(export it with 'tiramisu export')"
            )
        return cls(Path(path), session), json.loads(meta["tiramisu_config"])

    def __call__(self, x: Tensor) -> Tensor:
        name = self.session.get_inputs()[0].name
        out = self.session.run(None, {name: x.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(out)

    def eval(self) -> OnnxModel:
        return self

    def to(self, *_: Any, **__: Any) -> OnnxModel:
        return self


class Segmenter:
    """A model plus its preprocessing: ``predict`` takes a path, PIL image, array or tensor."""

    def __init__(
        self,
        model: nn.Module | OnnxModel,
        config: dict[str, Any],
        device: str | torch.device = "cpu",
        amp: str = "none",
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        if config.get("task", "segmentation") != "segmentation":
            raise CheckpointError(
                f"this is a {config.get('task')} model ({config.get('model_name')}); a Segmenter "
                f"needs a segmentation model (use 'tiramisu evaluate' for classifiers)"
            )
        self.model = model
        self.config = config
        self.device = torch.device(device)
        self.amp = amp
        self.channels_last = channels_last
        self.is_onnx = isinstance(model, OnnxModel)
        if not self.is_onnx:
            self.model = model.to(self.device).eval()
            if self.device.type == "cpu":
                zero_subnormals_(self.model)
            if channels_last:
                self.model = self.model.to(memory_format=torch.channels_last)
        # The compiled wrapper only runs the forward; self.model stays the plain module, so
        # save_pretrained and attribute access see the original names.
        self._forward = torch.compile(self.model) if compile and not self.is_onnx else self.model
        pre = config["preprocessing"]
        self.channels = int(pre["channels"])
        self.mean = torch.tensor(pre["mean"]).view(-1, 1, 1) if pre.get("mean") else None
        self.std = torch.tensor(pre["std"]).view(-1, 1, 1) if pre.get("std") else None
        self.classes: list[str] = list(config["classes"])
        self.colors = [tuple(c) for c in config["colors"]]
        self.bn_eval = config.get("bn_eval", "running")
        self.min_size = getattr(
            model, "min_size", 2 ** len(config["model_config"].get("down_blocks", [0] * 5))
        )

    # ----------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, device: str = "cpu", **kw: Any) -> Segmenter:
        from .pretrained import load_pretrained

        model, config = load_pretrained(path_or_id)
        return cls(model, config, device, **kw)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", **kw: Any) -> Segmenter:
        """A training checkpoint, a pretrained directory or Hub id, or an ``.onnx`` file."""
        if str(path).endswith(".onnx"):
            model, config = OnnxModel.load(path)
            return cls(model, config, "cpu")  # onnxruntime picks its own providers
        from .pretrained import load_any

        model, config = load_any(path, device)
        return cls(model, config, device, **kw)

    def save_pretrained(self, directory: str | Path) -> Path:
        from .pretrained import save_pretrained

        if self.is_onnx:
            raise CheckpointError("an ONNX model cannot be saved as safetensors weights")
        return save_pretrained(self.model, self.config, directory)

    # ----------------------------------------------------------------------------- inference
    def preprocess(self, image: ImageLike) -> Tensor:
        """-> C x H x W float tensor, scaled and normalised as at training time."""
        if isinstance(image, str | Path):
            image = load_image(image)
        if isinstance(image, Image.Image):
            name = getattr(image, "filename", "") or "image"
            x = image_to_tensor(pil_to_array(image, self.channels, name))
        elif isinstance(image, np.ndarray):
            arr = image
            if arr.ndim == 2:
                arr = arr[..., None]
            if arr.dtype == np.uint8:
                arr = arr.astype(np.float32) / 255.0
            elif arr.dtype == np.uint16:
                arr = arr.astype(np.float32) / 65535.0
            x = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float()
        elif isinstance(image, Tensor):
            x = image.detach().float().cpu()  # assumed already scaled to [0, 1]
            if x.dim() == 4 and x.shape[0] == 1:
                x = x[0]
            if x.dim() == 2:
                x = x[None]
        else:
            raise TypeError(f"cannot segment a {type(image).__name__}")
        if x.dim() != 3:
            raise ValueError(f"expected a single image, got shape {tuple(x.shape)}")
        if x.shape[0] != self.channels:
            if x.shape[0] == 1 and self.channels == 3:
                x = x.expand(3, -1, -1)
            elif x.shape[0] == 4 and self.channels == 3:
                x = x[:3]
            elif x.shape[0] in (3, 4) and self.channels == 1:
                x = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]
            else:
                raise ValueError(
                    f"image has {x.shape[0]} channels; the model takes {self.channels}"
                )
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return x

    def _logits(self, x: Tensor) -> Tensor:
        """Raw logits for a preprocessed N x C x H x W batch, padded up to the model's minimum."""
        h, w = x.shape[-2:]
        pad_h, pad_w = max(0, self.min_size - h), max(0, self.min_size - w)
        if pad_h or pad_w:  # tiny images: reflect-pad to the smallest valid size, crop after
            mode = "reflect" if pad_h < h and pad_w < w else "replicate"
            x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
        if self.is_onnx:
            return self._forward(x)[..., :h, :w]
        x = x.to(self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        bn = batch_statistics(self.model) if self.bn_eval == "batch" else contextlib.nullcontext()
        with torch.inference_mode(), bn, autocast_context(self.device, self.amp):
            return self._forward(x).float()[..., :h, :w]

    def predict_proba_batch(
        self, x: Tensor, tta: bool = False, tile: int | None = None, overlap: int = 64
    ) -> Tensor:
        """Class probabilities (N x K x H x W, CPU float32) for a preprocessed batch."""

        def run(batch: Tensor) -> Tensor:
            if tile is not None and (batch.shape[-2] > tile or batch.shape[-1] > tile):
                return torch.cat(
                    [
                        tiled_proba(self._probs, b[None], tile, overlap, align=self.min_size)
                        for b in batch
                    ]
                )
            return self._probs(batch)

        probs = run(x)
        if tta:  # horizontal flip test-time augmentation: average with the un-flipped result
            probs = 0.5 * (probs + run(x.flip(-1)).flip(-1))
        return probs

    def _probs(self, x: Tensor) -> Tensor:
        return torch.softmax(self._logits(x), dim=1).cpu()

    def predict_proba(self, image: ImageLike, **kw: Any) -> np.ndarray:
        """K x H x W probabilities for one image."""
        return self.predict_proba_batch(self.preprocess(image)[None], **kw)[0].numpy()

    @property
    def mask_dtype(self) -> Any:
        return np.uint8 if len(self.classes) <= 256 else np.int32

    def predict(
        self,
        image: ImageLike,
        tta: bool = False,
        tile: int | None = None,
        overlap: int = 64,
    ) -> np.ndarray:
        """H x W class-index mask (uint8 for up to 256 classes) with the input's size.

        With ``tile`` the image goes through the sliding window in bounded memory
        (``predict_tiled``)."""
        if tile is not None:
            return self.predict_tiled(image, tile, overlap, tta)
        probs = self.predict_proba_batch(self.preprocess(image)[None], tta=tta)[0]
        return probs.argmax(0).numpy().astype(self.mask_dtype)

    def predict_tiled(
        self, image: ImageLike, tile: int, overlap: int = 64, tta: bool = False
    ) -> np.ndarray:
        """Sliding-window mask that never holds the whole image's probabilities.

        Each tile is scaled and normalised on its own and the blended sums live one band of
        tiles at a time (``tiling.tiled_label_bands``); the mask is the only whole-image array
        this adds. A file name is decoded band by band where libvips is installed
        (``ImageRows``). TTA flips each tile."""
        if isinstance(image, str | Path):
            with ImageRows(image) as rows:
                w, h = rows.size
                return tiled_labels(
                    self._tile_probs(self._file_window(rows), tta),
                    h,
                    w,
                    tile,
                    overlap,
                    self.min_size,
                    self.mask_dtype,
                )
        if isinstance(image, Image.Image):
            # Crop each tile from the decoded image: no whole-image numpy copy.
            w, h = image.size
            name = getattr(image, "filename", "") or "image"
            pil = image

            def window(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
                return pil_to_array(pil.crop((x0, y0, x1, y1)), self.channels, name)
        else:
            source = self._source_array(image)
            h, w = source.shape[:2]

            def window(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
                return np.ascontiguousarray(source[y0:y1, x0:x1])

        tile_probs = self._tile_probs(window, tta)
        return tiled_labels(tile_probs, h, w, tile, overlap, self.min_size, self.mask_dtype)

    def _file_window(self, rows: ImageRows) -> Callable[[int, int, int, int], np.ndarray]:
        def window(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
            return pil_to_array(rows.window(y0, y1, x0, x1), self.channels, rows.path)

        return window

    def _tile_probs(
        self, window: Callable[[int, int, int, int], np.ndarray], tta: bool
    ) -> Callable[[int, int, int, int], Tensor]:
        """Probabilities of one window of the image (scaled and normalised on its own)."""
        row = [-1]

        def tile_probs(y0: int, y1: int, x0: int, x1: int) -> Tensor:
            if y0 != row[0] and self.device.type == "cpu":
                release_freed_memory()  # the last row's activations: see its docstring
            row[0] = y0
            x = self.preprocess(window(y0, y1, x0, x1))[None]
            p = self._probs(x)
            if tta:
                p = 0.5 * (p + self._probs(x.flip(-1)).flip(-1))
            return p

        return tile_probs

    def write_tiled(
        self,
        path: str | Path,
        out_dir: Path,
        name: str,
        style: OverlayStyle,
        save_overlay: bool,
        tile: int,
        overlap: int = 64,
        tta: bool = False,
        header: Image.Image | None = None,
        progress: bool = False,
    ) -> None:
        """``predict --tile`` for one file: the outputs of ``write_outputs``, written band by
        band as the sliding window finishes them (``progress``: a bar counting tiles).

        Nothing whole-image is kept: the picture is decoded a band of rows at a time (with
        libvips; see ``ImageRows``), and the mask, colour mask and overlay go to their PNG
        files as their rows are done, so peak memory stays flat in the image's size. Each file
        appears only when complete; a failure part-way leaves no partial output."""
        from tqdm import tqdm

        if self.mask_dtype != np.uint8:
            raise ValueError("band-by-band output needs at most 256 classes")
        with ImageRows(path, header) as rows, contextlib.ExitStack() as files:
            w, h = rows.size

            def png(suffix: str, channels: int) -> PngRowWriter:
                f = files.enter_context(atomic_open(out_dir / f"{name}{suffix}.png"))
                return PngRowWriter(f, w, h, channels)

            index, color = png("", 1), png("_color", 3)
            blend = _BandedOverlay(png("_overlay", 3), style) if save_overlay else None
            ys, xs = tile_grid(h, w, tile, overlap, self.min_size)
            bar = files.enter_context(
                tqdm(
                    total=len(ys) * len(xs),
                    desc=Path(path).name,
                    unit="tile",
                    leave=False,
                    disable=not progress,
                    dynamic_ncols=True,
                )
            )
            probs = self._tile_probs(self._file_window(rows), tta)

            def tile_probs(y0: int, y1: int, x0: int, x1: int) -> Tensor:
                p = probs(y0, y1, x0, x1)
                bar.update(1)
                return p

            bands = tiled_label_bands(tile_probs, h, w, tile, overlap, self.min_size)
            for y0, labels in bands:
                for a in range(0, labels.shape[0], _OUTPUT_ROWS):
                    part = labels[a : a + _OUTPUT_ROWS]
                    colored = colorize(part, style.colors)
                    index.write(part)
                    color.write(colored)
                    if blend is not None:
                        shown = display_rgb(rows.window(y0 + a, y0 + a + part.shape[0]))
                        blend.add(shown, colored, part)
            if blend is not None:
                blend.finish()
            for writer in (index, color) + ((blend.writer,) if blend else ()):
                writer.close()

    def _source_array(self, image: np.ndarray | Tensor) -> np.ndarray:
        """An array or tensor input as H x W x C, not yet scaled."""
        if isinstance(image, Tensor):
            x = image.detach().float().cpu()
            x = x[0] if x.dim() == 4 else x
            x = x[None] if x.dim() == 2 else x
            return x.permute(1, 2, 0).numpy()
        return image if image.ndim == 3 else image[..., None]


# --------------------------------------------------------------------------------- files
def expand_inputs(inputs: Iterable[str]) -> tuple[list[Path], list[str]]:
    """Files, folders (their images, sorted) and globs -> (image paths, problems)."""
    paths: list[Path] = []
    problems: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                problems.append(f"{p}: no images in this folder")
            paths += found
        elif p.is_file():
            paths.append(p)
        elif any(c in item for c in "*?["):
            found = sorted(Path(f) for f in glob.glob(item, recursive=True) if Path(f).is_file())
            if not found:
                problems.append(f"{item}: no files match")
            paths += found
        else:
            problems.append(f"{p}: no such file or folder")
    unique = list(dict.fromkeys(p.resolve() for p in paths))
    return unique, problems


def save_image_atomic(array: np.ndarray, path: Path) -> None:
    fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    atomic_write(path, lambda f: Image.fromarray(array).save(f, format=fmt))


@dataclass
class OverlayStyle:
    colors: list[Sequence[int]]
    alpha: float = 0.5
    skip_class: int | None = None
    outline: bool = False


_OUTPUT_ROWS = 32  # rows coloured and blended at a time by ``write_tiled``


class _BandedOverlay:
    """``overlay`` applied band by band. A row's outline compares it with the row below, so
    the last row of each band waits for the next band (or ``finish``)."""

    def __init__(self, writer: PngRowWriter, style: OverlayStyle) -> None:
        self.writer, self.style = writer, style
        self._held: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def add(self, shown: np.ndarray, colored: np.ndarray, labels: np.ndarray) -> None:
        if self._held is not None:
            held = self._held
            shown, colored, labels = (
                np.concatenate([h, x]) for h, x in zip(held, (shown, colored, labels), strict=True)
            )
        self._write(shown, colored, labels, keep_last=True)
        self._held = (shown[-1:], colored[-1:], labels[-1:])

    def finish(self) -> None:
        if self._held is not None:
            self._write(*self._held, keep_last=False)
            self._held = None

    def _write(self, shown: np.ndarray, colored: np.ndarray, labels: np.ndarray, keep_last: bool):
        s = self.style
        out = overlay(shown, colored, s.alpha, labels, s.skip_class, s.outline)
        self.writer.write(out[:-1] if keep_last else out)


def write_outputs(
    segmenter: Segmenter,
    mask: np.ndarray,
    probs: Tensor | None,
    image: Image.Image,
    out_dir: Path,
    name: str,
    style: OverlayStyle,
    save_overlay: bool,
    save_probs: bool,
) -> None:
    """``NAME.png`` (indices), ``NAME_color.png`` and optionally the overlay and probabilities."""
    save_image_atomic(mask, out_dir / f"{name}.png")
    colored = colorize(mask, style.colors)
    save_image_atomic(colored, out_dir / f"{name}_color.png")
    if save_overlay:
        blended = overlay(
            display_rgb(image), colored, style.alpha, mask, style.skip_class, style.outline
        )
        save_image_atomic(blended, out_dir / f"{name}_overlay.png")
    if save_probs and probs is not None:
        arrays = {"probs": probs.numpy().astype(np.float16), "classes": np.array(segmenter.classes)}
        atomic_write(out_dir / f"{name}_probs.npz", lambda f: np.savez_compressed(f, **arrays))


def predict_files(
    segmenter: Segmenter,
    paths: Sequence[Path],
    out_dir: Path,
    *,
    batch_size: int = 4,
    tta: bool = False,
    tile: int | None = None,
    overlap: int = 64,
    save_overlay: bool = False,
    save_probs: bool = False,
    alpha: float = 0.5,
    progress: bool = True,
    colors: Sequence[Sequence[int]] | None = None,
    skip_class: int | None = None,
    outline: bool = False,
) -> tuple[int, list[str]]:
    """Segment ``paths`` into ``out_dir``; returns (images written, problems).

    Consecutive images of the same size are batched; an unreadable image is reported and
    skipped without stopping the others. Outputs for ``photo.jpg``: ``photo.png`` (class
    indices), ``photo_color.png``, and optionally ``photo_overlay.png`` and ``photo_probs.npz``.
    """
    from tqdm import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    style = OverlayStyle(list(colors or segmenter.colors), alpha, skip_class, outline)
    problems: list[str] = []
    names: dict[str, int] = {}
    done = 0
    batch: list[tuple[Path, Image.Image, Tensor, str]] = []

    def unique_name(path: Path) -> str:
        n = names.get(path.stem, 0)
        names[path.stem] = n + 1
        return path.stem if n == 0 else f"{path.stem}_{n}"

    def flush() -> None:
        nonlocal done
        if not batch:
            return
        x = torch.stack([b[2] for b in batch])
        probs = segmenter.predict_proba_batch(x, tta=tta, tile=tile, overlap=overlap)
        for (_, image, _, name), p in zip(batch, probs, strict=True):
            mask = p.argmax(0).numpy().astype(segmenter.mask_dtype)
            write_outputs(segmenter, mask, p, image, out_dir, name, style, save_overlay, save_probs)
            done += 1
            bar.update(1)  # counts written images, so the bar tracks the real work
        batch.clear()

    bar = tqdm(
        total=len(paths), desc="segment", unit="img", disable=not progress, dynamic_ncols=True
    )
    # Large images under --tile go band by band to their files (bounded memory); --probs needs
    # whole-image probabilities, and over 256 classes the mask is not 8-bit.
    stream = tile is not None and not save_probs and segmenter.mask_dtype == np.uint8
    for path in paths:
        try:
            header = open_image(path, header_only=True) if stream else None
            if header is not None and tile is not None and max(header.size) > tile:
                flush()
                name = unique_name(path)
                segmenter.write_tiled(
                    path, out_dir, name, style, save_overlay, tile, overlap, tta, header, progress
                )
                done += 1
                bar.update(1)
                continue
            image = load_image(path)
            x = segmenter.preprocess(image)
        except (DataError, ValueError, OSError) as e:
            problems.append(str(e))
            bar.update(1)
            continue
        if batch and (batch[0][2].shape != x.shape or len(batch) >= batch_size):
            flush()
        batch.append((path, image, x, unique_name(path)))
    flush()
    bar.close()
    return done, problems


@torch.no_grad()
def save_predictions(
    model: nn.Module,
    dataset: Any,
    out_dir: str | Path,
    colors: Any,
    limit: int = 8,
    bn_eval: str = "batch",
    device: torch.device | str = "cpu",
) -> list[Path]:
    """For a dataset's first ``limit`` samples: ``NAME_pred.png`` (indices), ``NAME_color.png``
    and ``NAME_compare.png`` (image | truth | prediction), e.g. after the demo's training run."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    written = []
    ctx = batch_statistics(model) if bn_eval == "batch" else contextlib.nullcontext()
    with ctx:
        for i in range(min(limit, len(dataset))):
            image, target = dataset[i]
            pred = model(image[None].to(device)).argmax(1)[0].cpu().numpy().astype(np.uint8)
            name = Path(dataset.pairs[i][0]).stem if hasattr(dataset, "pairs") else f"{i:04d}"
            Image.fromarray(pred).save(out_dir / f"{name}_pred.png")
            colored = colorize(pred, colors)
            Image.fromarray(colored).save(out_dir / f"{name}_color.png")
            raw = dataset.load(i)[0] if hasattr(dataset, "load") else None
            if raw is not None and raw.dtype == np.uint8 and raw.shape[2] in (1, 3):
                rgb = np.repeat(raw, 3, axis=2) if raw.shape[2] == 1 else raw
                truth = colorize(target.numpy().astype(np.int64), colors)
                Image.fromarray(np.concatenate([rgb, truth, colored], axis=1)).save(
                    out_dir / f"{name}_compare.png"
                )
            written.append(out_dir / f"{name}_pred.png")
    return written
