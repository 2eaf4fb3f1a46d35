"""What subnormal floats in a trained model cost on this CPU, and what flushing them to zero saves.

    python benchmarks/subnormals.py                                  # the CamVid FC-DenseNet56 run
    python benchmarks/subnormals.py --checkpoint RUN/last.pt --steps 3 --json out.json

A long-trained network holds subnormal weights and optimizer state (RMSprop's running averages,
weights that weight decay pushes towards zero). Some x86 CPUs compute on subnormals through a
slow path; ``tiramisu`` therefore flushes them to zero (``hardware.flush_denormals``). This runs a
training step (batch 3, 224x224, RMSprop with the checkpoint's optimizer state) and a full-frame
forward pass (1x360x480, no grad) from the checkpoint, each in a fresh process under the same
allocator, three ways: subnormals ``kept``; ``zeroed`` once in the loaded weights and optimizer
state (no global flag); ``flushed`` by the CPU flag, set before PyTorch starts its threads.
Speed-ups are against ``kept``. Random inputs: the point is the weights, not the data.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from train_step import find_allocator  # benchmarks/train_step.py

TREATMENTS = ("kept", "zeroed", "flushed")


def count_subnormal(tensors: list[torch.Tensor]) -> int:
    from tiramisu.hardware import subnormal_mask

    return sum(int(subnormal_mask(t).sum()) for t in tensors if t.dtype == torch.float32)


def worker(checkpoint: str, workload: str, treatment: str, steps: int) -> dict:
    if treatment == "flushed":
        torch.set_flush_denormal(True)  # before the first parallel op, as the CLI does
    from tiramisu.checkpoint import load_checkpoint
    from tiramisu.hardware import zero_subnormals_
    from tiramisu.models.registry import build_architecture

    ckpt = load_checkpoint(checkpoint)
    model = build_architecture(ckpt["model_class"], ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    params = list(model.parameters())
    opt = torch.optim.RMSprop(params, lr=1e-4, weight_decay=1e-4)
    opt.load_state_dict(ckpt["optimizer"])
    subnormal_weights = count_subnormal(params)
    state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    subnormal_state = count_subnormal(state)
    if treatment == "zeroed":
        zero_subnormals_([*params, *model.buffers(), *state])
    classes = len(ckpt["labels"]) if ckpt.get("labels") else 11
    gen = torch.Generator().manual_seed(0)
    if workload == "train_step":
        model.train()
        x = torch.rand(3, 3, 224, 224, generator=gen)
        y = torch.randint(0, classes, (3, 224, 224), generator=gen)

        def run() -> None:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    else:
        model.eval()
        x = torch.rand(1, 3, 360, 480, generator=gen)

        def run() -> None:
            with torch.no_grad():
                model(x)

    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        run()
        if i > 0:
            times.append(time.perf_counter() - t0)
    return {
        "workload": workload,
        "treatment": treatment,
        "seconds": statistics.median(times),
        "subnormal_weights": subnormal_weights,
        "subnormal_optimizer_state": subnormal_state,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="weights/camvid_fcdensenet56/last.pt")
    p.add_argument("--steps", type=int, default=2, help="timed repetitions after one warm-up")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--worker", nargs=2, metavar=("WORKLOAD", "TREATMENT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        workload, treatment = args.worker
        print(json.dumps(worker(args.checkpoint, workload, treatment, args.steps)))
        return

    env = dict(os.environ)
    preload = find_allocator("tcmalloc")
    if preload:
        env["LD_PRELOAD"] = preload
    rows = []
    for workload in ("train_step", "inference"):
        for treatment in TREATMENTS:
            cmd = [sys.executable, __file__, "--worker", workload, treatment]
            cmd += ["--checkpoint", args.checkpoint, "--steps", str(args.steps)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"  {workload} {treatment}: {rows[-1]['seconds']:.2f} s", file=sys.stderr)
    r0 = rows[0]
    print(
        f"\n{args.checkpoint}: {r0['subnormal_weights']} subnormal weights, "
        f"{r0['subnormal_optimizer_state']} subnormal optimizer-state values; "
        f"{r0['threads']} threads, allocator {preload or 'glibc'}\n"
    )
    print("| workload | subnormals | s | speed-up |")
    print("|---|---|---|---|")
    kept = {r["workload"]: r["seconds"] for r in rows if r["treatment"] == "kept"}
    for r in rows:
        speedup = kept[r["workload"]] / r["seconds"]
        print(f"| {r['workload']} | {r['treatment']} | {r['seconds']:.2f} | {speedup:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"preload": preload, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
