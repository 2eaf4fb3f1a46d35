"""Inference speed and peak memory: eager fp32 vs bf16 (vs bf16 + channels_last) vs ONNX Runtime.

    python benchmarks/inference.py                              # 56/67/103, 360x480, batch 1 and 8
    python benchmarks/inference.py --models fcdensenet56 --batches 1 --repeats 5

Each configuration runs in a fresh process (so peak RSS is its own), on random-weight models in
eval mode, after one warm-up pass; the ONNX file is exported before timing starts. Ratios are
against eager fp32 for the same model and batch, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _memory import own_peak_rss_mb  # benchmarks/_memory.py

MODES = ["eager_fp32", "eager_bf16", "eager_bf16_cl", "onnxruntime"]


def worker(model_name: str, batch: int, mode: str, size: tuple[int, int], repeats: int) -> dict:
    import tiramisu
    from tiramisu.hardware import autocast_context

    model = tiramisu.create_model(model_name).eval()
    x = torch.rand(batch, 3, *size)
    if mode == "onnxruntime":
        import onnxruntime as ort

        from tiramisu.export import export_onnx

        config = {
            "bn_eval": "running",
            "preprocessing": {"channels": 3},
            "model_config": model.config,
        }
        with tempfile.TemporaryDirectory() as tmp:
            path = export_onnx(model, config, Path(tmp) / "m.onnx")
            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            session = ort.InferenceSession(str(path), options)
        del model

        def run() -> None:
            session.run(None, {"image": x.numpy()})
    else:
        amp = "bf16" if "bf16" in mode else "none"
        if mode.endswith("_cl"):
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)

        def run() -> None:
            with torch.inference_mode(), autocast_context(torch.device("cpu"), amp):
                model(x)

    run()  # warm-up (allocations, oneDNN primitive caches)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    best = min(times)
    return {
        "model": model_name,
        "batch": batch,
        "mode": mode,
        "images_per_s": batch / best,
        "seconds_per_batch": best,
        "peak_rss_mb": own_peak_rss_mb(),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["fcdensenet56", "fcdensenet67", "fcdensenet103"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    p.add_argument("--size", default="360x480")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--worker", nargs=3, metavar=("MODEL", "BATCH", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    if args.worker:
        name, batch, mode = args.worker
        print(json.dumps(worker(name, int(batch), mode, size, args.repeats)))
        return

    rows = []
    for name in args.models:
        for batch in args.batches:
            for mode in args.modes:
                proc = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--worker",
                        name,
                        str(batch),
                        mode,
                        "--size",
                        args.size,
                        "--repeats",
                        str(args.repeats),
                    ],
                    capture_output=True,
                    text=True,
                )
                if proc.returncode != 0:
                    print(
                        f"{name} batch {batch} {mode}: failed\n{proc.stderr[-800:]}",
                        file=sys.stderr,
                    )
                    continue
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(
                    f"  {name} b{batch} {mode}: {row['images_per_s']:.2f} img/s, "
                    f"{row['peak_rss_mb']:.0f} MB",
                    file=sys.stderr,
                    flush=True,
                )
    base = {(r["model"], r["batch"]): r for r in rows if r["mode"] == "eager_fp32"}
    print(
        f"\nFC-DenseNet inference at {args.size}, CPU threads: "
        f"{rows[0]['threads'] if rows else '?'}; ratios vs eager fp32 in the same run\n"
    )
    print("| model | batch | mode | images/s | speed-up | peak RSS MB | memory ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        b = base.get((r["model"], r["batch"]))
        speed = f"{r['images_per_s'] / b['images_per_s']:.2f}x" if b else "-"
        mem = f"{r['peak_rss_mb'] / b['peak_rss_mb']:.2f}x" if b else "-"
        print(
            f"| {r['model']} | {r['batch']} | {r['mode']} | {r['images_per_s']:.2f} | {speed} "
            f"| {r['peak_rss_mb']:.0f} | {mem} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
