"""Training-step time and peak memory: the naive dense blocks vs the memory-efficient ones.

    python benchmarks/train_step.py                                  # everything (long on CPU)
    python benchmarks/train_step.py --models fcdensenet103 --sizes 224x224 360x480
    python benchmarks/train_step.py --depth-scaling                  # one block of 10..80 layers

Every configuration runs in a fresh process: peak RSS (CPU) or torch.cuda.max_memory_allocated
(CUDA) is that configuration's own. A step is forward + cross-entropy + backward + RMSprop update
on random data, batch 3; the reported time is the median of the timed steps after a warm-up
step. Achieved GFLOP/s = (forward + backward FLOPs, counted by FlopCounterMode) / step time,
printed beside a matrix-multiply roofline measured in the same run. Ratios are against the naive
fp32 path for the same model and size, measured in the same run (naive_fp32, or where that mode
was not run, naive_fp32_tcmalloc, then naive_fp32_cl_tcmalloc; the output says which).

``*_tcmalloc`` modes run the same step with tcmalloc preloaded (LD_PRELOAD; Debian/Ubuntu
package libtcmalloc-minimal4), skipped where it is not installed and on CUDA, and peak RSS
and minor page faults are recorded with it too.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from _memory import own_peak_rss_mb  # benchmarks/_memory.py

MODES = {
    "naive_fp32": dict(memory_efficient=False, amp="none", channels_last=False),
    "efficient_fp32": dict(memory_efficient=True, amp="none", channels_last=False),
    "naive_bf16_cl": dict(memory_efficient=False, amp="bf16", channels_last=True),
    "efficient_bf16_cl": dict(memory_efficient=True, amp="bf16", channels_last=True),
    # The same with tcmalloc preloaded: glibc malloc returns big freed blocks to the OS, so
    # every step page-faults its activations in again (a third of the CPU time in fp32 here).
    "naive_bf16_cl_tcmalloc": dict(
        memory_efficient=False, amp="bf16", channels_last=True, allocator="tcmalloc"
    ),
    "efficient_bf16_cl_tcmalloc": dict(
        memory_efficient=True, amp="bf16", channels_last=True, allocator="tcmalloc"
    ),
    # Not in the default list: compiling FC-DenseNet103 takes ~5 minutes on 2 cores.
    "naive_bf16_cl_compile": dict(
        memory_efficient=False, amp="bf16", channels_last=True, compile=True, allocator="tcmalloc"
    ),
    "efficient_fp32_tcmalloc": dict(
        memory_efficient=True, amp="none", channels_last=False, allocator="tcmalloc"
    ),
    "naive_fp32_tcmalloc": dict(
        memory_efficient=False, amp="none", channels_last=False, allocator="tcmalloc"
    ),
    # fp32 in channels_last: the choice on CPUs without native bf16 (AVX2-only machines).
    "naive_fp32_cl_tcmalloc": dict(
        memory_efficient=False, amp="none", channels_last=True, allocator="tcmalloc"
    ),
}
DEFAULT_MODES = [
    "naive_fp32",
    "efficient_fp32",
    "naive_bf16_cl",
    "efficient_bf16_cl",
    "naive_bf16_cl_tcmalloc",
    "efficient_bf16_cl_tcmalloc",
]
# The ratio baseline, in order of preference: plain naive fp32, else the same with tcmalloc
# (a run that measures only the *_tcmalloc modes still gets a speed-up column).
BASELINE_MODES = ("naive_fp32", "naive_fp32_tcmalloc", "naive_fp32_cl_tcmalloc")
ALLOCATORS = {
    "tcmalloc": ("tcmalloc_minimal", "tcmalloc"),
    "jemalloc": ("jemalloc",),
}


def baselines(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """Per (model, size), the row that speed-up and memory ratio are measured against."""
    base: dict[tuple[str, str], dict] = {}
    for mode in reversed(BASELINE_MODES):  # the preferred mode is written last, so it wins
        base |= {(r["model"], r["size"]): r for r in rows if r["mode"] == mode}
    return base


def find_allocator(name: str) -> str | None:
    """The shared library to LD_PRELOAD for ``name`` (Debian: libtcmalloc-minimal4)."""
    import ctypes.util

    for lib in ALLOCATORS[name]:
        found = ctypes.util.find_library(lib)
        if found:
            return found
    return None


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return own_peak_rss_mb()


def _model(name: str, memory_efficient: bool) -> torch.nn.Module:
    import tiramisu
    from tiramisu.models import DenseBlock

    if name.startswith("block"):  # a synthetic dense block of N layers, k=16, 48 input maps
        n = int(name[5:])

        class Block(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.block = DenseBlock(
                    n, 48, 16, dropout=0.2, conv_bias=True, memory_efficient=memory_efficient
                )
                self.head = torch.nn.Conv2d(48 + 16 * n, 11, 1)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.head(self.block(x.repeat(1, 16, 1, 1)))

        return Block()
    return tiramisu.create_model(name, memory_efficient=memory_efficient)


def build_step(name: str, size: tuple[int, int], mode: str, device: str) -> Callable[[], None]:
    """One training step of ``name`` in ``mode`` on random data, batch 3, as a closure."""
    from tiramisu.hardware import autocast_context

    dev = torch.device(device)
    opts = MODES[mode]
    model = _model(name, opts["memory_efficient"]).to(dev).train()
    fmt = torch.channels_last if opts["channels_last"] else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-3, weight_decay=1e-4)
    x = torch.rand(3, 3, *size, device=dev).contiguous(memory_format=fmt)
    y = torch.randint(0, 11, (3, *size), device=dev)
    net = torch.compile(model) if opts.get("compile") else model

    def step() -> None:
        with autocast_context(dev, opts["amp"]):
            out = net(x)
        loss = torch.nn.functional.cross_entropy(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def worker(name: str, size: tuple[int, int], mode: str, steps: int, device: str) -> dict:
    dev = torch.device(device)
    step = build_step(name, size, mode, device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for i in range(steps + 1):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if i > 0:
            times.append(time.perf_counter() - t0)
    return {
        "model": name,
        "size": f"{size[0]}x{size[1]}",
        "mode": mode,
        "seconds_per_step": statistics.median(times),
        "peak_mb": _peak_mb(dev),
        "minor_page_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt,
        "threads": torch.get_num_threads(),
        "device": str(dev),
    }


def step_flops(name: str, size: tuple[int, int]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = _model(name, False).train()
        x = torch.empty(3, 3, *size)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x).sum().backward()
    return counter.get_total_flops()


def roofline(device: str) -> dict:
    """Best-of-5 GFLOP/s of a 2048^3 matrix multiply in fp32 and bf16."""
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(2048, 2048, device=device, dtype=dtype)
        b = torch.randn(2048, 2048, device=device, dtype=dtype)
        best = float("inf")
        for _ in range(5):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            a @ b
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        out[str(dtype).removeprefix("torch.")] = 2 * 2048**3 / best / 1e9
    return out


def run_child(args: list[str], preload: str | None = None) -> dict | None:
    env = dict(os.environ)
    if preload:
        env["LD_PRELOAD"] = preload
    proc = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        print(f"{' '.join(args)}: failed\n{proc.stderr[-600:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["fcdensenet56", "fcdensenet67", "fcdensenet103"])
    p.add_argument("--sizes", nargs="+", default=["224x224", "360x480"])
    p.add_argument("--modes", nargs="+", default=DEFAULT_MODES, choices=list(MODES))
    p.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--depth-scaling",
        action="store_true",
        help="instead: one dense block of 10, 20, 40, 80 layers at 45x60",
    )
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--worker", nargs=3, metavar=("MODEL", "SIZE", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        name, size, mode = args.worker
        h, w = (int(v) for v in size.split("x"))
        print(json.dumps(worker(name, (h, w), mode, args.steps, args.device)))
        return

    if args.depth_scaling:
        models, sizes = [f"block{n}" for n in (10, 20, 40, 80)], ["45x60"]
        modes = [m for m in args.modes if m in ("naive_fp32", "efficient_fp32")]
    else:
        models, sizes, modes = args.models, args.sizes, args.modes
    roof = roofline(args.device)
    rows = []
    for name in models:
        for size in sizes:
            h, w = (int(v) for v in size.split("x"))
            flops = step_flops(name, (h, w))
            for mode in modes:
                preload = None
                if MODES[mode].get("allocator") and args.device.startswith("cuda"):
                    continue
                if MODES[mode].get("allocator"):
                    preload = find_allocator(MODES[mode]["allocator"])
                    if preload is None:
                        print(f"  {mode}: skipped, {MODES[mode]['allocator']} not found")
                        continue
                row = run_child(
                    [
                        "--worker",
                        name,
                        size,
                        mode,
                        "--steps",
                        str(args.steps),
                        "--device",
                        args.device,
                    ],
                    preload,
                )
                if row is None:
                    continue
                row["gflop_per_step"] = flops / 1e9
                row["achieved_gflops"] = flops / 1e9 / row["seconds_per_step"]
                rows.append(row)
                print(
                    f"  {name} {size} {mode}: {row['seconds_per_step']:.2f} s/step, "
                    f"{row['peak_mb']:.0f} MB",
                    file=sys.stderr,
                    flush=True,
                )
    base = baselines(rows)
    mem = "peak GPU MB" if args.device.startswith("cuda") else "peak RSS MB"
    print(
        f"\nTraining step, batch 3, device {args.device}, threads "
        f"{rows[0]['threads'] if rows else '?'}; matmul roofline: "
        f"{roof['float32']:.0f} GFLOP/s fp32, {roof['bfloat16']:.0f} GFLOP/s bf16\n"
    )
    print(
        f"| model | size | mode | s/step | speed-up | {mem} | memory ratio | GFLOP/step "
        f"| achieved GFLOP/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        b = base.get((r["model"], r["size"]))
        sp = f"{b['seconds_per_step'] / r['seconds_per_step']:.2f}x" if b else "-"
        mr = f"{r['peak_mb'] / b['peak_mb']:.2f}x" if b else "-"
        print(
            f"| {r['model']} | {r['size']} | {r['mode']} | {r['seconds_per_step']:.2f} | {sp} "
            f"| {r['peak_mb']:.0f} | {mr} | {r['gflop_per_step']:.0f} "
            f"| {r['achieved_gflops']:.0f} |"
        )
    for (model, size), b in sorted(base.items()):
        if b["mode"] != "naive_fp32":
            print(f"\n{model} {size}: naive_fp32 was not run; ratios are against {b['mode']}")
    if args.json:
        from pathlib import Path

        Path(args.json).write_text(json.dumps({"roofline": roof, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
