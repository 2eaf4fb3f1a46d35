"""``tiramisu app``: try a segmentation model in the browser (Gradio), or call it as an API.

Upload one or more images; each comes back as the mask blended over the picture (opacity
slider, redrawn without running the model again), with a legend of the class colours, the
share of each class in the picture, and the index and colour masks to download. Large images
can go through the tiled (sliding-window) path. The same function is served as the API
endpoint ``/segment`` for ``gradio_client``.
"""

from __future__ import annotations

import html
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .errors import TiramisuError
from .inference import Segmenter, colorize, display_rgb, load_image, overlay

MAX_FILES = 16


def legend_html(classes: list[str], colors: list[tuple[int, int, int]]) -> str:
    items = "".join(
        f'<span class="tiramisu-legend-item" style="display:inline-flex;align-items:center;'
        f'margin:0 12px 4px 0"><span style="display:inline-block;width:14px;height:14px;'
        f'border:1px solid #555;background:rgb({r},{g},{b});margin-right:5px"></span>'
        f"{html.escape(name)}</span>"
        for name, (r, g, b) in zip(classes, colors, strict=True)
    )
    return f'<div class="tiramisu-legend">{items}</div>'


def class_areas(mask: np.ndarray, num_classes: int) -> list[float]:
    """Percentage of the image's pixels predicted as each class."""
    counts = np.bincount(mask.ravel(), minlength=num_classes)[:num_classes]
    return (100.0 * counts / max(mask.size, 1)).round(2).tolist()


