"""Tiled prediction in bounded memory: band-by-band labels, decoding and PNG writing."""

import io
import itertools

import numpy as np
import pytest
import torch
from helpers import tiny_config, tiny_model
from PIL import Image

from tiramisu import imageio
from tiramisu.cli import main
from tiramisu.imageio import ImageRows, PngRowWriter
from tiramisu.inference import OverlayStyle, Segmenter, write_outputs
from tiramisu.pretrained import save_pretrained
from tiramisu.tiling import tile_grid, tiled_label_bands, tiled_labels, tiled_proba

try:
    import pyvips  # noqa: F401

    HAVE_VIPS = True
except (ImportError, OSError):
    HAVE_VIPS = False


def tiny_segmenter():
    model = tiny_model(num_classes=5)
    config = tiny_config(model, mean=[0.4] * 3, std=[0.3] * 3)
    return Segmenter(model, config), model, config


def scene(h, w, seed=0):
    """Smooth regions with noise: masks with several classes and real boundaries."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(yy / 9.0), np.cos(xx / 13.0), np.sin((xx + yy) / 17.0)], -1)
    noisy = 127 + 100 * base + rng.normal(0, 12, (h, w, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------- PNG writer
@pytest.mark.parametrize("channels", [1, 3])
def test_png_row_writer_round_trips_through_pillow(channels):
    rng = np.random.default_rng(1)
    shape = (45, 37) if channels == 1 else (45, 37, 3)
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    image[10:30] = 7  # a flat region: the Sub filter's zeros
    buf = io.BytesIO()
    writer = PngRowWriter(buf, 37, 45, channels)
    writer._CHUNK = 100  # many IDAT chunks, as a large image gets
    for a, b in [(0, 1), (1, 20), (20, 44), (44, 45)]:
        writer.write(image[a:b])
    writer.close()
    decoded = Image.open(io.BytesIO(buf.getvalue()))
    assert decoded.mode == ("L" if channels == 1 else "RGB")
    np.testing.assert_array_equal(np.asarray(decoded), image)


def test_png_row_writer_refuses_wrong_rows():
    writer = PngRowWriter(io.BytesIO(), 10, 4, 1)
    with pytest.raises(ValueError, match=r"expected \(2, 10\) uint8"):
        writer.write(np.zeros((2, 11), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        writer.write(np.zeros((2, 10), np.int64))
    writer.write(np.zeros((3, 10), np.uint8))
    with pytest.raises(ValueError, match="3 of 4 rows"):
        writer.close()
    with pytest.raises(ValueError, match="more than 4 rows"):
        writer.write(np.zeros((2, 10), np.uint8))


# ------------------------------------------------------------------------- label bands
@pytest.mark.parametrize(
    ("h", "w", "tile", "overlap", "align"),
    [(200, 530, 64, 32, 8), (97, 250, 64, 0, 32), (40, 30, 64, 16, 8), (130, 70, 48, 40, 8)],
)
def test_label_bands_equal_the_whole_probability_argmax(h, w, tile, overlap, align):
    # Tile probabilities that depend on the window (as a network's do at the borders).
    gen = torch.Generator().manual_seed(h * w)
    logits = torch.randn(1, 6, h, w, generator=gen)

    def probs_fn(x):
        return torch.softmax(x * (1 + 0.01 * x.shape[-1]), dim=1)

    reference = tiled_proba(probs_fn, logits, tile, overlap, align)[0].argmax(0).numpy()
    calls = []

    def tile_probs(y0, y1, x0, x1):
        calls.append((y0, x0))
        return probs_fn(logits[..., y0:y1, x0:x1])

    bands = list(tiled_label_bands(tile_probs, h, w, tile, overlap, align))
    starts = [y0 for y0, _ in bands]
    heights = [band.shape[0] for _, band in bands]
    assert starts == [0, *np.cumsum(heights)[:-1].tolist()] and sum(heights) == h
    assert all(band.shape[1] == w and band.dtype == np.uint8 for _, band in bands)
    np.testing.assert_array_equal(np.concatenate([b for _, b in bands]), reference)
    assert calls == sorted(calls) and len(calls) == len(set(calls))  # raster order, once each
    np.testing.assert_array_equal(tiled_labels(tile_probs, h, w, tile, overlap, align), reference)


@pytest.mark.parametrize("size", [1500, 3000, 6000, 12000, 12345])
def test_tile_grid_spreads_tiles_evenly(size):
    # 512-pixel tiles, 64 overlap, 32-aligned: as many tiles as a 448 stride needs, spaced
    # evenly (a last tile flush with the border could overlap its neighbour by 480 pixels).
    starts, same = tile_grid(size, size, 512, 64, 32)
    assert starts == same and starts[0] == 0
    assert all(s % 32 == 0 for s in starts)
    assert len(starts) == -(-(size - 512) // 448) + 1
    overlaps = [a + 512 - b for a, b in itertools.pairwise(starts)]
    assert min(overlaps) >= 64 and max(overlaps) - min(overlaps) <= 32
    assert max(overlaps) <= (96 if size >= 6000 else 192)
    assert 512 <= size - starts[-1] < 512 + 32  # the last tile runs to the border


@pytest.mark.parametrize(("size", "tile", "overlap"), [(40, 64, 16), (64, 64, 0), (65, 64, 8)])
def test_tile_grid_on_images_near_the_tile_size(size, tile, overlap):
    starts, _ = tile_grid(size, size, tile, overlap, 32)
    assert starts == [0]  # one tile, up to align - 1 pixels larger than asked


# ----------------------------------------------------------------------- streamed reading
def _images():
    rgb = scene(70, 53, seed=2)
    palette = Image.fromarray(rgb).convert("P")
    with_transparency = palette.copy()
    with_transparency.info["transparency"] = 3
    return {
        "L": Image.fromarray(rgb[..., 0]),
        "LA": Image.fromarray(rgb[..., :2]),
        "RGB": Image.fromarray(rgb),
        "RGBA": Image.fromarray(np.dstack([rgb, rgb[..., :1]])),
        "P": palette,
        "P-transparent": with_transparency,
        "I;16": Image.fromarray(rgb[..., 0].astype(np.uint16) * 257 + 3),
    }


@pytest.mark.parametrize("use_vips", [True, False])
@pytest.mark.parametrize("fmt", ["png", "tif", "jpg"])
@pytest.mark.parametrize("kind", list(_images()))
def test_image_rows_decode_like_pillow(kind, fmt, use_vips, tmp_path, monkeypatch):
    if use_vips and not HAVE_VIPS:
        pytest.skip("pyvips is not installed (pip install tiramisu[large])")
    if not use_vips:
        monkeypatch.setattr(imageio, "_VIPS_FORMATS", set())
    path = tmp_path / f"im.{fmt}"
    try:
        _images()[kind].save(path, **({"transparency": 3} if kind == "P-transparent" else {}))
    except (OSError, KeyError, ValueError):
        pytest.skip(f"Pillow cannot save {kind} as {fmt}")
    with Image.open(path) as whole:
        whole.load()
        with ImageRows(path) as rows:
            assert rows.size == whole.size
            if not use_vips:
                assert not rows.streamed
            elif kind in ("L", "RGB"):
                assert rows.streamed
            windows = [(0, 20, 0, 53), (10, 40, 5, 30), (10, 41, 30, 53), (39, 70, 0, 53)]
            for y0, y1, x0, x1 in windows:
                got = rows.window(y0, y1, x0, x1)
                want = whole.crop((x0, y0, x1, y1))
                for mode in ("RGB", "L"):  # what the model and the overlay convert to
                    np.testing.assert_array_equal(
                        np.asarray(got.convert(mode)), np.asarray(want.convert(mode))
                    )
                if kind == "I;16":
                    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
            if rows.streamed:
                with pytest.raises(ValueError, match="already released"):
                    rows.window(0, 10)


@pytest.mark.skipif(not HAVE_VIPS, reason="pyvips is not installed (pip install tiramisu[large])")
def test_image_rows_windows_in_any_rising_order(tmp_path, monkeypatch):
    # Small read steps make the reused buffer shift, grow and skip rows many times.
    monkeypatch.setattr(imageio, "_READ_ROWS", 32)
    rgb = scene(600, 41, seed=5)
    path = tmp_path / "tall.png"
    Image.fromarray(rgb).save(path)
    rng = np.random.default_rng(0)
    seen = []
    with ImageRows(path) as rows:
        assert rows.streamed
        y0 = 0
        while y0 < 600:
            y1 = min(600, y0 + int(rng.integers(1, 200)))
            x0 = int(rng.integers(0, 20))
            window = rows.window(y0, y1, x0, 41)
            seen.append((window, rgb[y0:y1, x0:]))
            y0 += int(rng.choice([0, 1, 17, 60, 250]))  # stay, creep, or jump past decoded rows
        with pytest.raises(ValueError, match="outside"):
            rows.window(599, 601)
    assert len(seen) >= 8
    for window, want in seen:  # earlier windows are unchanged by later reads
        np.testing.assert_array_equal(np.asarray(window), want)


@pytest.mark.skipif(not HAVE_VIPS, reason="pyvips is not installed (pip install tiramisu[large])")
def test_image_rows_memory_does_not_grow_with_height(tmp_path):
    import tracemalloc  # numpy reports its buffers to tracemalloc

    def peak_reading(height: int) -> int:
        path = tmp_path / f"{height}.png"
        Image.fromarray(scene(height, 300, seed=1)).save(path, compress_level=1)
        with ImageRows(path) as rows:
            tracemalloc.start()
            for y0 in range(0, height - 64, 48):  # overlapping windows, as rows of tiles read
                rows.window(y0, y0 + 64)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        return peak

    short, tall = peak_reading(600), peak_reading(2400)
    band = (64 + 128) * 300 * 3  # one window plus one read step of RGB rows
    assert short < 4 * band
    assert tall < short * 1.05 + 4096


# --------------------------------------------------------------------- streamed outputs
@pytest.mark.parametrize("use_vips", [True, False])
@pytest.mark.parametrize(("skip_class", "outline"), [(None, False), (0, True)])
def test_tiled_files_equal_whole_image_outputs(
    use_vips, skip_class, outline, tmp_path, monkeypatch
):
    if use_vips and not HAVE_VIPS:
        pytest.skip("pyvips is not installed (pip install tiramisu[large])")
    if not use_vips:
        monkeypatch.setattr(imageio, "_VIPS_FORMATS", set())
    seg, _, _ = tiny_segmenter()
    image = scene(150, 230, seed=3)
    Image.fromarray(image).save(tmp_path / "big.png")
    style = OverlayStyle(list(seg.colors), 0.4, skip_class, outline)
    seg.write_tiled(tmp_path / "big.png", tmp_path / "s", "big", style, True, tile=64, overlap=32)
    mask = seg.predict_tiled(Image.fromarray(image), 64, 32)
    assert len(np.unique(mask)) > 1
    (tmp_path / "w").mkdir()
    pil = Image.open(tmp_path / "big.png")
    write_outputs(seg, mask, None, pil, tmp_path / "w", "big", style, True, False)
    for name in ("big.png", "big_color.png", "big_overlay.png"):
        streamed = np.asarray(Image.open(tmp_path / "s" / name))
        whole = np.asarray(Image.open(tmp_path / "w" / name))
        np.testing.assert_array_equal(streamed, whole, err_msg=name)
    np.testing.assert_array_equal(seg.predict_tiled(tmp_path / "big.png", 64, 32), mask)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        "big.png",
        "big_color.png",
        "big_overlay.png",
    ]


def test_a_file_truncated_mid_way_loses_nothing(tmp_path, capsys):
    seg, model, config = tiny_segmenter()
    weights = save_pretrained(model, config, tmp_path / "w")
    Image.fromarray(scene(300, 200)).save(tmp_path / "good.png")
    data = (tmp_path / "good.png").read_bytes()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "cut.png").write_bytes(data[: len(data) * 2 // 3])
    (tmp_path / "in" / "fine.png").write_bytes(data)
    out = tmp_path / "out"
    out.mkdir()
    (out / "cut.png").write_bytes(b"an earlier, good result")
    argv = ["predict", "--checkpoint", str(weights), str(tmp_path / "in"), "--out", str(out)]
    assert main([*argv, "--tile", "64", "--overlap", "32", "--overlay", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "cut.png: cannot read image" in err and "Traceback" not in err
    assert (out / "cut.png").read_bytes() == b"an earlier, good result"
    assert sorted(p.name for p in out.iterdir()) == [
        "cut.png",
        "fine.png",
        "fine_color.png",
        "fine_overlay.png",
    ]  # no partial colour mask or overlay, no temporary files
    expected = seg.predict_tiled(tmp_path / "good.png", 64, 32)
    np.testing.assert_array_equal(np.asarray(Image.open(out / "fine.png")), expected)
