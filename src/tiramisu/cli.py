"""The ``tiramisu`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from .errors import TiramisuError


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
    text = {"table": format_table, "json": to_json}.get(args.format)
    print(text(summary) if text else to_dot(model, summary), end="" if text is None else "\n")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from .models import list_models, model_info

    for name in list_models(args.pattern):
        print(f"{name:22s} {model_info(name)[2]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="tiramisu",
        description="FC-DenseNet semantic segmentation and DenseNet classification.",
    )
    parser.add_argument("--version", action="version", version=f"tiramisu {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="list the registered models")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'fcdense*'")
    p.set_defaults(func=cmd_list)

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

    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


# Later modules (training, inference) add their subcommands here.
_EXTRA_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
