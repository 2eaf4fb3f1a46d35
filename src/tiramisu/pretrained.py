"""Shareable weights in the Hugging Face layout: ``model.safetensors`` + ``config.json``.

The config carries everything needed to use the weights without the training code's config:
architecture and constructor arguments, class names and colours, the void index, and the input
preprocessing (scaling, mean/std, channel count, BatchNorm mode). safetensors files hold raw
tensors only, so loading them can never execute code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError
from .fileio import atomic_write_from, atomic_write_text

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def config_from_checkpoint(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The pretrained config for a training checkpoint."""
    from .data.transforms import normalization
    from .models import model_info

    cfg = ckpt["config"]
    data = cfg["data"]
    labels = ckpt["labels"]
    model_config = dict(ckpt["model_config"])
    model_config["memory_efficient"] = False
    mean, std = normalization(data["normalize"], data["mean"], data["std"])
    # The class that was trained: recorded since checkpoint format 1.1, else the registry's
    # class for the model name (never guessed from the task).
    arch = ckpt.get("model_class") or model_info(ckpt["model_name"])[0].__name__
    return {
        "library": "tiramisu",
        "format_version": 1,
        "task": cfg["task"],
        "architecture": arch,
        "model_name": cfg["model"]["name"],
        "model_config": model_config,
        "classes": list(labels["classes"]),
        "colors": [list(c) for c in labels["colors"]],
        "ignore_index": int(labels["ignore_index"]),
        "preprocessing": {
            "scale": "divide by 255 (8-bit) or 65535 (16-bit) to [0, 1]",
            "mean": mean,
            "std": std,
            "channels": int(ckpt["in_channels"]),
        },
        "bn_eval": cfg["train"]["bn_eval"],
        "trained": {
            "dataset": data["dataset"],
            "epoch": ckpt.get("epoch"),
            "stage": ckpt.get("stage"),
            "best": ckpt.get("best"),
        },
    }


# Far above any published DenseNet, far below what would exhaust memory when building.
_BOUNDS = {
    "growth_rate": 512,
    "num_classes": 65536,
    "in_channels": 64,
    "first_conv_channels": 4096,
    "num_init_features": 4096,
    "bottleneck_layers": 512,
}
_MAX_LAYERS_PER_BLOCK = 512
_MAX_BLOCKS = 12


def _check_bounds(model_config: Any, source: str) -> None:
    """Refuse absurd architectures before a single tensor is allocated."""
    if not isinstance(model_config, dict):
        raise CheckpointError(f"{source}: model_config must be a mapping")
    for key, limit in _BOUNDS.items():
        v = model_config.get(key)
        if v is None:
            continue
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= limit:
            raise CheckpointError(
                f"{source}: model_config.{key} must be an integer in [1, {limit}], got {v!r}"
            )
    for key in ("down_blocks", "up_blocks", "block_config"):
        v = model_config.get(key)
        if v is None:
            continue
        ok = isinstance(v, list) and 1 <= len(v) <= _MAX_BLOCKS
        ok = ok and all(
            isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= _MAX_LAYERS_PER_BLOCK
            for n in v
        )
        if not ok:
            raise CheckpointError(
                f"{source}: model_config.{key} must list 1-{_MAX_BLOCKS} block sizes of "
                f"0-{_MAX_LAYERS_PER_BLOCK} layers, got {v!r}"
            )


