import json
import os

import numpy as np
import pytest
import torch
from helpers import tiny_config, tiny_model, tiny_pretrained
from PIL import Image

import tiramisu
from tiramisu.cli import main
from tiramisu.errors import CheckpointError
from tiramisu.export import export_onnx, export_torchscript
from tiramisu.inference import Segmenter, colorize, tiled_proba
from tiramisu.pretrained import load_pretrained, save_pretrained


@pytest.fixture
def pretrained(tmp_path):
    return tiny_pretrained(tmp_path / "weights", num_classes=4, bn_eval="batch")


def test_save_and_load_pretrained_round_trip(pretrained):
    assert sorted(p.name for p in pretrained.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    model, _config = load_pretrained(pretrained)
    reference = tiny_model()
    x = torch.rand(1, 3, 40, 56)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))
    seg = tiramisu.from_pretrained(str(pretrained))
    assert seg.classes == ["c0", "c1", "c2", "c3"] and seg.bn_eval == "batch"


def test_predict_accepts_paths_pil_arrays_and_tensors(pretrained, tmp_path):
    seg = Segmenter.from_pretrained(pretrained)
    rgb = np.random.default_rng(0).integers(0, 255, (45, 70, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "x.png")
    a = seg.predict(tmp_path / "x.png")
    assert a.shape == (45, 70) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, seg.predict(Image.fromarray(rgb)))
    np.testing.assert_array_equal(a, seg.predict(rgb))
    np.testing.assert_array_equal(a, seg.predict(torch.from_numpy(rgb).permute(2, 0, 1) / 255))
    probs = seg.predict_proba(rgb)
    assert probs.shape == (4, 45, 70)
    np.testing.assert_allclose(probs.sum(0), 1, atol=1e-5)
    # Tiny inputs are padded up to the model's minimum and cropped back.
    assert seg.predict(rgb[:5, :9]).shape == (5, 9)


def test_preprocessing_travels_with_the_weights(tmp_path):
    model = tiny_model()
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    d = save_pretrained(model, tiny_config(model, mean=mean, std=std), tmp_path / "w")
    seg = Segmenter.from_pretrained(d)
    rgb = np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    x = (
        torch.from_numpy(rgb).permute(2, 0, 1).float() / 255 - torch.tensor(mean)[:, None, None]
    ) / torch.tensor(std)[:, None, None]
    with torch.no_grad():
        expected = model(x[None]).argmax(1)[0].numpy()
    np.testing.assert_array_equal(seg.predict(rgb), expected)


def test_tta_is_the_mean_of_plain_and_flipped(pretrained):
    seg = Segmenter.from_pretrained(pretrained)
    x = seg.preprocess(np.random.default_rng(2).integers(0, 255, (33, 41, 3), dtype=np.uint8))[None]
    plain = seg.predict_proba_batch(x)
    flipped = seg.predict_proba_batch(x.flip(-1)).flip(-1)
    torch.testing.assert_close(seg.predict_proba_batch(x, tta=True), (plain + flipped) / 2)


def test_tiled_inference_matches_whole_image_away_from_seams():
    model = tiny_model(down=(1,))  # one pooling: a receptive field well inside the overlap
    seg = Segmenter(model, tiny_config(model))
    x = torch.rand(1, 3, 150, 230)
    whole = seg.predict_proba_batch(x)
    tiled = seg.predict_proba_batch(x, tile=64, overlap=32)
    assert tiled.shape == whole.shape
    diff = (tiled - whole).abs()
    assert diff.median() < 1e-6  # identical wherever one tile's full context decides
    assert torch.quantile(diff.flatten(), 0.99) < 1e-3
    assert diff.max() < 0.02  # the seams, within a small tolerance
    assert (tiled.argmax(1) == whole.argmax(1)).float().mean() > 0.999
    with pytest.raises(ValueError, match="overlap"):
        tiled_proba(seg._probs, x, 64, 64, align=2)


