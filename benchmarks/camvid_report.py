"""Reproduction report for a CamVid training run, and publishing its weights.

    python benchmarks/camvid_report.py weights/camvid_fcdensenet56 \\
        --name fcdensenet56-camvid --publish --command "..."

writes ``results/camvid/<model>.md`` (learning curves, best epoch, val mIoU / global accuracy /
per-class IoU beside the paper's Table 3, wall time, hardware, the command), draws the curves
next to it, and with ``--publish`` exports ``best.pt`` as the fp16 set ``--name`` inside the
package (``tiramisu.from_pretrained(name)``), recording its metrics in the pretrained index.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from tiramisu import Segmenter, zoo
from tiramisu.checkpoint import load_checkpoint
from tiramisu.data import CAMVID_CLASSES, CAMVID_COLORS
from tiramisu.hardware import flush_denormals
from tiramisu.inference import colorize, legend_image
from tiramisu.metrics import PAPER_CAMVID, format_report
from tiramisu.plots import plot_history
from tiramisu.training import evaluate_checkpoint
from tiramisu.training.report import format_machine_segments, machine_segments


def examples(segmenter: Segmenter, data_root: Path, dest: Path, count: int = 4) -> list[str]:
    """A grid of validation frames: photo | ground truth | prediction, at half resolution.

    The frames are spread evenly over the sorted val split (so every report shows the same
    ones); void pixels are black in the ground truth. Returns the frame names.
    """
    frames = sorted((data_root / "val").glob("*.png"))
    if not frames:
        raise SystemExit(f"camvid_report: {data_root / 'val'}: no frames for the examples")
    picked = [frames[round(i * (len(frames) - 1) / max(count - 1, 1))] for i in range(count)]
    rows = []
    for frame in picked:
        photo = np.asarray(Image.open(frame).convert("RGB"))
        truth = np.asarray(Image.open(data_root / "valannot" / frame.name))
        prediction = segmenter.predict(photo)
        cells = [photo, colorize(truth, CAMVID_COLORS), colorize(prediction, CAMVID_COLORS)]
        rows.append(np.concatenate(cells, axis=1))
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    grid = grid.resize((grid.width // 2, grid.height // 2), Image.Resampling.BILINEAR)
    legend = Image.fromarray(legend_image(list(CAMVID_CLASSES), CAMVID_COLORS))
    canvas = Image.new("RGB", (grid.width + legend.width, grid.height), "white")
    canvas.paste(grid, (0, 0))
    canvas.paste(legend, (grid.width, 0))
    grid = canvas
    dest.parent.mkdir(parents=True, exist_ok=True)
    grid.save(dest, quality=85)
    return [f.stem for f in picked]


def flip_tta_line(best: dict, data_root: Path) -> str:
    """The best checkpoint on the val frames with flip test-time augmentation (not in the paper)."""
    tta = evaluate_checkpoint(best, "val", data_root=str(data_root), quiet=True, tta=True)
    return (
        f"- with flip test-time augmentation (`tiramisu evaluate --tta`, not used in the paper): "
        f"val mIoU {100 * tta['miou']:.2f} %, global accuracy {100 * tta['global_accuracy']:.2f} %"
    )


def recent_val_line(history: list[dict], count: int = 10) -> str:
    """The last validated epochs' mIoU, beside the best epoch's.

    The best epoch is chosen on the validation frames themselves, so its score is the top of a
    noisy series (epoch-to-epoch swings of 2-3 points here) and flatters the model; the recent
    mean is what a reader should expect from a late epoch picked without looking.
    """
    scores = [r["val_miou"] for r in history if r.get("val_miou") is not None][-count:]
    if not scores:
        return "- no validated epoch yet"
    mean = sum(scores) / len(scores)
    return (
        f"- val mIoU over the last {len(scores)} validated epochs: mean {100 * mean:.2f} %, "
        f"range {100 * min(scores):.2f}-{100 * max(scores):.2f} % (the best epoch is picked on "
        f"these same frames, so its score is optimistic)"
    )


def epoch_minutes(segments: list[dict]) -> dict[str, list[float]]:
    """Per stage, the shortest and longest whole epoch (train + validation) in minutes."""
    spans: dict[str, list[float]] = {}
    for seg in segments:
        if seg["epoch_minutes"] is None:
            continue
        lo, hi = spans.get(seg["stage"], seg["epoch_minutes"])
        spans[seg["stage"]] = [min(lo, seg["epoch_minutes"][0]), max(hi, seg["epoch_minutes"][1])]
    return {stage: [round(lo, 1), round(hi, 1)] for stage, (lo, hi) in spans.items()}


def report(
    run: Path, out: Path, command: str, status: str, data_root: Path, tta: bool = False
) -> dict:
    ckpt = load_checkpoint(run / "best.pt")
    last = load_checkpoint(run / "last.pt")
    config, history = last["config"], last["history"]
    segments = machine_segments(history)
    metrics = ckpt["val_metrics"]
    name = config["model"]["name"]
    wall = sum(seg["wall_seconds"] for seg in segments)
    figures = out / name
    figures.mkdir(parents=True, exist_ok=True)
    # Drawn afresh from the history rather than copied from the run folder, whose curves are
    # whatever the training process's (possibly older) code drew.
    plot_history(history, figures, "segmentation")
    table = format_report(metrics, list(CAMVID_CLASSES), PAPER_CAMVID.get(name))
    best = ckpt["best"]
    lines = [
        f"# {name} on CamVid",
        "",
        f"Status: {status}",
        "",
        f"- best epoch: {best['epoch']} ({best['stage']} stage) of {len(history)} run so far "
        f"(last: {last['stage']} epoch {last['epoch']})",
        f"- val mIoU {100 * metrics['miou']:.2f} %, global accuracy "
        f"{100 * metrics['global_accuracy']:.2f} %, mean class accuracy "
        f"{100 * metrics['mean_class_accuracy']:.2f} %",
        recent_val_line(history),
        *([flip_tta_line(ckpt, data_root)] if tta else []),
        f"- training wall time so far: {wall / 3600:.2f} h (train + validation, summed over "
        f"epochs)",
        f"- recipe: configs/{Path(command.split('--config ')[-1].split()[0]).name}"
        if "--config " in command
        else "- recipe: see config.yaml",
        "",
        "Reproduce (or continue) it with:",
        "",
        "```bash",
        command,
        "```",
        "",
        "Where it trained (consecutive epochs on one machine in one precision; runs move between",
        "the machines that sessions are given; minutes and hours include validation, and a wide",
        "range of minutes under one label means the label covers machines of different speed):",
        "",
        format_machine_segments(segments),
        "",
        "Per-class IoU on the 101 validation frames beside the paper's Table 3 (test set):",
        "",
        "```",
        table,
        "```",
        "",
        f"![loss]({name}/loss.png) ![val mIoU]({name}/miou.png)",
        "",
    ]
    if (data_root / "val").is_dir():
        # The weights as users get them: best.pt through the same Segmenter as `predict`.
        shown = examples(Segmenter.load(run / "best.pt"), data_root, figures / "examples.jpg")
        lines += [
            f"Validation frames {', '.join(shown)} (columns: image, ground truth with void in "
            "black, prediction of the best epoch):",
            "",
            f"![examples]({name}/examples.jpg)",
            "",
        ]
    (out / f"{name}.md").write_text("\n".join(lines))
    return {
        "model": name,
        "val_miou": metrics["miou"],
        "val_global_accuracy": metrics["global_accuracy"],
        "best_epoch": best["epoch"],
        "best_stage": best["stage"],
        "epochs_run": len(history),
        "wall_hours": wall / 3600,
        "epoch_minutes": epoch_minutes(segments),
        "machines": [
            {k: seg[k] for k in ("stage", "first_epoch", "last_epoch", "machine", "precision")}
            | {
                "train_images_per_s": round(seg["train_images_per_s"], 3),
                "hours": round(seg["wall_seconds"] / 3600, 3),
                "epoch_minutes": seg["epoch_minutes"]
                and [round(m, 1) for m in seg["epoch_minutes"]],
            }
            for seg in segments
        ],
    }


def write_index(out: Path) -> None:
    """``results/camvid/README.md``: every published set, trained or not, with its status."""
    rows = [
        "# CamVid reproduction",
        "",
        "Validation mIoU of the models trained with the paper's recipe (`configs/`), beside the",
        "paper's test-set figures; per-model reports (curves, per-class IoU, wall time, hardware,",
        "command) are linked. The weights ship with the package: `tiramisu list-pretrained`.",
        "Check a shipped set on your copy of CamVid (the test split too, which is not here):",
        "`tiramisu evaluate --checkpoint fcdensenet56-camvid --data-root PATH/TO/CamVid "
        "--split test`.",
        "",
        "| model | status | epochs run | best epoch | val mIoU % | val global acc % | paper mIoU % "
        "(test) | report |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for entry in zoo.list_pretrained():
        paper = PAPER_CAMVID.get(entry.model, {}).get("miou", "")
        summary_path = out / f"{entry.model}.json"
        if summary_path.exists():
            s = json.loads(summary_path.read_text())
            # Epochs count from 1 again in the fine-tuning stage, so a bare number is ambiguous.
            best_epoch = f"{s.get('best_stage', '')} {s['best_epoch']}".strip()
            rows.append(
                f"| {entry.model} | {entry.notes or 'trained'} | {s['epochs_run']} | "
                f"{best_epoch} | {100 * s['val_miou']:.1f} | "
                f"{100 * s['val_global_accuracy']:.1f} | {paper} | "
                f"[{entry.model}.md]({entry.model}.md) |"
            )
        else:
            rows.append(f"| {entry.model} | {entry.notes} | 0 | - | - | - | {paper} | - |")
    cpu_times = ""
    reference = out / "fcdensenet56.json"
    if reference.exists():
        spans = json.loads(reference.read_text()).get("epoch_minutes", {})
        stages = {"train": "of 224x224 crops", "finetune": "of its full-frame fine-tuning"}
        cpu_times = ", and ".join(
            f"{spans[stage][0]:.0f}-{spans[stage][1]:.0f} min per epoch {what}"
            for stage, what in stages.items()
            if stage in spans
        )
    if cpu_times:
        cpu_times = f" (FC-DenseNet56 takes {cpu_times}, validation included)"
    (out / "README.md").write_text("\n".join(rows) + "\n\n" + GPU_PLAN.format(cpu_times=cpu_times))


# What a session lent the `device` GPU machine has to plan around, worked out on 2026-11-23 and
# revised on 2026-12-02 when device time per session fell to 15 minutes (sizes measured here;
# the limits are the device tool's).
GPU_PLAN = """\
## What the untrained sets need: a session with a GPU

