import json

import pytest

import tiramisu
from tiramisu.cli import main
from tiramisu.summary import summarize, to_dot


def test_summary_of_fcdensenet103_lists_the_paper_channels():
    s = summarize(tiramisu.create_model("fcdensenet103"), size=(360, 480))
    maps = {r["stage"]: r["feature_maps"] for r in s["stages"]}
    assert [maps[f"down_blocks.{i}"] for i in range(5)] == [112, 192, 304, 464, 656]
    assert maps["first_conv"] == 48 and maps["bottleneck"] == 896
    assert [maps[f"up_blocks.{i}"] for i in range(5)] == [1088, 816, 576, 384, 256]
    sizes = {r["stage"]: r["output_size"] for r in s["stages"]}
    assert sizes["trans_down.4"] == [11, 15] and sizes["trans_up.0"] == [22, 30]
    assert sizes["classifier"] == [360, 480]
    assert sum(r["params"] for r in s["stages"]) == s["trainable_params"] == 9_322_091
    assert sum(r["gflops"] for r in s["stages"]) == pytest.approx(s["total_gflops"])
    # First conv at 360x480: 2 * 3*3*3 * 48 MACs per pixel.
    assert s["stages"][0]["gflops"] == pytest.approx(2 * 27 * 48 * 360 * 480 / 1e9)


def test_cli_summary_table_json_and_dot(capsys):
    assert main(["summary", "fcdensenet56", "--size", "64x96"]) == 0
    out = capsys.readouterr().out
    assert "1,376,795" in out and "64x96" in out
    assert main(["summary", "fcdensenet56", "--format", "json", "--num-classes", "4"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["output_shape"] == [1, 4, 360, 480]
    assert main(["summary", "fcdensenet56", "--format", "dot"]) == 0
    dot = capsys.readouterr().out
    assert dot.startswith('digraph "FCDenseNet"') and dot.rstrip().endswith("}")
    assert dot.count("style=dashed") == 5  # one skip per down block


def test_dot_has_no_skips_for_a_classifier():
    model = tiramisu.create_model("densenet40_k12")
    dot = to_dot(model, summarize(model, size=(32, 32)))
    assert "dashed" not in dot and "blocks_2" in dot


def test_cli_errors_are_one_line(capsys):
    assert main(["summary", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tiramisu: error: unknown model 'nope'") and err.count("\n") == 1
    with pytest.raises(SystemExit):
        main(["summary", "fcdensenet56", "--size", "big"])
