"""Pretrained weight sets by name: ``tiramisu.from_pretrained("fcdensenet56-camvid")``.

The index (``pretrained_weights/index.json``, shipped inside the package) lists every set the
project publishes: the model, the data, the recipe that produced it, its validation metrics and
the SHA-256 of each file. A set's files ship inside the package when they are small enough
(fp16 safetensors), so that loading works offline; otherwise, or when they are missing, they are
fetched from the set's Hugging Face Hub repository. Either way every file is checked against its
SHA-256 before a single tensor is read, and a set that has not been trained yet is a clear error
rather than a download attempt.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError
from .fileio import atomic_write_text

BUNDLED_ROOT = Path(__file__).resolve().parent / "pretrained_weights"
INDEX_NAME = "index.json"
FILES = ("config.json", "model.safetensors")


@dataclass(frozen=True)
class PretrainedSet:
    name: str
    model: str
    dataset: str
    recipe: str
    hub_repo: str | None = None
    sha256: dict[str, str] = field(default_factory=dict)  # empty: not trained yet
    metrics: dict[str, Any] = field(default_factory=dict)
    notes: str = ""

    @property
    def trained(self) -> bool:
        return all(f in self.sha256 for f in FILES)


def _index_path(root: Path | None) -> Path:
    return (root or BUNDLED_ROOT) / INDEX_NAME


def load_index(root: Path | None = None) -> dict[str, PretrainedSet]:
    path = _index_path(root)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read the pretrained index ({e})") from None
    return {name: PretrainedSet(name=name, **entry) for name, entry in raw.items()}


def save_index(sets: dict[str, PretrainedSet], root: Path | None = None) -> Path:
    raw = {
        s.name: {k: v for k, v in s.__dict__.items() if k != "name"}
        for s in sorted(sets.values(), key=lambda s: s.name)
    }
    return atomic_write_text(_index_path(root), json.dumps(raw, indent=2) + "\n")


def list_pretrained(root: Path | None = None) -> list[PretrainedSet]:
    return sorted(load_index(root).values(), key=lambda s: s.name)


def is_pretrained_name(text: str, root: Path | None = None) -> bool:
    return "/" not in text and "\\" not in text and text in load_index(root)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def suggest(name: str, root: Path | None = None) -> str:
    close = difflib.get_close_matches(name, list(load_index(root)), n=3)
    return f"; did you mean {', '.join(close)}?" if close else ""


def _verify(entry: PretrainedSet, directory: Path) -> None:
    for fname in FILES:
        path = directory / fname
        actual = sha256_file(path)
        if actual != entry.sha256[fname]:
            raise CheckpointError(
                f"{path}: SHA-256 {actual[:12]}... does not match the published "
                f"{entry.sha256[fname][:12]}... for {entry.name}; the file is corrupt or was "
                f"replaced (delete it to download it again)"
            )


def _download(entry: PretrainedSet) -> Path:
    if not entry.hub_repo:
        raise CheckpointError(
            f"{entry.name}: the weights are not installed with this package and the set "
            f"names no Hugging Face Hub repository"
        )
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise CheckpointError(
            f"{entry.name}: the weights are not installed with this package; fetching them "
            f"from the Hub ({entry.hub_repo}) needs huggingface_hub (pip install huggingface_hub)"
        ) from None
    try:
        paths = [Path(hf_hub_download(entry.hub_repo, fname)) for fname in FILES]
    except Exception as e:  # offline, unknown repository, auth: the hub raises many types
        raise CheckpointError(
            f"{entry.name}: the weights are not installed with this package and the Hub "
            f"repository {entry.hub_repo} could not be read "
            f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})"
        ) from None
    return paths[0].parent


def resolve_named(name: str, root: Path | None = None) -> Path:
    """The verified local folder of a named set (bundled, else downloaded from the Hub)."""
    index = load_index(root)
    if name not in index:
        raise CheckpointError(f"{name}: no such pretrained set{suggest(name, root)}")
    entry = index[name]
    if not entry.trained:
        available = ", ".join(s.name for s in index.values() if s.trained) or "none yet"
        raise CheckpointError(
            f"{name}: not trained yet, so no weights exist for it (trained sets: {available}; "
            f"'tiramisu list-pretrained' shows each set's status)"
        )
    local = (root or BUNDLED_ROOT) / name
    directory = local if all((local / f).is_file() for f in FILES) else _download(entry)
    _verify(entry, directory)
    return directory


def publish(
    checkpoint: str | Path,
    name: str,
    *,
    dataset: str,
    recipe: str,
    hub_repo: str | None = None,
    notes: str = "",
    metrics: dict[str, Any] | None = None,
    root: Path | None = None,
) -> PretrainedSet:
    """Export a training checkpoint as the fp16 set ``name`` and record it in the index."""
    import torch

    from .checkpoint import load_checkpoint
    from .pretrained import build_model, check_state_dict, config_from_checkpoint, save_pretrained

    ckpt = load_checkpoint(checkpoint)
    config = config_from_checkpoint(ckpt)
    config["pretrained_name"] = name
    model = build_model(config)
    check_state_dict(model, ckpt["model"], config, str(checkpoint))
    model.load_state_dict(ckpt["model"])
    directory = (root or BUNDLED_ROOT) / name
    save_pretrained(model, config, directory, dtype=torch.float16)
    (directory / "README.md").unlink(missing_ok=True)  # the index and the report describe it
    index = load_index(root) if _index_path(root).exists() else {}
    entry = PretrainedSet(
        name=name,
        model=str(ckpt["model_name"]),
        dataset=dataset,
        recipe=recipe,
        hub_repo=hub_repo,
        sha256={f: sha256_file(directory / f) for f in FILES},
        metrics=dict(metrics or {}),
        notes=notes,
    )
    index[name] = entry
    save_index(index, root)
    return entry
