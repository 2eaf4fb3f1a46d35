import os
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


def pytest_configure(config):
    # Two cores on CI: keep intra-op threads from oversubscribing them.
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def camvid_root() -> Path:
    root = SHARED / "camvid"
    if not root.is_dir():
        pytest.skip(f"CamVid not found at {root}")
    return root


@pytest.fixture
def cifar_root() -> Path:
    root = SHARED / "cifar10"
    if not root.is_dir():
        pytest.skip(f"CIFAR-10 subset not found at {root}")
    return root
