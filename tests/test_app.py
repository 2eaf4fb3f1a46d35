"""The web app: its behaviour directly, then as a user drives it in headless Chromium."""

import io
import os
import shutil
import socket
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_pretrained
from PIL import Image

from tiramisu.app import SegmentationApp, app_title, class_areas, legend_html
from tiramisu.inference import Segmenter, colorize, overlay

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return tiny_pretrained(
        tmp_path_factory.mktemp("w") / "weights",
        bn_eval="batch",
        classes=["sky", "road", "car"],
        colors=[[128, 128, 128], [128, 64, 128], [64, 0, 128]],
    )


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (45, 61, 3), dtype=np.uint8)
    image[:20] = [200, 210, 230]
    path = tmp_path_factory.mktemp("in") / "street.png"
    Image.fromarray(image).save(path)
    return path


def test_app_title_names_the_model_not_just_the_file():
    config = {"model_name": "fcdensenet56", "architecture": "FCDenseNet"}
    assert app_title("runs/camvid/best.pt", config) == "tiramisu: fcdensenet56 (camvid/best.pt)"
    assert app_title("weights", config) == "tiramisu: fcdensenet56 (weights)"
    # a set name that already says the architecture is not repeated
    assert app_title("fcdensenet56-camvid", config) == "tiramisu: fcdensenet56-camvid"
    assert app_title("w/model.onnx", {"architecture": "FCDenseNet"}) == (
        "tiramisu: FCDenseNet (w/model.onnx)"
    )


def test_app_logic_matches_the_segmenter(weights, photo, tmp_path):
    seg = Segmenter.from_pretrained(weights)
    app = SegmentationApp(seg, tmp_path)
    gallery, rows, downloads, state = app.segment([str(photo)], alpha=0.3)
    expected = seg.predict(photo)
    rgb = np.asarray(Image.open(photo).convert("RGB"))
    np.testing.assert_array_equal(gallery[0][0], overlay(rgb, colorize(expected, seg.colors), 0.3))
    assert rows == [["street.png", *class_areas(expected, 3)]]
    assert sum(rows[0][1:]) == pytest.approx(100, abs=0.05)
    index = np.asarray(Image.open(downloads[0]))
    np.testing.assert_array_equal(index, expected)
    np.testing.assert_array_equal(
        np.asarray(Image.open(downloads[1])), colorize(expected, seg.colors)
    )
    again = app.reblend(state, 0.9)
    np.testing.assert_array_equal(again[0][0], overlay(rgb, colorize(expected, seg.colors), 0.9))
    # Tiled inference on request gives the same shape and classes.
    tiled, *_ = app.segment([str(photo)], alpha=0.3, tiled=True, tile=32)
    assert tiled[0][0].shape == rgb.shape
    assert "sky" in legend_html(seg.classes, seg.colors)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt install chromium)")
def test_app_in_a_real_browser(weights, photo, tmp_path):
    pytest.importorskip("gradio")
    sync_api = pytest.importorskip("playwright.sync_api")
    from tiramisu.app import launch

    port = free_port()
    demo = launch(str(weights), port=port, device="cpu", amp="none", block=False)
    seg = Segmenter.from_pretrained(weights)
    expected = seg.predict(photo)
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM,
                args=[
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--no-first-run",
                ],
            )
            page = browser.new_page(accept_downloads=True)
            # Generous waits: the test checks what the page shows, not how fast a loaded 2-core
            # CI machine (Chromium, the Gradio server and the model share it) gets there.
            page.set_default_timeout(180_000)
            page.goto(f"http://127.0.0.1:{port}/", wait_until="load")
            page.locator("#segment").wait_for()
            page.locator("#images input[type=file]").set_input_files(str(photo))
            page.locator("#images").get_by_text("street.png").first.wait_for()
            page.locator("#segment").click()
            overlay_img = page.locator("#overlay img").first
            overlay_img.wait_for()
            mask_link = page.locator('#downloads a[download="street_mask.png"]')
            mask_link.wait_for()
            page.screenshot(path=str(tmp_path / "app.png"), full_page=True)

            # The overlay the browser shows is the one the Segmenter's mask gives.
            src = overlay_img.get_attribute("src")
            shown = np.asarray(Image.open(io.BytesIO(urllib.request.urlopen(src).read())))
            rgb = np.asarray(Image.open(photo).convert("RGB"))
            np.testing.assert_array_equal(
                shown[..., :3], overlay(rgb, colorize(expected, seg.colors), 0.5)
            )
            # The legend names every class; the area table has the image's row.
            legend = page.locator("#legend").inner_text()
            assert all(name in legend for name in seg.classes)
            assert "street.png" in page.locator("#areas").inner_text()

            # Downloading the index mask gives exactly Segmenter.predict's mask.
            with page.expect_download() as info:
                mask_link.click()
            path = Path(info.value.path())
            np.testing.assert_array_equal(np.asarray(Image.open(path)), expected)
            browser.close()
    finally:
        demo.close()
    assert (tmp_path / "app.png").stat().st_size > 1000
    keep = os.environ.get("TIRAMISU_TEST_ARTIFACTS")  # e.g. CI: keep the screenshot
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp_path / "app.png", Path(keep) / "app.png")


def test_app_api_with_gradio_client(weights, photo):
    pytest.importorskip("gradio")
    client_mod = pytest.importorskip("gradio_client")
    from tiramisu.app import launch

    port = free_port()
    demo = launch(str(weights), port=port, device="cpu", amp="none", block=False)
    try:
        client = client_mod.Client(f"http://127.0.0.1:{port}/", verbose=False)
        gallery, areas, downloads = client.predict(
            [client_mod.handle_file(str(photo))], 0.5, False, 512, api_name="/segment"
        )[:3]
        mask_file = next(f for f in downloads if str(f).endswith("street_mask.png"))
        expected = Segmenter.from_pretrained(weights).predict(photo)
        np.testing.assert_array_equal(np.asarray(Image.open(mask_file)), expected)
        assert areas["data"][0][0] == "street.png" and len(gallery) == 1
    finally:
        demo.close()


def test_app_serves_training_checkpoints_and_onnx_files(weights, photo, tmp_path):
    pytest.importorskip("onnxruntime")
    from tiramisu.export import export_onnx
    from tiramisu.pretrained import load_pretrained

    model, config = load_pretrained(weights)
    onnx_path = export_onnx(model, config, tmp_path / "m.onnx")
    expected = Segmenter.from_pretrained(weights).predict(photo)
    app = SegmentationApp(Segmenter.load(onnx_path), tmp_path / "out")
    _, rows, downloads, _ = app.segment([str(photo)])
    mask = np.asarray(Image.open(downloads[0]))
    assert (mask == expected).mean() > 0.999  # onnxruntime vs PyTorch: last-bit differences
    assert rows[0][0] == "street.png"