FC-DenseNet67/103 are out of reach of a 2-core CPU{cpu_times}.
A session lent the `device` machine (15 min of device time including its start of a few
minutes, 10 min per command, at most 64 MiB of working tree in, at most 8 files of 16 MiB
back) has to plan around sizes and minutes:

- The tracked tree is ~27 MB. CamVid's PNGs (119 MB) do not travel;
  `python benchmarks/pack_camvid.py ../shared/datasets/camvid .camvid_pack` re-encodes train +
  val as JPEG quality 92 without chroma subsampling (29 MB, PSNR >= 38.5 dB) beside the label
  PNGs (3.8 MB): 33 MB, which fits when carried (`.camvid_pack` in `.git/info/exclude`). The
  published figures come from `tiramisu evaluate --checkpoint ... --data-root
  ../shared/datasets/camvid` on the original PNGs, here.
- The exact resume state (fp32 weights + RMSprop state) is ~12 MB for FC-DenseNet56, ~28 MB for
  FC-DenseNet67 and ~75 MB for FC-DenseNet103: 56 goes in and comes back; 67 does not fit
  beside the tree and the packed data (27 + 28 + 33 MB > 64 MiB), and 103 cannot pass through
  at all (a session could bring back its fp32 weights, ~38 MB, in parts under 16 MiB).