def test_tiled_inference_on_a_large_image_stays_close_for_a_deep_model():
    model = tiny_model(down=(1, 1, 1))
    seg = Segmenter(model, tiny_config(model))
    x = torch.rand(1, 3, 300, 400)
    whole = seg.predict_proba_batch(x)
    tiled = seg.predict_proba_batch(x, tile=128, overlap=64)
    # Deeper models see beyond a tile, so seams differ slightly; the masks barely do.
    assert (tiled.argmax(1) == whole.argmax(1)).float().mean() > 0.97
    assert (tiled - whole).abs().mean() < 0.02


def test_predict_cli_mixed_inputs_modes_and_failures(pretrained, tmp_path, capsys):
    inputs = tmp_path / "in"
    (inputs / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (50, 61, 3), dtype=np.uint8)).save(inputs / "rgb.jpg")
    Image.fromarray(rng.integers(0, 255, (40, 33, 4), dtype=np.uint8)).save(inputs / "rgba.png")
    Image.fromarray(rng.integers(0, 255, (37, 90), dtype=np.uint8)).save(
        inputs / "sub" / "grey.png"
    )
    Image.fromarray(rng.integers(0, 65535, (35, 36), dtype=np.uint16)).save(tmp_path / "deep.png")
    (inputs / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    code = main(
        [
            "predict",
            "--checkpoint",
            str(pretrained),
            str(inputs),
            str(tmp_path / "*.png"),
            "--out",
            str(out),
            "--overlay",
            "--probs",
            "--quiet",
            "--batch-size",
            "2",
        ]
    )
    captured = capsys.readouterr()
    assert code == 1 and "broken.png" in captured.err
    sizes = {"rgb": (61, 50), "rgba": (33, 40), "grey": (90, 37), "deep": (36, 35)}
    for name, size in sizes.items():
        mask = Image.open(out / f"{name}.png")
        assert mask.size == size and mask.mode == "L"
        assert Image.open(out / f"{name}_color.png").size == size
        assert Image.open(out / f"{name}_overlay.png").size == size
        probs = np.load(out / f"{name}_probs.npz")["probs"]
        assert probs.shape == (4, size[1], size[0])
        np.testing.assert_allclose(probs.astype(np.float32).sum(0), 1, atol=1e-2)
    assert not any(p.name.startswith(".") for p in out.iterdir())  # no temp files left
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(pretrained),
                str(inputs / "rgb.jpg"),
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )


def test_onnx_export_dynamic_sizes_match_pytorch_and_predict_runs_it(pretrained, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    model, config = load_pretrained(pretrained)  # bn_eval: batch -> per-image normalisation
    path = export_onnx(model, config, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(path))
    seg = Segmenter(model, config)
    for shape in [(1, 3, 64, 96), (2, 3, 97, 131)]:
        x = torch.rand(*shape)
        ours = torch.log_softmax(seg._logits(x), 1)
        theirs = torch.log_softmax(torch.from_numpy(session.run(None, {"image": x.numpy()})[0]), 1)
        assert theirs.shape == ours.shape
        torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    img = np.random.default_rng(3).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(path),
                str(tmp_path / "a.png"),
                "--out",
                str(tmp_path / "o1"),
                "--quiet",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(pretrained),
                str(tmp_path / "a.png"),
                "--out",
                str(tmp_path / "o2"),
                "--quiet",
            ]
        )
        == 0
    )
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / "o1" / "a.png")),
        np.asarray(Image.open(tmp_path / "o2" / "a.png")),
    )


def test_torchscript_export_runs_on_two_sizes(pretrained, tmp_path):
    model, config = load_pretrained(pretrained)
    path = export_torchscript(model, config, tmp_path / "m.pt")
    extra = {"config.json": ""}
    loaded = torch.jit.load(str(path), _extra_files=extra)
    assert json.loads(extra["config.json"])["classes"] == config["classes"]
    seg = Segmenter(model, config)
    for shape in [(1, 3, 64, 64), (1, 3, 45, 77)]:
        x = torch.rand(*shape)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), seg._logits(x), rtol=1e-4, atol=1e-4)


