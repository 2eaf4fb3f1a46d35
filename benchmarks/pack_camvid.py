"""CamVid's train + val splits, small enough to travel to a borrowed GPU machine.

The `device` tool sends at most 64 MiB of working tree, of which the tracked tree takes ~27 MB,
and CamVid's PNG frames take 119 MB: too much. This re-encodes the frames as JPEG (quality 92,
no chroma subsampling: 29 MB, PSNR >= 38.5 dB) and copies the label PNGs unchanged (3.8 MB), in the
SegNet layout that ``--data-root`` reads (frames pair with labels by file stem). Training on the
re-encoded frames is a small deviation from the PNGs; the figures that the report publishes
come from ``tiramisu evaluate`` on the original PNGs, on this machine.

    python benchmarks/pack_camvid.py ../shared/datasets/camvid .camvid_pack
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SPLITS = ("train", "val")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def pack(src: Path, dst: Path, quality: int) -> dict[str, float]:
    total, worst = 0, float("inf")
    for split in SPLITS:
        frames, labels = src / split, src / f"{split}annot"
        if not frames.is_dir() or not labels.is_dir():
            raise SystemExit(f"pack_camvid: {src}: expected {split}/ and {split}annot/ folders")
        (dst / split).mkdir(parents=True, exist_ok=True)
        (dst / f"{split}annot").mkdir(parents=True, exist_ok=True)
        for frame in sorted(frames.glob("*.png")):
            rgb = np.asarray(Image.open(frame).convert("RGB"))
            out = dst / split / f"{frame.stem}.jpg"
            Image.fromarray(rgb).save(out, quality=quality, subsampling=0)
            worst = min(worst, psnr(rgb, np.asarray(Image.open(out).convert("RGB"))))
            total += out.stat().st_size
        for label in sorted(labels.glob("*.png")):
            shutil.copyfile(label, dst / f"{split}annot" / label.name)
            total += label.stat().st_size
    return {"megabytes": total / 1e6, "worst_psnr_db": worst}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path, help="CamVid in the SegNet layout (train/, trainannot/, ...)")
    p.add_argument("dst", type=Path, help="output folder (git-ignored; name it in `carry`)")
    p.add_argument("--quality", type=int, default=92)
    args = p.parse_args(argv)
    stats = pack(args.src, args.dst, args.quality)
    print(
        f"{args.dst}: {stats['megabytes']:.1f} MB, "
        f"worst frame PSNR {stats['worst_psnr_db']:.1f} dB against the PNGs"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