def build_model(config: dict[str, Any], source: str = "config.json") -> nn.Module:
    from .models import build_architecture, model_classes

    arch = config.get("architecture")
    if arch not in model_classes():
        raise CheckpointError(
            f"{source}: unknown architecture {arch!r} (known: {', '.join(model_classes())})"
        )
    _check_bounds(config.get("model_config"), source)
    try:
        return build_architecture(arch, config["model_config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: cannot build {arch}: {e}") from None


def validate_config(config: Any, source: str) -> None:
    """Types and ranges of a pretrained config, checked before anything is built from it."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{source}: must hold a JSON object")
    for key in ("architecture", "model_config", "classes", "preprocessing"):
        if key not in config:
            raise CheckpointError(f"{source}: missing key {key!r}")
    _check_bounds(config["model_config"], source)
    classes = config["classes"]
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        raise CheckpointError(
            f"{source}: classes must be a non-empty list of names, got {classes!r}"
        )
    colors = config.get("colors", [])
    ok = (
        isinstance(colors, list)
        and len(colors) == len(classes)
        and all(
            isinstance(c, list)
            and len(c) == 3
            and all(isinstance(v, int) and 0 <= v <= 255 for v in c)
            for c in colors
        )
    )
    if not ok:
        raise CheckpointError(
            f"{source}: colors must list one [r, g, b] (0-255) per class, got {colors!r}"
        )
    pre = config["preprocessing"]
    if not isinstance(pre, dict) or pre.get("channels") not in (1, 3, 4):
        got = pre.get("channels") if isinstance(pre, dict) else pre
        raise CheckpointError(f"{source}: preprocessing.channels must be 1, 3 or 4, got {got!r}")
    for key in ("mean", "std"):
        v = pre.get(key)
        ok = v is None or (
            isinstance(v, list)
            and len(v) == pre["channels"]
            and all(isinstance(x, int | float) and not isinstance(x, bool) for x in v)
        )
        if not ok:
            raise CheckpointError(
                f"{source}: preprocessing.{key} must be null or {pre['channels']} numbers, "
                f"got {v!r}"
            )
    if pre.get("std") is not None and any(x <= 0 for x in pre["std"]):
        raise CheckpointError(f"{source}: preprocessing.std must be positive, got {pre['std']!r}")
    if config.get("bn_eval", "running") not in ("batch", "running"):
        raise CheckpointError(
            f"{source}: bn_eval must be batch or running, got {config.get('bn_eval')!r}"
        )


def check_shapes_before_building(config: dict[str, Any], weights: Path) -> None:
    """Compare the config with the weights' header (no tensor is read) before building."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            names = set(f.keys())
            classifier = (
                f.get_slice("classifier.weight").get_shape()
                if ("classifier.weight" in names)
                else None
            )
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights}: not a valid safetensors file ({e})") from None
    n = config["model_config"].get("num_classes")
    if classifier is not None and n is not None and classifier[0] != n:
        raise CheckpointError(
            f"{weights}: weights have {classifier[0]} classes but the config says {n}"
        )
    expected_tensors = 0
    mc = config["model_config"]
    for key in ("down_blocks", "up_blocks", "block_config"):
        expected_tensors += sum(mc.get(key) or [])
    expected_tensors += mc.get("bottleneck_layers") or 0
    # Every dense layer holds at least a BatchNorm and a convolution (6 tensors at least).
    if 6 * expected_tensors > 10 * len(names) + 1000:
        raise CheckpointError(
            f"{weights}: the config describes about {expected_tensors} dense layers but the "
            f"file holds only {len(names)} tensors"
        )


def check_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor], config: dict[str, Any], source: str
) -> None:
    """Name the first disagreement between weights and architecture in one line."""
    from .models.fcdensenet import upgrade_state_dict

    state = upgrade_state_dict(state)  # older files: load_state_dict renames them the same way
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not match the {config.get('architecture')} in the config "
            f"({len(missing)} missing, {len(unexpected)} unexpected tensors, e.g. "
            f"{(missing or unexpected)[0]!r})"
        )
    for k, v in expected.items():
        if state[k].shape != v.shape:
            if k.startswith("classifier.") and k.endswith(("weight", "bias")):
                raise CheckpointError(
                    f"{source}: weights have {state[k].shape[0]} classes but the config says "
                    f"{v.shape[0]}"
                )
            raise CheckpointError(
                f"{source}: tensor {k!r} has shape {tuple(state[k].shape)}, "
                f"the architecture expects {tuple(v.shape)}"
            )


