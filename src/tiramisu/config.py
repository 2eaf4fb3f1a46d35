"""Run configuration: typed sections, validated once where a config enters the program.

Built-in defaults, then a YAML file, then ``--set key=value`` overrides are merged as plain
mappings and converted *once* into a frozen ``RunConfig`` (``RunConfig.from_dict``). Every key's
type and range is checked there, so a bad value is a one-line error naming the key rather than a
traceback deep inside training, and nothing downstream mutates the configuration: a changed copy
is made with ``dataclasses.replace``. Unknown keys are errors that suggest the closest valid keys.
Each field carries its documentation, from which ``tiramisu config-reference`` (and the README's
reference table) is generated, so the documentation cannot drift from the defaults.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import TiramisuError

# ----------------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; accept it as the float users mean."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


# ------------------------------------------------------------------------------ validators
# Each returns None when the value is acceptable, else what was expected.
Check = Callable[[Any], "str | None"]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, int | float) and not isinstance(v, bool)) and math.isfinite(v)


def integer(lo: int | None = None, hi: int | None = None, optional: bool = False) -> Check:
    def check(v: Any) -> str | None:
        if v is None and optional:
            return None
        ok = _is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi)
        rng = f" in [{lo}, {hi}]" if hi is not None else f" >= {lo}" if lo is not None else ""
        return None if ok else f"an integer{rng}" + (" or null" if optional else "")

    return check


def number(
    lo: float | None = None, hi: float | None = None, optional: bool = False, lo_open=False
) -> Check:
    def check(v: Any) -> str | None:
        if v is None and optional:
            return None
        ok = _is_num(v) and (lo is None or (v > lo if lo_open else v >= lo))
        ok = ok and (hi is None or v <= hi)
        rng = ""
        if lo is not None:
            rng = f" {'>' if lo_open else '>='} {lo}"
        if hi is not None:
            rng += f"{' and' if rng else ''} <= {hi}"
        return None if ok else f"a number{rng}" + (" or null" if optional else "")

    return check


def choice(*options: Any) -> Check:
    def check(v: Any) -> str | None:
        ok = any(v == o and type(v) is type(o) for o in options)
        return (
            None if ok else "one of " + ", ".join("null" if o is None else str(o) for o in options)
        )

    return check


def boolean() -> Check:
    return lambda v: None if isinstance(v, bool) else "true or false"


def text(optional: bool = False) -> Check:
    return lambda v: (
        None
        if isinstance(v, str) or (optional and v is None)
        else "a string" + (" or null" if optional else "")
    )


def regex() -> Check:
    """An optional regular expression for file stems, with at most one group (the pairing key)."""

    def check(v: Any) -> str | None:
        if v is None:
            return None
        if not isinstance(v, str):
            return "a regular expression or null"
        try:
            compiled = re.compile(v)
        except re.error as e:
            return f"a valid regular expression ({e})"
        if compiled.groups > 1 and "key" not in compiled.groupindex:
            return "a regular expression with one group, or a group named 'key'"
        return None

    return check


def number_list(length: int | None = None, optional: bool = False, positive=False) -> Check:
    def check(v: Any) -> str | None:
        if v is None and optional:
            return None
        ok = isinstance(v, list | tuple) and all(_is_num(x) for x in v)
        ok = ok and (length is None or len(v) == length) and (not positive or all(x > 0 for x in v))
        what = f"a list of {length} " if length else "a list of "
        what += "positive numbers" if positive else "numbers"
        return None if ok else what + (" or null" if optional else "")

    return check


def crop_size() -> Check:
    # The model decides the smallest valid crop (2^poolings); the trainer checks that.
    def check(v: Any) -> str | None:
        if v is None:
            return None
        if _is_int(v):
            v = [v, v]
        ok = isinstance(v, list | tuple) and len(v) == 2 and all(_is_int(x) and x > 0 for x in v)
        return None if ok else "null or [height, width] in pixels"

    return check


def any_of(*checks: Check) -> Check:
    def check(v: Any) -> str | None:
        errors = [c(v) for c in checks]
        return None if any(e is None for e in errors) else " or ".join(e for e in errors if e)

    return check


def mapping(optional: bool = True) -> Check:
    return lambda v: None if isinstance(v, dict) or (optional and v is None) else "a mapping"


def string_list(optional: bool = True) -> Check:
    def check(v: Any) -> str | None:
        if v is None and optional:
            return None
        ok = isinstance(v, list) and len(v) > 0 and all(isinstance(x, str | int) for x in v)
        return None if ok else "a non-empty list of class names or null"

    return check


def label_map() -> Check:
    def check(v: Any) -> str | None:
        if v is None:
            return None
        ok = isinstance(v, dict) and all(_is_int(k) and _is_int(x) for k, x in v.items())
        return None if ok else "a mapping of integer mask values to class indices, or null"

    return check


def opt(default: Any, doc: str, check: Check) -> Any:
    """A config field: its default, one line of documentation and its validator."""
    factory = (lambda: copy.deepcopy(default)) if isinstance(default, list | dict) else None
    meta = {"doc": doc, "check": check}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# -------------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class ModelConfig:
    name: str = opt("fcdensenet103", "registered model name (tiramisu list)", text())
    kwargs: dict = opt(
        {}, "extra constructor keywords: dropout, upsampling, memory_efficient, ...", mapping(False)
    )


@dataclass(frozen=True)
class DataConfig:
    dataset: str = opt(
        "camvid",
        "camvid | folder (image/mask folders) | synthetic | cifar10 | imagefolder",
        choice("camvid", "folder", "synthetic", "cifar10", "imagefolder"),
    )
    root: str | None = opt(None, "dataset folder (--data-root)", text(optional=True))
    train_images: str | None = opt(
        "train/images", "folder datasets: training images (under root)", text(True)
    )
    train_masks: str | None = opt("train/masks", "folder datasets: training masks", text(True))
    val_images: str | None = opt("val/images", "folder datasets: validation images", text(True))
    val_masks: str | None = opt("val/masks", "folder datasets: validation masks", text(True))
    test_images: str | None = opt(
        None, "folder datasets: test images (evaluate --split test)", text(True)
    )
    test_masks: str | None = opt(None, "folder datasets: test masks", text(True))
    image_suffix: str = opt("", "stripped from image names before pairing (e.g. _training)", text())
    mask_suffix: str = opt("", "stripped from mask names before pairing (e.g. _manual1)", text())
    train_list: str | None = opt(
        None,
        "CSV/TXT of image,mask[,region] lines (relative to root); replaces the folders",
        text(True),
    )
    val_list: str | None = opt(None, "validation pair list (as train_list)", text(True))
    test_list: str | None = opt(None, "test pair list (as train_list)", text(True))
    train_regions: str | None = opt(
        None, "folder of valid-region masks (0 = outside: ignored in loss and metrics)", text(True)
    )
    val_regions: str | None = opt(None, "valid-region masks of the validation images", text(True))
    test_regions: str | None = opt(None, "valid-region masks of the test images", text(True))
    region_suffix: str = opt("", "stripped from region-mask names before pairing", text())
    image_pattern: str | None = opt(
        None,
        "regex for image stems; its group (or group 'key') pairs, e.g. '(\\d+)_training'",
        regex(),
    )
    mask_pattern: str | None = opt(None, "regex for mask stems, e.g. '(\\d+)_manual1'", regex())
    region_pattern: str | None = opt(None, "regex for region-mask stems", regex())
    classes: list | None = opt(
        None, "class names for index masks (default class_0, ...)", string_list()
    )
    num_classes: int | None = opt(
        None, "number of classes when classes is not given", integer(1, 65535, True)
    )
    palette: str | None = opt(
        None, "file of class name -> [r, g, b] for colour-coded masks ('void' ignored)", text(True)
    )
    label_map: dict | None = opt(None, "raw mask value -> class index, e.g. {255: 1}", label_map())
    ignore_index: int | None = opt(
        None,
        "mask value excluded from loss and metrics (default: 11 CamVid, else 255)",
        integer(0, 65535, True),
    )
    channels: Any = opt(
        "auto", "input channels: auto (from the images) | 1 | 3 | 4", choice("auto", 1, 3, 4)
    )
    crop_size: list | None = opt(
        [224, 224], "random training crop [h, w]; null = whole images", crop_size()
    )
    hflip: bool = opt(True, "random horizontal flips", boolean())
    vflip: bool = opt(False, "random vertical flips", boolean())
    scale_range: list | None = opt(
        None, "random rescaling range, e.g. [0.75, 1.25]", number_list(2, True, True)
    )
    pad_crop: int = opt(
        4, "classification: zero-pad then random-crop back (pixels)", integer(0, 1024)
    )
    normalize: str = opt(
        "unit",
        "unit ([0, 1], the paper) | imagenet | cifar10 | mean_std (with mean/std)",
        choice("unit", "imagenet", "cifar10", "mean_std"),
    )
    mean: list | None = opt(
        None, "per-channel mean for normalize: mean_std", number_list(None, True)
    )
    std: list | None = opt(
        None, "per-channel std for normalize: mean_std", number_list(None, True, True)
    )
    val_fraction: float = opt(
        0.1,
        "without a validation split (no val/images folder, val_images: null): the held-out "
        "fraction of the training data",
        number(0, 0.9),
    )
    split_seed: int = opt(0, "seed of that hold-out (the same files every run)", integer(0))
    download: bool = opt(
        False, "cifar10: download cifar-10-batches-py into root if missing", boolean()
    )
    cache: bool = opt(True, "keep decoded images in memory", boolean())
    num_workers: int = opt(0, "DataLoader worker processes", integer(0, 256))
    validate: bool = opt(True, "check every image/mask pair before training", boolean())
    max_pixels: int | None = opt(
        None,
        "refuse larger images (decompression bombs); null = Pillow's limit, about 179 M",
        integer(1, None, True),
    )


_AMP = choice("auto", "none", "bf16", "fp16", None, False)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = opt(750, "maximum epochs of the first stage", integer(1))
    batch_size: int = opt(3, "images per step (per process)", integer(1))
    eval_batch_size: int = opt(1, "images per validation step", integer(1))
    optimizer: str = opt(
        "rmsprop", "rmsprop | sgd | adam | adamw", choice("rmsprop", "sgd", "adam", "adamw")
    )
    lr: float = opt(1.0e-3, "learning rate", number(0, 10, lo_open=True))
    momentum: float = opt(0.9, "sgd momentum", number(0, 1))
    nesterov: bool = opt(True, "sgd: Nesterov momentum", boolean())
    weight_decay: float = opt(1.0e-4, "L2 weight decay on all parameters", number(0, 1))
    lr_schedule: str = opt(
        "exponential",
        "exponential | multistep | constant",
        choice("exponential", "multistep", "constant"),
    )
    lr_decay: float = opt(
        0.995, "exponential: lr factor after every epoch", number(0, 1, lo_open=True)
    )
    milestones: list = opt(
        [0.5, 0.75],
        "multistep: epochs (or fractions of epochs) of each drop",
        number_list(None, False, True),
    )
    gamma: float = opt(0.1, "multistep: lr factor at each milestone", number(0, 1, lo_open=True))
    patience: int | None = opt(
        100, "early stopping: evaluations without improvement; null = off", integer(1, None, True)
    )
    monitor: str = opt(
        "miou", "metric for best.pt and early stopping: miou | accuracy", choice("miou", "accuracy")
    )
    class_weights: Any = opt(
        None,
        "null (paper) | median_frequency | sqrt_median_frequency (gentler) | [w0, w1, ...]",
        any_of(
            choice(None, "median_frequency", "sqrt_median_frequency"),
            number_list(None, False, True),
        ),
    )
    loss: str = opt(
        "cross_entropy",
        "cross_entropy (paper) | dice | dice_ce (recommended for rare foregrounds) | focal",
        choice("cross_entropy", "dice", "dice_ce", "focal"),
    )
    focal_gamma: float = opt(2.0, "focal loss focusing parameter", number(0, 10))
    amp: Any = opt("auto", "auto (bf16 where native) | none | bf16 | fp16 (CUDA)", _AMP)
    channels_last: Any = opt(
        "auto", "auto (on with amp) | true | false", choice("auto", True, False)
    )
    compile: bool = opt(False, "torch.compile the model", boolean())
    seed: int = opt(0, "random seed (every epoch's randomness derives from it)", integer(0))
    deterministic: bool = opt(False, "deterministic algorithms (exact resume)", boolean())
    grad_clip: float | None = opt(
        None, "clip the gradient norm to this value", number(0, None, True, lo_open=True)
    )
    bn_eval: str = opt(
        "batch", "BatchNorm at evaluation: batch (the paper) | running", choice("batch", "running")
    )
    sync_bn: bool = opt(False, "SyncBatchNorm under torchrun (CUDA only)", boolean())
    val_every: int = opt(1, "validate every N epochs (and after the last)", integer(1))
    max_steps_per_epoch: int | None = opt(
        None, "cap on steps per epoch (smoke tests, budgets)", integer(1, None, True)
    )
    max_minutes: float | None = opt(
        None,
        "wall-clock budget: stop mid-epoch when it runs out, then validate",
        number(0, None, True, lo_open=True),
    )
    whole_epochs: bool = opt(
        False,
        "with max_minutes: start an epoch only if the previous one's time still fits, so that "
        "no epoch is cut short (a chunked run then follows the schedule exactly)",
        boolean(),
    )


@dataclass(frozen=True)
class FinetuneConfig:
    enabled: bool = opt(False, "a second, full-frame stage starting from best.pt", boolean())
    epochs: int = opt(250, "maximum fine-tuning epochs", integer(1))
    batch_size: int = opt(1, "fine-tuning batch size", integer(1))
    lr: float = opt(1.0e-4, "fine-tuning learning rate", number(0, 10, lo_open=True))
    patience: int | None = opt(
        50,
        "fine-tuning early-stopping patience, counted from the stage's start; best.pt changes "
        "only when fine-tuning beats the first stage's best",
        integer(1, None, True),
    )
    crop_size: list | None = opt(None, "fine-tuning crop; null = full frames", crop_size())


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "finetune": FinetuneConfig,
}
# Keys earlier versions wrote into run folders; ignored when a stored config is read back.
RETIRED = {"train.log_every"}


@dataclass(frozen=True)
class RunConfig:
    task: str = opt(
        "segmentation", "segmentation | classification", choice("segmentation", "classification")
    )
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "") -> RunConfig:
        """Validate a merged mapping (every key known, every value in range) and freeze it."""
        prefix = f"{where}: " if where else ""
        merged = defaults_dict()
        try:
            _merge(merged, raw)
        except TiramisuError as e:
            raise TiramisuError(f"{prefix}{e}") from None
        sections = {}
        for name, section in SECTIONS.items():
            values = merged[name]
            for f in dataclasses.fields(section):
                problem = f.metadata["check"](values[f.name])
                if problem is not None:
                    raise TiramisuError(
                        f"{prefix}{name}.{f.name} must be {problem}, got {values[f.name]!r}"
                    )
            values = copy.deepcopy(values)
            if _is_int(values.get("crop_size")):  # a single number means a square crop
                values["crop_size"] = [values["crop_size"]] * 2
            sections[name] = section(**values)
        task_problem = dataclasses.fields(cls)[0].metadata["check"](merged["task"])
        if task_problem:
            raise TiramisuError(f"{prefix}task must be {task_problem}, got {merged['task']!r}")
        return cls(task=merged["task"], **sections)

    def to_dict(self) -> dict[str, Any]:
        """A fresh, plain copy (for YAML, checkpoints and the data builders)."""
        return dataclasses.asdict(self)

    def with_overrides(self, items: list[str]) -> RunConfig:
        raw = self.to_dict()
        for item in items:
            set_key(raw, item)
        return RunConfig.from_dict(raw)

    def stage(self, name: str) -> TrainConfig:
        """The training settings of a stage: ``train``, or ``finetune`` layered over it."""
        if name == "train":
            return self.train
        # enabled and crop_size are not training settings (the crop goes to the data).
        tuned = dataclasses.asdict(self.finetune)
        for key in ("enabled", "crop_size"):
            tuned.pop(key)
        return dataclasses.replace(self.train, **tuned)


def defaults_dict() -> dict[str, Any]:
    return dataclasses.asdict(RunConfig())


def _all_keys() -> list[str]:
    keys = ["task"]
    for name, section in SECTIONS.items():
        keys += [f"{name}.{f.name}" for f in dataclasses.fields(section)]
    return keys


def _unknown(path: str) -> TiramisuError:
    close = difflib.get_close_matches(path, _all_keys(), n=3, cutoff=0.5)
    if not close:  # a misspelt section: compare the last part of the name
        leaf = path.rsplit(".", 1)[-1]
        close = [
            k
            for k in _all_keys()
            if difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1]], cutoff=0.75)
        ][:3]
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return TiramisuError(f"unknown config key {path!r}{hint}")


def _merge(base: dict[str, Any], update: dict[str, Any], where: str = "") -> dict[str, Any]:
    for key, value in update.items():
        path = f"{where}{key}"
        if path in RETIRED:
            continue
        if key not in base:
            raise _unknown(path)
        if isinstance(base[key], dict) and key != "kwargs":
            if not isinstance(value, dict):
                raise TiramisuError(f"config key {path!r} must be a mapping, got {value!r}")
            _merge(base[key], value, f"{path}.")
        else:
            base[key] = value
    return base


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        raw = parse_yaml(path.read_text()) or {}
    except OSError as e:
        raise TiramisuError(f"{path}: cannot read config ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise TiramisuError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise TiramisuError(f"{path}: a config must be a mapping")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults, then the YAML file, then ``key=value`` overrides, validated into a RunConfig."""
    raw = defaults_dict()
    if path is not None:
        try:
            _merge(raw, read_config_file(path))
        except TiramisuError as e:
            msg = str(e)
            raise TiramisuError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None
    for item in overrides or []:
        set_key(raw, item)
    return RunConfig.from_dict(raw, where=str(path) if path is not None else "")