def test_export_weights_from_a_training_checkpoint(tmp_path):
    from tiramisu.checkpoint import atomic_save

    model = tiny_model()
    from tiramisu.config import load_config

    cfg = load_config(None, ["data.dataset=synthetic", "model.name=fcdensenet56"]).to_dict()
    ckpt = {
        "format": "tiramisu-checkpoint",
        "model": model.state_dict(),
        "config": cfg,
        "labels": {"classes": ["a", "b", "c", "d"], "colors": [[0, 0, 0]] * 4, "ignore_index": 255},
        "in_channels": 3,
        "model_config": model.config,
        "model_name": "fcdensenet56",
        "epoch": 3,
        "stage": "train",
    }
    atomic_save(ckpt, tmp_path / "best.pt")
    assert (
        main(
            [
                "export-weights",
                "--checkpoint",
                str(tmp_path / "best.pt"),
                "--out",
                str(tmp_path / "w"),
            ]
        )
        == 0
    )
    seg = tiramisu.from_pretrained(str(tmp_path / "w"))
    assert seg.classes == ["a", "b", "c", "d"] and seg.bn_eval == cfg["train"]["bn_eval"]
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(tmp_path / "best.pt"),
                "--format",
                "torchscript",
                "--out",
                str(tmp_path / "m.ts"),
            ]
        )
        == 0
    )


