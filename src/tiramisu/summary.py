"""Per-stage architecture summary: feature maps, resolution, parameters and FLOPs.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (2 per multiply-add, counting
convolutions, transposed convolutions and matrix products). The forward pass runs on the
``meta`` device, so summarising FC-DenseNet103 at full resolution costs no real compute.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def summarize(
    model: nn.Module, size: tuple[int, int] = (360, 480), batch: int = 1
) -> dict[str, Any]:
    """Describe ``model`` stage by stage for a ``batch x C x size`` input.

    The model must provide ``stages()`` (every model in the registry does).
    """
    if not hasattr(model, "stages"):
        raise TypeError(f"{type(model).__name__} has no stages() to summarise")
    stages = model.stages()
    meta_model = _meta_copy(model)
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = []

    def record(name: str, out: Tensor | list[Tensor]) -> None:
        if isinstance(out, list | tuple):  # maps a module passes on unconcatenated
            n, _, h, w = out[0].shape
            shapes[name] = (n, sum(t.shape[1] for t in out), h, w)
        else:
            shapes[name] = tuple(out.shape)

    for name, _, _ in stages:
        module = meta_model.get_submodule(name)
        hooks.append(module.register_forward_hook(lambda _m, _i, out, name=name: record(name, out)))
    x = torch.empty(batch, model.in_channels, *size, device="meta")
    counter = FlopCounterMode(display=False, depth=None)
    try:
        with counter, torch.no_grad():
            meta_model(x)
    finally:
        for h in hooks:
            h.remove()
    flops = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    prefix = type(meta_model).__name__

    rows = []
    for name, description, channels in stages:
        shape = shapes[name]
        rows.append(
            {
                "stage": name,
                "layers": description,
                "feature_maps": channels,
                "output_size": list(shape[-2:]) if len(shape) == 4 else [],
                "params": count_parameters(model.get_submodule(name)),
                "gflops": flops.get(f"{prefix}.{name}", 0) / 1e9,
            }
        )
    return {
        "model": type(model).__name__,
        "config": getattr(model, "config", {}),
        "input_size": [batch, model.in_channels, *size],
        "output_shape": list(shapes[stages[-1][0]]),
        "stages": rows,
        "total_params": count_parameters(model, trainable_only=False),
        "trainable_params": count_parameters(model),
        "buffers": sum(b.numel() for n, b in model.named_buffers() if "num_batches" not in n),
        "total_gflops": counter.get_total_flops() / 1e9,
    }


def _meta_copy(model: nn.Module) -> nn.Module:
    """The same architecture with storage-free parameters (built from its config if possible)."""
    config = getattr(model, "config", None)
    if config is not None:
        with torch.device("meta"):
            copy = type(model)(**config)
    else:
        import copy as _copy

        copy = _copy.deepcopy(model).to("meta")
    return copy.eval()


def format_table(summary: dict[str, Any]) -> str:
    header = ("stage", "layers", "maps", "output", "params", "GFLOPs")
    lines = []
    for r in summary["stages"]:
        out = "x".join(str(s) for s in r["output_size"]) or "-"
        lines.append(
            (
                r["stage"],
                r["layers"],
                str(r["feature_maps"]),
                out,
                f"{r['params']:,}",
                f"{r['gflops']:.2f}",
            )
        )
    widths = [max(len(header[i]), *(len(row[i]) for row in lines)) for i in range(len(header))]
    right = {2, 3, 4, 5}

    def fmt(row: tuple[str, ...]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )

    n, c, h, w = summary["input_size"]
    rule = "-" * len(fmt(header))
    text = [f"{summary['model']}  input {n}x{c}x{h}x{w}", rule, fmt(header), rule]
    text += [fmt(row) for row in lines]
    text += [
        rule,
        f"trainable parameters: {summary['trainable_params']:,}",
        f"with BatchNorm running statistics: {summary['trainable_params'] + summary['buffers']:,}",
        f"forward GFLOPs at {h}x{w}, batch {n}: {summary['total_gflops']:.2f}",
        f"output shape: {'x'.join(str(s) for s in summary['output_shape'])}",
    ]
    return "\n".join(text)


def to_json(summary: dict[str, Any]) -> str:
    return json.dumps(summary, indent=2)


def to_dot(model: nn.Module, summary: dict[str, Any]) -> str:
    """Block-level Graphviz DOT graph; skip connections drawn dashed.

    Down-path stages run top to bottom and up-path stages bottom to top, each skip pinned to the
    same rank as its destination, so ``dot -Tsvg`` draws FC-DenseNet's U shape.
    """
    rows = summary["stages"]
    skips = model.skip_connections() if hasattr(model, "skip_connections") else []

    def node_id(stage: str) -> str:
        return stage.replace(".", "_")

    def colour(stage: str) -> str:
        if "block" in stage or stage == "bottleneck":
            return "#f6d58e"
        if "trans_down" in stage or "transitions" in stage:
            return "#a9cce3"
        if "trans_up" in stage:
            return "#abebc6"
        return "#e5e7e9"

    _n, c, h, w = summary["input_size"]
    out = [
        f'digraph "{summary["model"]}" {{',
        "  rankdir=TB;",
        '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];',
        f'  input [label="input\\n{c}x{h}x{w}", fillcolor="#ffffff"];',
    ]
    for r in rows:
        size = "x".join(str(s) for s in r["output_size"])
        label = f"{r['stage']}\\n{r['layers']}\\nm={r['feature_maps']}" + (
            f", {size}" if size else ""
        )
        out.append(f'  {node_id(r["stage"])} [label="{label}", fillcolor="{colour(r["stage"])}"];')
    out.append('  output [label="output", fillcolor="#ffffff"];')
    chain = ["input"] + [node_id(r["stage"]) for r in rows] + ["output"]
    # Up-path edges point upward in the drawing, so they are reversed for layout.
    up_started = False
    for a, b in itertools.pairwise(chain):
        up_started = up_started or b.startswith("trans_up")
        if up_started:
            out.append(f"  {b} -> {a} [dir=back];")
        else:
            out.append(f"  {a} -> {b};")
    for src, dst in skips:
        out.append(
            f"  {node_id(src)} -> {node_id(dst)} [style=dashed, constraint=false, "
            f'color="#7f8c8d", label="skip"];'
        )
        out.append(f"  {{ rank=same; {node_id(src)}; {node_id(dst)}; }}")
    out.append("}")
    return "\n".join(out) + "\n"