def set_key(cfg: dict[str, Any], item: str) -> None:
    """Apply ``a.b.c=value`` to a plain mapping; the value is parsed as YAML."""
    if "=" not in item:
        raise TiramisuError(f"--set expects key=value, got {item!r}")
    key, raw_value = item.split("=", 1)
    try:
        value = parse_yaml(raw_value)
    except yaml.YAMLError:
        value = raw_value
    parts = key.strip().split(".")
    node = cfg
    for i, part in enumerate(parts[:-1]):
        if part not in node or not isinstance(node[part], dict):
            raise _unknown(".".join(parts[: i + 1]))
        node = node[part]
    if parts[-1] not in node and not (len(parts) >= 2 and parts[-2] == "kwargs"):
        raise _unknown(key.strip())
    node[parts[-1]] = value


def reference_table() -> str:
    """Markdown table of every config key, its default and its meaning (from the fields)."""

    def cell(doc: str) -> str:
        return doc.replace("|", "\\|")  # a literal pipe would end the table cell

    rows = ["| key | default | meaning |", "|---|---|---|"]
    task_doc = cell(dataclasses.fields(RunConfig)[0].metadata["doc"])
    rows.append(f"| `task` | `segmentation` | {task_doc} |")
    defaults = defaults_dict()
    for name, section in SECTIONS.items():
        for f in dataclasses.fields(section):
            value = yaml.safe_dump(defaults[name][f.name], default_flow_style=True).strip()
            value = value.removesuffix("\n...").removesuffix("...").strip()
            rows.append(f"| `{name}.{f.name}` | `{value}` | {cell(f.metadata['doc'])} |")
    return "\n".join(rows)
