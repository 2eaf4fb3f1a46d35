"""Peak memory of tiled prediction against image size.

    python benchmarks/tiled_memory.py --sizes 1500 3000 6000 12000 --json results/tiled_memory.json

For each square size an RGB PNG is written once; then, each in a fresh process, the image is
segmented with ``--tile 512 --overlap 64`` by

- ``streamed``: ``tiramisu predict --tile --overlay`` as shipped (``Segmenter.write_tiled``):
  the picture decoded band by band by libvips, labels finished column by column, and the mask,
  colour mask and outlined overlay PNGs written row band by row band;
- ``streamed_pillow``: the same without libvips (Pillow decodes the whole picture),
- ``streamed_no_trim``: the same without handing freed memory back to the system after each
  tile (``hardware.release_freed_memory``; glibc's heaps then grow with the number of tiles), and
- ``probabilities``: the same tiles through ``predict_proba_batch`` (whole-image K x H x W
  probabilities, then argmax; what ``--tile`` did at first, and what ``--probs`` still needs),

and the child's own peak resident memory (``VmHWM``, Linux) is reported, with each row's
ratio to the smallest size in the same mode. The model is an FC-DenseNet with FC-DenseNet56's five
poolings but one layer of growth 4 per block and 16 first-layer maps (11 classes): per-tile
activations are a constant whatever the image size, so a thin model only makes the run faster.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import sys, tempfile, time
from pathlib import Path
from tiramisu import hardware, imageio
from tiramisu.inference import OverlayStyle, Segmenter, load_image
mode, weights, image_path, tile, overlap = sys.argv[1:6]
seg = Segmenter.from_pretrained(weights)
t0 = time.perf_counter()
if mode.startswith("streamed"):
    if mode == "streamed_pillow":  # the same path with Pillow decoding the whole picture
        imageio._VIPS_FORMATS = set()
    if mode == "streamed_no_trim":
        hardware._malloc_trim = None
    style = OverlayStyle(list(seg.colors), 0.5, None, True)
    with tempfile.TemporaryDirectory() as out:  # mask, colour mask and outlined overlay
        seg.write_tiled(image_path, Path(out), "x", style, True, int(tile), int(overlap))
else:
    x = seg.preprocess(load_image(image_path))[None]
    mask = seg.predict_proba_batch(x, tile=int(tile), overlap=int(overlap))[0].argmax(0).numpy()
seconds = time.perf_counter() - t0
# VmHWM is this process's own peak; ru_maxrss would also count the parent's pages at fork.
peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(peak / 1024, seconds)
"""


def make_image(path: Path, size: int) -> None:
    import numpy as np
    from PIL import Image

    # Smooth content: realistic for a scan, and quick to compress.
    y = np.linspace(0, 255, size, dtype=np.float32)[:, None]
    x = np.linspace(0, 255, size, dtype=np.float32)[None, :]
    rgb = np.stack([(y + x) / 2, np.abs(y - x), 255 - y + 0 * x], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(path, compress_level=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1500, 3000, 6000, 12000])
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["streamed", "streamed_no_trim", "streamed_pillow", "probabilities"],
    )
    parser.add_argument(
        "--max-probabilities-size",
        type=int,
        default=6000,
        help="skip the probabilities mode above this size (12000^2 needs about 9 GB)",
    )
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import torch

    from tiramisu import create_model, save_pretrained

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        model = create_model(
            "fcdensenet56",
            num_classes=11,
            growth_rate=4,
            down_blocks=[1] * 5,
            bottleneck_layers=1,
            first_conv_channels=16,
        ).eval()
        config = {
            "architecture": "FCDenseNet",
            "model_config": model.config,
            "classes": [f"c{i}" for i in range(11)],
            "colors": [[20 * i, 0, 0] for i in range(11)],
            "bn_eval": "running",
            "preprocessing": {"mean": None, "std": None, "channels": 3},
        }
        weights = save_pretrained(model, config, tmp_path / "w")
        del model, torch
        for size in args.sizes:
            image = tmp_path / f"{size}.png"
            make_image(image, size)
            for mode in args.modes:
                if mode == "probabilities" and size > args.max_probabilities_size:
                    continue
                t0 = time.perf_counter()
                out = subprocess.run(
                    [
                        sys.executable,
                        "-c",
                        CHILD,
                        mode,
                        str(weights),
                        str(image),
                        str(args.tile),
                        str(args.overlap),
                    ],
                    check=True,
                    capture_output=True,
                    text=True,
                    env={**os.environ},
                ).stdout.split()
                rss, seconds = float(out[0]), float(out[1])
                rows.append(
                    {
                        "size": size,
                        "mode": mode,
                        "peak_rss_mb": round(rss, 1),
                        "seconds": round(seconds, 1),
                        "wall_s": round(time.perf_counter() - t0, 1),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
            image.unlink()
    for mode in args.modes:
        base = next((r["peak_rss_mb"] for r in rows if r["mode"] == mode), None)
        for r in rows:
            if r["mode"] == mode and base:
                r["ratio_to_smallest"] = round(r["peak_rss_mb"] / base, 3)
    print("| size | mode | peak RSS MB | vs smallest | seconds |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['size']}^2 | {r['mode']} | {r['peak_rss_mb']:.0f} | "
            f"{r.get('ratio_to_smallest', 1):.2f}x | {r['seconds']} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
