"""The benchmark scripts' own logic (not their timings): which row a ratio is measured against."""

import importlib.util
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    # The scripts import their helpers (`_memory`) as top-level modules, as when run directly.
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


def _row(model: str, size: str, mode: str, seconds: float) -> dict:
    return {"model": model, "size": size, "mode": mode, "seconds_per_step": seconds}


def test_train_step_baseline_prefers_plain_naive_fp32():
    train_step = _load("train_step")
    rows = [
        _row("fcdensenet56", "224x224", "naive_fp32_tcmalloc", 2.0),
        _row("fcdensenet56", "224x224", "naive_bf16_cl_tcmalloc", 1.0),
        _row("fcdensenet56", "224x224", "naive_fp32", 3.0),
    ]
    base = train_step.baselines(rows)
    assert list(base) == [("fcdensenet56", "224x224")]
    assert base[("fcdensenet56", "224x224")]["mode"] == "naive_fp32"


def test_train_step_baseline_falls_back_to_tcmalloc_fp32_per_model_and_size():
    train_step = _load("train_step")
    rows = [
        _row("fcdensenet56", "224x224", "naive_fp32_cl_tcmalloc", 2.5),
        _row("fcdensenet56", "224x224", "naive_fp32_tcmalloc", 2.25),
        _row("fcdensenet56", "224x224", "naive_bf16_cl_tcmalloc", 1.36),
        _row("fcdensenet56", "360x480", "naive_fp32_cl_tcmalloc", 8.0),
        _row("fcdensenet56", "360x480", "naive_bf16_cl_tcmalloc", 4.7),
        # Only bf16 or memory-efficient rows: no baseline, so the table prints "-".
        _row("fcdensenet103", "224x224", "efficient_fp32", 3.0),
        _row("fcdensenet103", "224x224", "naive_bf16_cl", 2.0),
    ]
    base = train_step.baselines(rows)
    assert {key: row["mode"] for key, row in base.items()} == {
        ("fcdensenet56", "224x224"): "naive_fp32_tcmalloc",
        ("fcdensenet56", "360x480"): "naive_fp32_cl_tcmalloc",
    }