- One prepared call does the session's work: `run(command="bash benchmarks/gpu_session.sh",
  carry=[".camvid_pack"], timeout_s=590)` first measures the CUDA figures nobody has measured
  (`benchmarks/train_step.py --device cuda`: step time, images/s, `torch.cuda.max_memory_allocated`,
  naive vs memory-efficient, fp32 vs bf16, FC-DenseNet103 and 56, about 2-3 minutes), then
  resumes the FC-DenseNet56 run (`weights/camvid_fcdensenet56` is tracked and travels) with
  `train.whole_epochs=true` and `train.max_minutes` set to what is left, so the chunk ends
  between epochs inside the command's limit, and tars the run folder into parts under 16 MiB
  in `$OUT`. Back here: `cat FILES_AT/run.tar.part-* | tar -x -C weights/`, then this report
  with `--publish` (GPU epoch time: not measured yet).
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="run folder with best.pt and last.pt")
    parser.add_argument("--out", type=Path, default=Path("results/camvid"))
    parser.add_argument("--name", help="pretrained set name, e.g. fcdensenet56-camvid")
    parser.add_argument("--publish", action="store_true", help="export best.pt as the named set")
    parser.add_argument("--command", required=True, help="the command that trains/continues it")
    parser.add_argument("--status", default="", help="a sentence on how far the run is")
    parser.add_argument(
        "--data-root",
        type=Path,
        default=Path("../shared/datasets/camvid"),
        help="CamVid, for the example predictions (skipped when it has no val/ folder)",
    )
    parser.add_argument(
        "--tta", action="store_true", help="also evaluate best.pt with flip TTA (minutes on CPU)"
    )
    args = parser.parse_args()
    flush_denormals()  # as the CLI does: the checkpoint's subnormal weights slow some CPUs down
    summary = report(args.run, args.out, args.command, args.status, args.data_root, args.tta)
    (args.out / f"{summary['model']}.json").write_text(json.dumps(summary, indent=2) + "\n")
    if args.publish:
        index = zoo.load_index()
        old = index.get(args.name)
        entry = zoo.publish(
            args.run / "best.pt",
            args.name,
            dataset=old.dataset if old else "CamVid",
            recipe=args.command,
            hub_repo=old.hub_repo if old else None,
            notes=args.status,
            metrics={
                k: summary[k]
                for k in (
                    "val_miou",
                    "val_global_accuracy",
                    "best_epoch",
                    "best_stage",
                    "epochs_run",
                )
            },
        )
        print(f"published {entry.name}: {entry.sha256}")
    write_index(args.out)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