def save_pretrained(
    model: nn.Module,
    config: dict[str, Any],
    directory: str | Path,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (each atomically) into ``directory``.

    ``dtype=torch.float16`` halves the file (floating tensors only); loading casts back to the
    model's dtype."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    atomic_write_from(
        directory / WEIGHTS_NAME,
        # One metadata key only: safetensors writes the metadata map in a random order, so two
        # keys made republishing the same weights change the file's SHA-256 (config.json names
        # the library).
        lambda tmp: save_file(state, tmp, metadata={"format": "pt"}),
    )
    atomic_write_text(directory / CONFIG_NAME, json.dumps(config, indent=2))
    readme = directory / "README.md"
    if not readme.exists():
        atomic_write_text(
            readme,
            f"---\nlibrary_name: tiramisu\ntags: [semantic-segmentation, fc-densenet]\n---\n\n"
            f"# {config.get('model_name')}\n\nClasses: {', '.join(config['classes'])}.\n\n"
            "```python\nimport tiramisu\n"
            f'seg = tiramisu.Segmenter.from_pretrained("{directory.name}")\n'
            f'mask = seg.predict("photo.png")\n```\n',
        )
    return directory


def resolve_pretrained(path_or_id: str | Path, revision: str | None = None) -> Path:
    """A local directory, a published set's name (``fcdensenet56-camvid``, SHA-256 checked),
    or a Hugging Face Hub repository id downloaded to the local cache."""
    from . import zoo

    p = Path(path_or_id)
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"{p}: expected a directory with {CONFIG_NAME} and {WEIGHTS_NAME}")
    text = str(path_or_id)
    if zoo.is_pretrained_name(text):
        return zoo.resolve_named(text)
    if text.count("/") != 1 or text.startswith((".", "/")):
        raise CheckpointError(
            f"{p}: no such directory, pretrained set or Hub id like 'user/model'{zoo.suggest(text)}"
        )
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(
            f"{text}: loading from the Hub needs huggingface_hub (pip install huggingface_hub)"
        ) from None
    try:
        return Path(
            snapshot_download(
                text, revision=revision, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, "README.md"]
            )
        )
    except Exception as e:  # offline, unknown repo, auth: the hub raises many types
        raise CheckpointError(
            f"{text}: cannot download from the Hugging Face Hub "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None


def load_pretrained(
    path_or_id: str | Path, revision: str | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode, config) from a pretrained directory or Hub id."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = resolve_pretrained(path_or_id, revision)
    cfg_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for f in (cfg_path, weights_path):
        if not f.is_file():
            raise CheckpointError(
                f"{f}: missing (a pretrained directory needs {CONFIG_NAME} and {WEIGHTS_NAME})"
            )
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    validate_config(config, str(cfg_path))
    check_shapes_before_building(config, weights_path)
    model = build_model(config, str(cfg_path))
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights_path}: not a valid safetensors file ({e})") from None
    check_state_dict(model, state, config, str(weights_path))
    model.load_state_dict(state)
    n = config["model_config"].get("num_classes")
    if n is not None and n != len(config["classes"]):
        raise CheckpointError(
            f"{cfg_path}: lists {len(config['classes'])} classes but the model has {n}"
        )
    return model.eval(), config


def is_training_checkpoint(path: str | Path) -> bool:
    """A ``.pt``-like name (else: a pretrained directory, shipped name or Hub id).

    A missing ``best.pt`` counts as a checkpoint too, so that the error names a missing
    checkpoint rather than an unknown pretrained set."""
    p = Path(path)
    return not p.is_dir() and p.suffix in (".pt", ".pth", ".ckpt", ".bin")


def load_any(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """A training checkpoint (``.pt``) or a pretrained directory / Hub id -> (model, config)."""
    p = Path(path)
    if is_training_checkpoint(p):
        from .checkpoint import load_checkpoint

        ckpt = load_checkpoint(p)
        config = config_from_checkpoint(ckpt)
        model = build_model(config)
        check_state_dict(model, ckpt["model"], config, str(p))
        model.load_state_dict(ckpt["model"])
    else:
        model, config = load_pretrained(path)
    return model.to(device).eval(), config