def test_loading_refuses_pickles_and_mismatches(pretrained, tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"format": "tiramisu-checkpoint", "model": Evil()}, tmp_path / "evil.pt")
    code = main(
        [
            "predict",
            "--checkpoint",
            str(tmp_path / "evil.pt"),
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2 and "refused: it contains Python objects" in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists()
    # A pickle renamed to model.safetensors is not read as weights either.
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "config.json").write_text((pretrained / "config.json").read_text())
    torch.save({"x": Evil()}, fake / "model.safetensors")
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_pretrained(fake)
    assert not (tmp_path / "pwned").exists()
    # Wrong class count.
    wrong = tmp_path / "wrong"
    save_pretrained(tiny_model(num_classes=5), tiny_config(tiny_model(num_classes=5)), wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    five = json.loads(json.dumps(cfg))
    cfg["model_config"]["num_classes"] = 4
    cfg["classes"] = cfg["classes"][:4]
    cfg["colors"] = cfg["colors"][:4]
    (wrong / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="weights have 5 classes but the config says 4"):
        load_pretrained(wrong)
    cfg = five
    cfg["model_config"]["growth_rate"] = 6
    (wrong / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape"):
        load_pretrained(wrong)


def test_unknown_hub_id_offline_is_a_clear_error(monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="Hugging Face Hub"):
        tiramisu.from_pretrained("nobody/no-such-tiramisu")


def test_predict_fast_paths_are_selectable(pretrained, tmp_path, monkeypatch):
    """--amp auto --channels-last --compile reach the model; masks stay close to fp32's."""
    compiled = []

    def fake_compile(model):  # the wiring, without minutes of inductor compilation
        compiled.append(model)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    img = tmp_path / "in.png"
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(img)
    base = ["predict", "--checkpoint", str(pretrained), str(img), "--quiet", "--out"]
    assert main([*base, str(tmp_path / "fp32")]) == 0
    fast = ["--amp", "auto", "--channels-last", "--compile"]
    assert main([*base, str(tmp_path / "fast"), *fast]) == 0
    assert len(compiled) == 1
    a = np.asarray(Image.open(tmp_path / "fp32" / "in.png"))
    b = np.asarray(Image.open(tmp_path / "fast" / "in.png"))
    assert a.shape == b.shape == (64, 80)
    assert (a == b).mean() > 0.9


def test_predict_colours_skip_class_outline_and_legend(pretrained, tmp_path, capsys):
    from tiramisu.inference import overlay

    image = np.random.default_rng(3).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "p.png")
    (tmp_path / "colors.yaml").write_text(
        "c0: [255, 0, 0]\nc1: [0, 255, 0]\nc2: [0, 0, 255]\nc3: [255, 255, 0]\n"
    )
    out = tmp_path / "out"
    argv = [
        "predict",
        "--checkpoint",
        str(pretrained),
        str(tmp_path / "p.png"),
        "--out",
        str(out),
        "--overlay",
        "--colors",
        str(tmp_path / "colors.yaml"),
        "--skip-class",
        "c1",
        "--outline",
        "--legend",
        "--quiet",
    ]
    assert main(argv) == 0
    mask = np.asarray(Image.open(out / "p.png"))
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    np.testing.assert_array_equal(
        np.asarray(Image.open(out / "p_color.png")), colorize(mask, colors)
    )
    shown = np.asarray(Image.open(out / "p_overlay.png"))
    np.testing.assert_array_equal(
        shown, overlay(image, colorize(mask, colors), 0.5, mask, skip_class=1, outline=True)
    )
    # Undrawn class: the image itself; boundaries: black.
    inside = mask == 1
    inside[:-1] &= mask[1:] == 1
    inside[:, :-1] &= mask[:, 1:] == 1
    if inside.any():
        np.testing.assert_array_equal(shown[inside], image[inside])
    legend = np.asarray(Image.open(out / "legend.png"))
    assert legend.shape[0] >= 4 * 20 and (legend == [0, 0, 255]).all(-1).any()
    assert main(argv[:-5] + ["--skip-class", "sky", "--quiet"]) == 2
    assert "--skip-class 'sky': not a class" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("c0: [1, 2]\n")
    assert main(argv[:-8] + ["--colors", str(tmp_path / "bad.yaml"), "--quiet"]) == 2
    assert "bad.yaml: no colour for class 'c1'" in capsys.readouterr().err


@pytest.mark.parametrize(("size", "tile", "overlap"), [((300, 407), 128, 64), ((97, 250), 64, 0)])
def test_streamed_tiled_mask_equals_the_whole_probability_path(size, tile, overlap, tmp_path):
    from tiramisu.inference import tiled_labels

    model = tiny_model(down=(1, 1, 1))
    seg = Segmenter(model, tiny_config(model))
    image = np.random.default_rng(4).integers(0, 255, (*size, 3), dtype=np.uint8)
    x = seg.preprocess(image)[None]
    reference = seg.predict_proba_batch(x, tile=tile, overlap=overlap)[0].argmax(0).numpy()
    calls = []

    def tile_probs(y0, y1, x0, x1):
        calls.append((y0, y1, x0, x1))
        return seg._probs(x[..., y0:y1, x0:x1])

    streamed = tiled_labels(tile_probs, *size, tile, overlap, align=seg.min_size)
    np.testing.assert_array_equal(streamed, reference)
    assert len(calls) == len(set(calls)) > 1  # every tile once
    np.testing.assert_array_equal(seg.predict(image, tile=tile, overlap=overlap), reference)
    # The CLI's --tile path streams too and writes the same mask.
    Image.fromarray(image).save(tmp_path / "big.png")
    seg_dir = save_pretrained(model, tiny_config(model), tmp_path / "w")
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(seg_dir),
                str(tmp_path / "big.png"),
                "--out",
                str(tmp_path / "out"),
                "--tile",
                str(tile),
                "--overlap",
                str(overlap),
                "--quiet",
            ]
        )
        == 0
    )
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "big.png")), reference)


def test_segmenter_zeroes_subnormal_weights_on_cpu(pretrained):
    """Subnormal weights made a trained model's CPU forward 1.8x slower; the Segmenter zeroes
    them (and nothing else) without the process-wide flag. Values are set and compared as bits:
    other tests run the CLI in this process, which flushes subnormals in float arithmetic."""
    from tiramisu.hardware import zero_subnormals_

    model, config = load_pretrained(pretrained)
    weight = next(p for p in model.parameters() if p.numel() >= 4)
    # two subnormals (+ and -), the smallest normal float32, 0.5
    bits = torch.tensor([0x000AE398, -0x7FFF0000, 0x00800000, 0x3F000000], dtype=torch.int32)
    with torch.no_grad():
        weight.view(-1)[:4].view(torch.int32).copy_(bits)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seg = Segmenter(model, config)
    after = {
        k: v.view(torch.int32) for k, v in seg.model.state_dict().items() if v.is_floating_point()
    }
    assert weight.view(-1)[:4].view(torch.int32).tolist() == [0, 0, 0x00800000, 0x3F000000]
    changed = sum(int((before[k].view(torch.int32) != after[k]).sum()) for k in after)
    assert changed == 2
    assert zero_subnormals_(seg.model) == 0
