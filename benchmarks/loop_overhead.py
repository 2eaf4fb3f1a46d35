"""Training-loop speed of this tree against another revision, in the same run.

    python benchmarks/loop_overhead.py --baseline-rev 13366dd --repeats 3

checks the baseline revision out into a temporary git worktree, then alternates short
``tiramisu train`` runs (synthetic 96x128 scenes, FC-DenseNet56 at its paper width, a fixed
number of steps) between the two source trees, each in a fresh process, and reports the median
seconds per training step of each and their ratio. Alternating cancels most of the drift of a
shared, noisy machine. Used to check that a refactoring of the training package left the loop
as fast as it was.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def run_once(src: Path, data: Path, out: Path, steps: int, amp: str) -> float:
    sets = [
        "data.dataset=synthetic",
        f"data.root={data}",
        "data.crop_size=[96, 96]",
        "model.name=fcdensenet56",
        "train.epochs=2",
        "train.batch_size=3",
        "train.val_every=100",
        f"train.max_steps_per_epoch={steps}",
        f"train.amp={amp}",
        "train.patience=null",
    ]
    args = [sys.executable, "-m", "tiramisu.cli", "train", "--out", str(out), "--quiet"]
    for s in sets:
        args += ["--set", s]
    env = {**os.environ, "PYTHONPATH": str(src / "src")}
    subprocess.run(args, env=env, check=True, capture_output=True, text=True)
    rows = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    # The second epoch: the first pays for oneDNN's kernel selection.
    return rows[-1]["train_time_s"] / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-rev", required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--amp", default="auto")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        base = tmp_path / "baseline"
        subprocess.run(
            ["git", "-C", str(HERE), "worktree", "add", "--detach", str(base), args.baseline_rev],
            check=True,
            capture_output=True,
        )
        try:
            sys.path.insert(0, str(HERE / "src"))
            from tiramisu.data import make_synthetic_dataset

            data = make_synthetic_dataset(tmp_path / "data", n_train=48, n_val=4, size=(96, 128))
            times: dict[str, list[float]] = {"baseline": [], "current": []}
            for r in range(args.repeats):
                for name, src in (("baseline", base), ("current", HERE)):
                    out = tmp_path / f"{name}{r}"
                    times[name].append(run_once(src, data, out, args.steps, args.amp))
                    print(f"{name:8s} run {r}: {times[name][-1]:.3f} s/step", flush=True)
        finally:
            subprocess.run(
                ["git", "-C", str(HERE), "worktree", "remove", "--force", str(base)],
                check=False,
                capture_output=True,
            )
    medians = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "baseline_rev": args.baseline_rev,
        "steps": args.steps,
        "amp": args.amp,
        "s_per_step": medians,
        "runs": times,
        "current_over_baseline": medians["current"] / medians["baseline"],
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
