"""Where a training step's time goes: torch.profiler's operator table for one configuration.

    python benchmarks/profile_step.py                                   # fcdensenet103 224x224
    python benchmarks/profile_step.py --mode efficient_bf16_cl --size 360x480 --rows 25
    LD_PRELOAD=libtcmalloc_minimal.so.4 python benchmarks/profile_step.py  # as *_tcmalloc

The same step as benchmarks/train_step.py (batch 3, RMSprop, random data), profiled once after
two warm-up steps. Below the table it sums the convolution time and prints the GFLOP/s the
convolutions reach, beside the matrix-multiply roofline: the share of the step that is not
convolution is what memory traffic (BatchNorm, ReLU, concatenation, gradient accumulation)
costs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import MODES, build_step, roofline, step_flops

CONV_OPS = ("aten::convolution_backward", "aten::mkldnn_convolution", "aten::_convolution")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="fcdensenet103")
    p.add_argument("--size", default="224x224")
    p.add_argument("--mode", default="naive_bf16_cl", choices=list(MODES))
    p.add_argument("--rows", type=int, default=20)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    step = build_step(args.model, (h, w), args.mode, args.device)
    for _ in range(2):
        step()
    activities = [ProfilerActivity.CPU]
    if args.device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        step()
    table = prof.key_averages()
    print(f"{args.model} {args.size} {args.mode}, batch 3, {torch.get_num_threads()} threads")
    print(table.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    total = sum(e.self_cpu_time_total for e in table) / 1e6
    conv = sum(e.self_cpu_time_total for e in table if e.key in CONV_OPS) / 1e6
    flops = step_flops(args.model, (h, w)) / 1e9
    roof = roofline(args.device)
    dtype = "bfloat16" if MODES[args.mode]["amp"] == "bf16" else "float32"
    print(
        f"profiled CPU time {total:.2f} s, convolutions {conv:.2f} s ({100 * conv / total:.0f} %); "
        f"{flops:.0f} GFLOP per step (nearly all convolution) -> {flops / conv:.0f} GFLOP/s in "
        f"the convolutions vs a {roof[dtype]:.0f} GFLOP/s {dtype} matmul roofline"
    )


if __name__ == "__main__":
    main()