class SegmentationApp:
    """The app's behaviour, independent of Gradio (and tested without a browser too)."""

    def __init__(self, segmenter: Segmenter, out_dir: Path | None = None) -> None:
        self.segmenter = segmenter
        self.out_dir = Path(out_dir or tempfile.mkdtemp(prefix="tiramisu-app-"))
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def segment(
        self, paths: list[str] | None, alpha: float = 0.5, tiled: bool = False, tile: int = 512
    ) -> tuple[list[tuple[np.ndarray, str]], list[list[Any]], list[str], list[dict[str, Any]]]:
        """-> (overlays with captions, area table rows, files to download, state)."""
        if not paths:
            raise TiramisuError("upload at least one image")
        if len(paths) > MAX_FILES:
            raise TiramisuError(f"at most {MAX_FILES} images at a time, got {len(paths)}")
        seg = self.segmenter
        # One folder per request: concurrent users and same-named uploads never collide.
        folder = Path(tempfile.mkdtemp(prefix="run-", dir=self.out_dir))
        gallery, rows, downloads, state = [], [], [], []
        for raw in paths:
            path = Path(raw)
            image = load_image(path)
            use_tile = int(tile) if tiled and max(image.size) > int(tile) else None
            kw = {"tile": use_tile, "overlap": min(64, use_tile // 4)} if use_tile else {}
            mask = seg.predict(image, **kw)
            rgb = display_rgb(image)
            stem = path.stem
            n = sum(1 for s in state if Path(s["name"]).stem == stem)
            stem = stem if n == 0 else f"{stem}_{n}"
            index_path = folder / f"{stem}_mask.png"
            color_path = folder / f"{stem}_color.png"
            Image.fromarray(mask).save(index_path)
            Image.fromarray(colorize(mask, seg.colors)).save(color_path)
            downloads += [str(index_path), str(color_path)]
            state.append({"name": path.name, "rgb": rgb, "mask": mask})
            gallery.append((self._blend(rgb, mask, alpha), path.name))
            rows.append([path.name, *class_areas(mask, len(seg.classes))])
        return gallery, rows, downloads, state

    def reblend(
        self, state: list[dict[str, Any]] | None, alpha: float
    ) -> list[tuple[np.ndarray, str]]:
        return [(self._blend(s["rgb"], s["mask"], alpha), s["name"]) for s in state or []]

    def _blend(self, rgb: np.ndarray, mask: np.ndarray, alpha: float) -> np.ndarray:
        return overlay(rgb, colorize(mask, self.segmenter.colors), float(alpha))


def build_app(segmenter: Segmenter, title: str = "tiramisu", out_dir: Path | None = None) -> Any:
    """A Gradio Blocks app around ``segmenter`` (``gradio`` is the ``[app]`` extra); the masks
    offered for download are written under ``out_dir`` (a new temporary folder by default)."""
    try:
        import gradio as gr
    except ImportError:
        raise TiramisuError("the web app needs gradio: pip install 'tiramisu[app]'") from None
    app = SegmentationApp(segmenter, out_dir)
    classes = segmenter.classes

    def segment(files: Any, alpha: float, tiled: bool, tile: float) -> Any:
        paths = [f if isinstance(f, str) else getattr(f, "name", str(f)) for f in files or []]
        try:
            return app.segment(paths, alpha, tiled, int(tile))
        except TiramisuError as e:
            raise gr.Error(str(e)) from None

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"## {html.escape(title)}: semantic segmentation")
        with gr.Row():
            with gr.Column(scale=1):
                files = gr.File(
                    file_count="multiple", file_types=["image"], label="Images", elem_id="images"
                )
                alpha = gr.Slider(0, 1, value=0.5, step=0.05, label="Mask opacity", elem_id="alpha")
                tiled = gr.Checkbox(False, label="Tiled inference (large images)", elem_id="tiled")
                tile = gr.Number(512, label="Tile size (pixels)", precision=0, elem_id="tile")
                run = gr.Button("Segment", variant="primary", elem_id="segment")
            with gr.Column(scale=2):
                gallery = gr.Gallery(label="Overlay", format="png", elem_id="overlay", columns=2)
                gr.HTML(legend_html(classes, segmenter.colors), elem_id="legend")
                areas = gr.Dataframe(
                    headers=["image", *[f"{c} %" for c in classes]],
                    label="Class areas",
                    elem_id="areas",
                    interactive=False,
                )
                downloads = gr.File(
                    file_count="multiple", label="Index and colour masks", elem_id="downloads"
                )
        state = gr.State([])
        run.click(
            segment,
            inputs=[files, alpha, tiled, tile],
            outputs=[gallery, areas, downloads, state],
            api_name="segment",
        )
        alpha.release(app.reblend, inputs=[state, alpha], outputs=gallery, api_name=False)
    return demo


def app_title(checkpoint: str, config: dict[str, Any]) -> str:
    """The page title: the architecture and where it came from.

    A bare file name (``best.pt``) or folder name (``weights``) says nothing about the model, so
    the title names the architecture and keeps the last two parts of the path."""
    source = "/".join(Path(checkpoint).parts[-2:]) or checkpoint
    model = config.get("model_name") or config.get("architecture") or "model"
    return f"tiramisu: {model} ({source})" if model not in source else f"tiramisu: {source}"


def launch(
    checkpoint: str,
    host: str = "127.0.0.1",
    port: int = 7860,
    device: str = "auto",
    amp: str = "auto",
    block: bool = True,
) -> Any:
    """Load ``checkpoint`` (training checkpoint, weights folder, set name or .onnx) and serve it.

    ``amp=auto`` uses bf16 + channels_last where the hardware computes bf16 natively."""
    from .hardware import resolve_amp, resolve_device

    dev = resolve_device(device)
    amp_mode = "none" if str(checkpoint).endswith(".onnx") else resolve_amp(dev, amp)
    segmenter = Segmenter.load(
        checkpoint, device=dev, amp=amp_mode, channels_last=amp_mode != "none"
    )
    demo = build_app(segmenter, title=app_title(str(checkpoint), segmenter.config))
    demo.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=not block,
        quiet=not block,
        allowed_paths=[str(tempfile.gettempdir())],
    )
    return demo
