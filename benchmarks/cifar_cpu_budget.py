"""DenseNet-BC (L=100, k=12) on the shared CIFAR-10 subset for a fixed wall-clock budget (CPU).

    python benchmarks/cifar_cpu_budget.py                 # 60 minutes, the default
    python benchmarks/cifar_cpu_budget.py --minutes 10

The paper's recipe (SGD Nesterov 0.9, batch 64, weight decay 1e-4, pad-4 crop + flip, lr 0.1
divided by 10 at 50% and 75% of training) compressed to the budget: a few timed training steps
first estimate how many epochs fit, and the schedule is laid over that many epochs, so both lr
drops happen inside the budget. Validation is the deterministic 10%-per-class hold-out (2,500
images) of the 25,000-image subset; the script prints the validation top-1 error.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from tiramisu import create_model
from tiramisu.config import load_config
from tiramisu.hardware import autocast_context
from tiramisu.training import train

ROOT = Path(__file__).resolve().parents[1]


def seconds_per_step(model_name: str, batch: int, amp: str, channels_last: bool) -> float:
    model = create_model(model_name, num_classes=10)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,))
    times = []
    for i in range(6):
        t0 = time.perf_counter()
        with autocast_context(torch.device("cpu"), amp):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=60.0)
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "datasets" / "cifar10"))
    p.add_argument("--model", default="densenet_bc100_k12")
    p.add_argument("--out", default=str(ROOT / "runs" / "cifar_cpu_budget"))
    p.add_argument("--amp", default="bf16", choices=["none", "bf16"])
    p.add_argument("--no-channels-last", action="store_true")
    args = p.parse_args()
    channels_last = not args.no_channels_last

    step = seconds_per_step(args.model, 64, args.amp, channels_last)
    steps_per_epoch = 22_500 // 64
    # Validation (2,500 images, forward only) costs about a tenth of a training epoch.
    epoch_s = steps_per_epoch * step * 1.12
    epochs = max(2, math.floor(args.minutes * 60 * 0.97 / epoch_s))
    print(
        f"{step:.3f} s per training step -> about {epoch_s / 60:.1f} min per epoch; "
        f"laying the schedule over {epochs} epochs"
    )

    cfg = load_config(
        ROOT / "configs" / "cifar10_densenet_bc100_k12.yaml",
        [
            f"data.root={args.data_root}",
            f"model.name={args.model}",
            f"train.epochs={epochs}",
            f"train.amp={args.amp}",
            f"train.channels_last={channels_last}",
            f"train.max_minutes={args.minutes}",
        ],
    )
    out = Path(args.out)
    if (out / "last.pt").exists():
        raise SystemExit(f"{out} already holds a run; pass another --out")
    t0 = time.perf_counter()
    metrics = train(cfg, out, device="cpu")
    history = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    summary = {
        "model": args.model,
        "budget_minutes": args.minutes,
        "wall_minutes": round((time.perf_counter() - t0) / 60, 1),
        "planned_epochs": epochs,
        "epochs_run": len(history),
        "val_top1_error": 1 - metrics["global_accuracy"],
        "val_error_per_epoch": [
            round(1 - h["val_accuracy"], 4) for h in history if h.get("val_accuracy") is not None
        ],
        "amp": args.amp,
        "channels_last": channels_last,
        "seconds_per_step": step,
    }
    (out / "budget_summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    print(
        f"\nvalidation top-1 error {100 * summary['val_top1_error']:.2f} % after "
        f"{args.minutes:g} minutes ({len(history)} epochs)"
    )


if __name__ == "__main__":
    main()
