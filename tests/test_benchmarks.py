"""The benchmark scripts' own logic (not their timings): which row a ratio is measured against."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def train_step():
    # The scripts import their helpers (`_memory`) as top-level modules, as when run directly.
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(
            "bench_train_step", BENCHMARKS / "train_step.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


def _baseline_modes(train_step, rows: list[tuple[str, str, str]]) -> dict[tuple[str, str], str]:
    """The baseline mode per (model, size) for rows given as (model, size, mode)."""
    dict_rows = [{"model": m, "size": s, "mode": mode} for m, s, mode in rows]
    return {key: row["mode"] for key, row in train_step.baselines(dict_rows).items()}


def test_train_step_baseline_prefers_plain_naive_fp32(train_step):
    rows = [
        ("fcdensenet56", "224x224", "naive_fp32_tcmalloc"),
        ("fcdensenet56", "224x224", "naive_bf16_cl_tcmalloc"),
        ("fcdensenet56", "224x224", "naive_fp32"),
    ]
    assert _baseline_modes(train_step, rows) == {("fcdensenet56", "224x224"): "naive_fp32"}


def test_train_step_baseline_falls_back_to_tcmalloc_fp32_per_model_and_size(train_step):
    rows = [
        ("fcdensenet56", "224x224", "naive_fp32_cl_tcmalloc"),
        ("fcdensenet56", "224x224", "naive_fp32_tcmalloc"),
        ("fcdensenet56", "224x224", "naive_bf16_cl_tcmalloc"),
        ("fcdensenet56", "360x480", "naive_fp32_cl_tcmalloc"),
        ("fcdensenet56", "360x480", "naive_bf16_cl_tcmalloc"),
        # Only bf16 or memory-efficient rows: no baseline, so the table prints "-".
        ("fcdensenet103", "224x224", "efficient_fp32"),
        ("fcdensenet103", "224x224", "naive_bf16_cl"),
    ]
    assert _baseline_modes(train_step, rows) == {
        ("fcdensenet56", "224x224"): "naive_fp32_tcmalloc",
        ("fcdensenet56", "360x480"): "naive_fp32_cl_tcmalloc",
    }
