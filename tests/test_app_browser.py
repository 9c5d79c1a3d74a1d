"""`vocaseg app` in a real browser: headless Chromium from the system's packages (never downloaded at
test time), driven by Playwright. Skips when Gradio, Playwright or Chromium is missing; `.ci/run`
installs all three. Set VOCASEG_SCREENSHOTS=DIR to keep the screenshots (else they go to tmp)."""

import json
import os
import shutil
import socket
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio")

from vocaseg.app import SegmentationApp, example_classes, example_scenes, launch  # noqa: E402

CHROMIUM = next((p for p in (os.environ.get("VOCASEG_CHROMIUM"), shutil.which("chromium"),
                             shutil.which("chromium-browser"), shutil.which("google-chrome")) if p), None)
# what Chromium needs to start (and not hang) on a closed network, in a container, as root
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
MAX_MB = 0.2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    app = SegmentationApp("toy", max_upload_mb=MAX_MB, output_dir=str(tmp_path_factory.mktemp("app-out")))
    page, url = launch(app, host="127.0.0.1", port=_free_port(), block=False)
    assert url.startswith("http://127.0.0.1:")
    yield url
    page.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("uploads")
    Image.fromarray(example_scenes(1)[0][1]).save(d / "scene.png")
    (d / "notes.png").write_text("this is not an image")
    noise = (np.random.default_rng(0).random((300, 300, 3)) * 255).astype(np.uint8)
    Image.fromarray(noise).save(d / "heavy.png")  # ~0.26 MB, above the limit
    assert (d / "heavy.png").stat().st_size > MAX_MB * 2 ** 20 > (d / "scene.png").stat().st_size
    return d


@pytest.fixture(scope="module")
def browser_page(tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("no Chromium installed (apt-get install chromium); the browser test needs one")
    sync_api = pytest.importorskip("playwright.sync_api")
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(str(profile), executable_path=CHROMIUM, headless=True,
                                                       args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 1000})
        try:
            yield context.new_page()
        finally:
            context.close()


def _screenshot_dir(tmp_path) -> Path:
    d = Path(os.environ.get("VOCASEG_SCREENSHOTS") or tmp_path)
    d.mkdir(parents=True, exist_ok=True)
    return d


def test_upload_type_run_see_overlay_and_table(server, files, browser_page, tmp_path):
    page = browser_page
    page.goto(server, timeout=60_000)
    assert "Images up to 0.2 MB and 16 megapixels" in page.locator("#intro").inner_text()
    page.locator("#input-image input[type=file]").set_input_files(str(files / "scene.png"))
    page.locator("#input-image img").wait_for(timeout=30_000)  # the upload is shown
    page.locator("#classes textarea").fill(example_classes())
    page.locator("#run").click()
    page.locator("#overlay img").wait_for(timeout=60_000)
    status = page.locator("#status").inner_text()
    assert "Segmented 128x128 into 16 classes with maskclip in" in status
    table = page.locator("#shares").inner_text()
    assert "share (%)" in table and "wood" in table and "crescent" in table
    shot = _screenshot_dir(tmp_path) / "app.png"
    page.screenshot(path=str(shot), full_page=True)
    with Image.open(shot) as im:
        assert im.width >= 1000 and im.height >= 600
    # the overlay the page shows is a real picture (with its legend beside it)
    src = page.locator("#overlay img").get_attribute("src")
    assert src and (src.startswith("http") or src.startswith("data:") or src.startswith("/"))


def test_bundled_example(server, browser_page):
    page = browser_page
    page.goto(server, timeout=60_000)
    page.locator("#example input").click()
    page.get_by_role("option").nth(2).click()
    page.locator("#input-image img").wait_for(timeout=30_000)  # the scene is put in the image input
    page.wait_for_function("document.querySelector('#classes textarea').value.length > 0", timeout=30_000)
    assert page.locator("#classes textarea").input_value() == example_classes()
    page.locator("#run").click()
    page.locator("#overlay img").wait_for(timeout=60_000)
    assert "Segmented 128x128 into 16 classes" in page.locator("#status").inner_text()


def test_errors_appear_in_the_page(server, files, browser_page, tmp_path):
    page = browser_page
    page.goto(server, timeout=60_000)
    page.locator("#input-image input[type=file]").set_input_files(str(files / "scene.png"))
    page.locator("#input-image img").wait_for(timeout=30_000)
    page.locator("#classes textarea").fill("cat, dog, cat")
    page.locator("#run").click()
    page.get_by_text("duplicate class name 'cat'").wait_for(timeout=30_000)
    assert page.locator("#status").inner_text().startswith("Error:")
    # not an image: refused with a sentence, not a traceback
    page.goto(server, timeout=60_000)  # a fresh page
    page.locator("#input-image input[type=file]").set_input_files(str(files / "notes.png"))
    page.locator("#classes textarea").fill("cat, dog")
    page.locator("#run").click()
    page.get_by_text("not an image this app can read").wait_for(timeout=30_000)
    # above the upload limit: refused before it reaches the app
    page.goto(server, timeout=60_000)
    page.locator("#input-image input[type=file]").set_input_files(str(files / "heavy.png"))
    page.get_by_text("exceed the maximum allowed size").wait_for(timeout=30_000)
    page.screenshot(path=str(_screenshot_dir(tmp_path) / "app-errors.png"), full_page=True)
    assert "Traceback" not in page.locator("body").inner_text()


def test_server_paths_are_not_read(server):
    """A visitor cannot make the app read a file of the server by naming it (here through the API)."""
    payload = {"data": [{"path": "/etc/hostname", "meta": {"_type": "gradio.FileData"}}, "cat", "maskclip",
                        "whole image", False, False, "", 0]}
    req = urllib.request.Request(server + "gradio_api/call/run", data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        event = json.loads(urllib.request.urlopen(req, timeout=30).read())["event_id"]
        answer = urllib.request.urlopen(f"{server}gradio_api/call/run/{event}", timeout=60).read().decode()
    except urllib.error.HTTPError as err:  # refused outright is fine too
        answer = f"HTTP {err.code}"
    assert "Segmented" not in answer and "event: complete" not in answer
    hostname = Path("/etc/hostname").read_text().strip() if Path("/etc/hostname").is_file() else None
    assert not hostname or hostname not in answer
