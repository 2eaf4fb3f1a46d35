"""The ``tiramisu`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import TiramisuError

# The precisions evaluate, predict and app accept (auto: bf16 where the hardware has it).
AMP_CHOICES = ["auto", "none", "bf16", "fp16"]


def _parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 360x480, got {text!r}") from None
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return h, w


def cmd_summary(args: argparse.Namespace) -> int:
    from .models import create_model
    from .summary import format_table, summarize, to_dot, to_json

    overrides = {}
    if args.num_classes is not None:
        overrides["num_classes"] = args.num_classes
    if args.upsampling is not None:
        overrides["upsampling"] = args.upsampling
    model = create_model(args.name, **overrides)
    summary = summarize(model, size=args.size, batch=args.batch)
    if args.format == "dot":
        print(to_dot(model, summary), end="")  # to_dot ends with its own newline
    else:
        print(format_table(summary) if args.format == "table" else to_json(summary))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from .models import list_models, model_info

    for name in list_models(args.pattern):
        print(f"{name:22s} {model_info(name)[2]}")
    return 0


def cmd_list_pretrained(args: argparse.Namespace) -> int:
    from .zoo import list_pretrained

    sets = list_pretrained()
    if args.format == "json":
        import json

        print(json.dumps([s.__dict__ | {"trained": s.trained} for s in sets], indent=2))
        return 0
    print(f"{'name':22s} {'status':12s} {'val mIoU':>8s} {'val acc':>8s}  recipe")
    for s in sets:
        miou, acc = s.metrics.get("val_miou"), s.metrics.get("val_global_accuracy")
        print(
            f"{s.name:22s} {'trained' if s.trained else 'not trained':12s} "
            f"{f'{100 * miou:.1f}' if miou is not None else '-':>8s} "
            f"{f'{100 * acc:.1f}' if acc is not None else '-':>8s}  {s.recipe}"
        )
        if s.notes:
            print(f"{'':22s} {s.notes}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from .config import defaults_dict, load_config, reference_table

    if args.reference:
        print(reference_table())
        return 0
    import yaml

    cfg = load_config(args.config).to_dict() if args.config else defaults_dict()
    print(yaml.safe_dump(cfg, sort_keys=False), end="")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .training import train

    overrides = list(args.set or [])
    if args.data_root is not None:
        overrides.append(f"data.root={args.data_root}")
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    cfg = load_config(args.config, overrides)
    if args.out is not None:
        out = Path(args.out)
    else:
        out = Path("runs") / (Path(args.config).stem if args.config else cfg.model.name)
    train(
        cfg,
        out,
        resume=args.resume,
        device=args.device,
        quiet=args.quiet,
        resume_overrides=overrides,
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint
    from .pretrained import is_training_checkpoint
    from .training import evaluate_checkpoint, evaluate_pretrained

    json_path = Path(args.json) if args.json else None
    if is_training_checkpoint(args.checkpoint):
        if args.config:
            raise TiramisuError(
                f"{args.checkpoint}: --config is for exported weights; a training checkpoint "
                "carries its own data config (--data-root points it at another copy)"
            )
        out = Path(args.out) if args.out else Path(args.checkpoint).parent / f"eval_{args.split}"
        evaluate_checkpoint(
            load_checkpoint(args.checkpoint),
            args.split,
            data_root=args.data_root,
            out_dir=out,
            json_path=json_path,
            device=args.device,
            tta=args.tta,
            amp=args.amp,
        )
        return 0
    # Exported weights may be a shipped name or live inside the installed package: the
    # report goes to the working directory, never beside them.
    name = Path(str(args.checkpoint).rstrip("/")).name
    evaluate_pretrained(
        args.checkpoint,
        args.split,
        data_root=args.data_root,
        data_config=args.config,
        out_dir=Path(args.out) if args.out else Path(f"eval_{name}_{args.split}"),
        json_path=json_path,
        device=args.device,
        tta=args.tta,
        amp=args.amp or "auto",
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), epochs=args.epochs, device=args.device)
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from .data.download import download_camvid

    if args.dataset != "camvid":
        raise ValueError(f"unknown dataset {args.dataset!r}")
    path = download_camvid(args.dir)
    print(f"CamVid is in {path}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .hardware import resolve_device
    from .imageio import set_max_pixels
    from .inference import Segmenter, expand_inputs, predict_files, read_colors

    if args.overlap is not None and args.tile is None:
        raise ValueError("--overlap needs --tile")
    set_max_pixels(args.max_pixels)
    segmenter = Segmenter.load(
        args.checkpoint,
        device=resolve_device(args.device),
        amp=args.amp,
        channels_last=args.channels_last,
        compile=args.compile,
    )
    colors = read_colors(args.colors, segmenter.classes) if args.colors else None
    skip = None
    if args.skip_class is not None:
        names = segmenter.classes
        if args.skip_class in names:
            skip = names.index(args.skip_class)
        elif args.skip_class.isdigit() and int(args.skip_class) < len(names):
            skip = int(args.skip_class)
        else:
            raise ValueError(
                f"--skip-class {args.skip_class!r}: not a class of this model ({', '.join(names)})"
            )
    paths, problems = expand_inputs(args.inputs)
    if args.legend:
        from .inference import legend_image, save_image_atomic

        Path(args.out).mkdir(parents=True, exist_ok=True)
        save_image_atomic(
            legend_image(segmenter.classes, colors or segmenter.colors),
            Path(args.out) / "legend.png",
        )
    done, failed = predict_files(
        segmenter,
        paths,
        Path(args.out),
        batch_size=args.batch_size,
        tta=args.tta,
        tile=args.tile,
        overlap=args.overlap if args.overlap is not None else 64,
        save_overlay=args.overlay,
        save_probs=args.probs,
        alpha=args.alpha,
        progress=not args.quiet,
        colors=colors,
        skip_class=skip,
        outline=args.outline,
    )
    problems += failed
    for p in problems:
        print(f"tiramisu: skipped: {p}", file=sys.stderr)
    print(
        f"segmented {done} image(s) into {args.out}"
        + (f"; {len(problems)} problem(s)" if problems else "")
    )
    return 1 if problems else 0


def cmd_export_weights(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint
    from .pretrained import build_model, check_state_dict, config_from_checkpoint, save_pretrained

    ckpt = load_checkpoint(args.checkpoint)
    config = config_from_checkpoint(ckpt)
    model = build_model(config)
    check_state_dict(model, ckpt["model"], config, args.checkpoint)
    model.load_state_dict(ckpt["model"])
    save_pretrained(model, config, args.out)
    print(f"wrote {args.out}/config.json and model.safetensors")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_onnx, export_torchscript
    from .pretrained import load_any

    model, config = load_any(args.checkpoint)
    if args.format == "onnx":
        export_onnx(model, config, args.out, opset=args.opset)
    else:
        export_torchscript(model, config, args.out)
    print(f"wrote {args.out}")
    return 0


def cmd_app(args: argparse.Namespace) -> int:
    from .app import launch

    launch(args.checkpoint, host=args.host, port=args.port, device=args.device, amp=args.amp)
    return 0


def _add_list(sub: Any) -> None:
    p = sub.add_parser("list", help="list the registered models")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'fcdense*'")
    p.set_defaults(func=cmd_list)


def _add_list_pretrained(sub: Any) -> None:
    p = sub.add_parser(
        "list-pretrained", help="published weight sets, their validation scores and recipes"
    )
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_list_pretrained)


def _add_summary(sub: Any) -> None:
    p = sub.add_parser("summary", help="per-stage architecture, parameters and FLOPs of a model")
    p.add_argument("name", help="a registered model name (see 'tiramisu list')")
    p.add_argument(
        "--size",
        type=_parse_size,
        default=(360, 480),
        metavar="HxW",
        help="input height x width (default 360x480)",
    )
    p.add_argument("--batch", type=int, default=1, help="batch size for the FLOP count")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument(
        "--upsampling",
        choices=["transposed", "bilinear"],
        default=None,
        help="FC-DenseNet upsampling operator",
    )
    p.add_argument(
        "--format",
        choices=["table", "json", "dot"],
        default="table",
        help="table (default), json, or Graphviz dot (pipe into 'dot -Tsvg')",
    )
    p.set_defaults(func=cmd_summary)


def _add_config(sub: Any) -> None:
    p = sub.add_parser(
        "config", help="print the full resolved config, or the reference of every key"
    )
    p.add_argument("--config", help="YAML config to resolve (default: the built-in defaults)")
    p.add_argument("--reference", action="store_true", help="markdown table of every key")
    p.set_defaults(func=cmd_config)


def _add_train(sub: Any) -> None:
    p = sub.add_parser("train", help="train a model from a YAML config")
    p.add_argument("--config", help="YAML config (see configs/); defaults fill the rest")
    p.add_argument("--data-root", help="dataset folder (sets data.root)")
    p.add_argument("--out", help="run folder (default runs/CONFIG_NAME)")
    p.add_argument("--epochs", type=int, help="sets train.epochs")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set train.lr=5e-4 (repeatable)",
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    p.set_defaults(func=cmd_train)


def _add_evaluate(sub: Any) -> None:
    p = sub.add_parser(
        "evaluate", help="evaluate a checkpoint or exported weights on full-size frames"
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a training checkpoint (.pt), an exported weights folder, a shipped name "
        "(tiramisu list-pretrained) or a Hugging Face Hub id",
    )
    p.add_argument(
        "--data-root",
        help="dataset folder (default: the one the run used; required for exported weights)",
    )
    p.add_argument(
        "--config",
        help="exported weights: a run config whose data section describes a custom layout "
        "(pair lists, suffixes, label_map, palette)",
    )
    p.add_argument(
        "--tta", action="store_true", help="average with horizontally mirrored predictions"
    )
    p.add_argument("--split", default="val", choices=["train", "val", "test"])
    p.add_argument("--json", help="also write the metrics to this JSON file")
    p.add_argument("--out", help="folder for the report and confusion matrix")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--amp",
        choices=AMP_CHOICES,
        help="precision (default: a checkpoint's training setting; auto for exported weights, "
        "bf16 where the hardware has it); none gives fp32 figures",
    )
    p.set_defaults(func=cmd_evaluate)


def _add_demo(sub: Any) -> None:
    p = sub.add_parser("demo", help="train and evaluate on a synthetic dataset (about a minute)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_demo)


def _add_predict(sub: Any) -> None:
    p = sub.add_parser("predict", help="segment images, folders or globs into mask PNGs")
    p.add_argument(
        "--checkpoint",
        required=True,
        help="training checkpoint (.pt), pretrained directory, published set name "
        "(tiramisu list-pretrained) or Hub id, or .onnx file",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or globs")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--amp",
        default="none",
        choices=AMP_CHOICES,
        help="reduced precision (auto: bf16 where the hardware has it; ~1.8x faster on a "
        "bf16 CPU, masks may differ from fp32 at a few pixels)",
    )
    p.add_argument(
        "--channels-last",
        action="store_true",
        help="channels_last memory format (faster with bf16 on recent CPUs)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model (pays off only for many images of one size)",
    )
    p.add_argument("--tta", action="store_true", help="average with a horizontally flipped pass")
    p.add_argument("--tile", type=int, help="sliding-window tile size for large images")
    p.add_argument("--overlap", type=int, help="tile overlap in pixels (default 64)")
    p.add_argument("--overlay", action="store_true", help="also write NAME_overlay.png")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity")
    p.add_argument("--colors", help="JSON/YAML file of class colours ({name: [r, g, b]} or a list)")
    p.add_argument(
        "--skip-class", help="class (name or index) left undrawn in overlays, e.g. background"
    )
    p.add_argument(
        "--outline", action="store_true", help="draw class boundaries in black on overlays"
    )
    p.add_argument("--legend", action="store_true", help="also write legend.png (class colours)")
    p.add_argument("--probs", action="store_true", help="also write NAME_probs.npz")
    p.add_argument(
        "--max-pixels",
        type=int,
        help="skip images with more pixels (default: Pillow's decompression-bomb limit, "
        "about 179 million)",
    )
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_predict)


def _add_export_weights(sub: Any) -> None:
    p = sub.add_parser(
        "export-weights",
        help="training checkpoint -> shareable safetensors + config.json directory",
    )
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export_weights)


def _add_export(sub: Any) -> None:
    p = sub.add_parser("export", help="export to ONNX (dynamic batch/H/W) or TorchScript")
    p.add_argument("--checkpoint", required=True, help="training checkpoint or pretrained dir")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript"])
    p.add_argument("--out", required=True)
    p.add_argument("--opset", type=int, default=17)
    p.set_defaults(func=cmd_export)


def _add_app(sub: Any) -> None:
    p = sub.add_parser(
        "app", help="try a model in the browser (needs: pip install 'tiramisu[app]')"
    )
    p.add_argument(
        "--checkpoint", required=True, help="training checkpoint, weights folder, set name or .onnx"
    )
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="auto", choices=AMP_CHOICES)
    p.set_defaults(func=cmd_app)


def _add_download(sub: Any) -> None:
    p = sub.add_parser("download", help="download a dataset (needs internet)")
    p.add_argument("dataset", choices=["camvid"])
    p.add_argument("dir")
    p.set_defaults(func=cmd_download)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="tiramisu",
        description="FC-DenseNet semantic segmentation and DenseNet classification.",
    )
    parser.add_argument("--version", action="version", version=f"tiramisu {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_list(sub)
    _add_list_pretrained(sub)
    _add_summary(sub)
    _add_config(sub)
    _add_train(sub)
    _add_evaluate(sub)
    _add_demo(sub)
    _add_predict(sub)
    _add_export_weights(sub)
    _add_export(sub)
    _add_app(sub)
    _add_download(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .hardware import flush_denormals

    flush_denormals()
    try:
        return int(args.func(args) or 0)
    except (TiramisuError, ValueError, FileNotFoundError, PermissionError, OSError) as e:
        print(f"tiramisu: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tiramisu: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
