"""Train FC-DenseNet56 on CamVid for a fixed wall-clock budget on CPU; print val mIoU / accuracy.

    python benchmarks/camvid_cpu_budget.py                      # 60 minutes, the default
    python benchmarks/camvid_cpu_budget.py --minutes 10 --out runs/budget10

The paper's recipe (RMSprop 1e-3, x0.995 per epoch, 224x224 crops, batch 3, flips, [0, 1]
inputs, void ignored), with the fastest CPU settings the code offers: bf16 autocast and
channels_last (about 3x faster than fp32 for FC-DenseNet56 here), decoded frames cached in
memory, validation on all 101 full 360x480 val frames after every epoch. Training stops when
the budget runs out (mid-epoch if need be); the last validation pass comes on top of the budget.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tiramisu.config import load_config
from tiramisu.training import train

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=60.0)
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "datasets" / "camvid"))
    p.add_argument("--model", default="fcdensenet56")
    p.add_argument("--out", default=str(ROOT / "runs" / "camvid_cpu_budget"))
    p.add_argument("--amp", default="bf16", choices=["none", "bf16"])
    p.add_argument("--no-channels-last", action="store_true")
    args = p.parse_args()

    cfg = load_config(
        ROOT / "configs" / "camvid_fcdensenet56.yaml",
        [
            f"data.root={args.data_root}",
            f"model.name={args.model}",
            f"train.amp={args.amp}",
            f"train.channels_last={not args.no_channels_last}",
            f"train.max_minutes={args.minutes}",
            "finetune.enabled=false",
        ],
    )
    out = Path(args.out)
    if (out / "last.pt").exists():
        raise SystemExit(f"{out} already holds a run; pass another --out")
    t0 = time.perf_counter()
    metrics = train(cfg, out, device="cpu")
    elapsed = time.perf_counter() - t0
    history = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    summary = {
        "model": args.model,
        "budget_minutes": args.minutes,
        "wall_minutes": round(elapsed / 60, 1),
        "epochs": len(history),
        "best_epoch": metrics.get("best_epoch"),
        "val_miou": metrics["miou"],
        "val_global_accuracy": metrics["global_accuracy"],
        "val_mean_class_accuracy": metrics["mean_class_accuracy"],
        "train_images_per_s": history[-1]["train_images_per_s"] if history else None,
        "threads": torch.get_num_threads(),
        "amp": args.amp,
        "channels_last": not args.no_channels_last,
    }
    (out / "budget_summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    print(
        f"\nval mIoU {100 * metrics['miou']:.1f} %, global accuracy "
        f"{100 * metrics['global_accuracy']:.1f} % after {args.minutes:g} minutes "
        f"({len(history)} epochs)"
    )


if __name__ == "__main__":
    main()
