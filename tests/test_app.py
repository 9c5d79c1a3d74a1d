"""The app's logic without a browser (and without Gradio): what it computes, and the message every bad
input gets. The page in a real browser is tests/test_app_browser.py."""

import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vocaseg import Segmenter
from vocaseg.app import MAX_CLASSES, AppError, RejectedUpload, SegmentationApp, example_classes, example_scenes
from vocaseg.cli import main

MAX_MB, MAX_MP = 0.25, 1.0


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    return SegmentationApp("toy", max_upload_mb=MAX_MB, max_megapixels=MAX_MP,
                           output_dir=str(tmp_path_factory.mktemp("app-out")))


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    path = tmp_path_factory.mktemp("in") / "scene.png"
    Image.fromarray(example_scenes(1)[0][1]).save(path)
    return path


def test_methods_are_every_rule_and_the_shipped_runs(app):
    from vocaseg import METHODS as RULES
    from vocaseg.runs import shipped_runs

    rules = [m for m in app.methods if app.choices[m][1] is not None]
    runs = [app.choices[m][0] for m in app.methods if app.choices[m][1] is None]
    assert rules == list(RULES) and runs == list(shipped_runs())


def test_segments_like_the_segmenter(app, scene):
    classes = example_classes()
    out = app.segment(str(scene), classes, "naclip")
    seg = Segmenter.from_pretrained("toy", method="naclip", mode="whole", short_side=96)
    expected = seg.predict(scene, classes)
    assert np.array_equal(out.labels, expected.labels)
    assert out.classes == expected.classes
    # the table: every class once, largest first, shares of the label map
    counts = np.bincount(expected.labels.ravel(), minlength=len(expected.classes))
    assert [row[0] for row in out.shares][0] == expected.classes[int(counts.argmax())]
    assert sorted(row[0] for row in out.shares) == sorted(expected.classes)
    assert [row[1] for row in out.shares] == sorted((row[1] for row in out.shares), reverse=True)
    assert sum(row[1] for row in out.shares) == pytest.approx(100, abs=0.05 * len(out.shares))
    # the download is the label map itself
    assert np.array_equal(np.asarray(Image.open(out.label_png)), out.labels.astype(np.uint8))
    assert out.overlay.height >= 384 and out.seconds > 0
    assert "Segmented 128x128 into 16 classes" in out.message("naclip")


def test_trained_run_and_options(app, scene):
    label = next(m for m in app.methods if "toy-maskclip-plus)" in m)
    out = app.segment(str(scene), "sky; grass; wood", label, mode="sliding window", key_smoothing=True,
                      prompt_denoising=True, background="sand, water", threshold=0.5)
    assert out.classes == ["background", "sky", "grass", "wood"]
    assert any("Key smoothing applies to the training-free rules only" in n for n in out.notes)
    direct = Segmenter.from_pretrained("toy-maskclip-plus", mode="slide", short_side=96, prompt_denoising=0.5,
                                       prob_threshold=0.5).predict(scene, "sky; grass; wood", ["sand", "water"])
    assert np.array_equal(out.labels, direct.labels)


def _png_bytes(array, fmt="PNG"):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "notes.png").write_text("this is not an image")
    (d / "empty.jpg").write_bytes(b"")
    (d / "truncated.png").write_bytes(_png_bytes(example_scenes(1)[0][1])[:300])
    # 1200 x 1000 = 1.2 MP, truncated: the pixel limit must speak before any decoding is tried
    (d / "huge.png").write_bytes(_png_bytes(np.zeros((1000, 1200, 3), np.uint8))[:2000])
    noise = (np.random.default_rng(0).random((400, 400, 3)) * 255).astype(np.uint8)  # 0.16 MP, ~0.5 MB
    (d / "heavy.png").write_bytes(_png_bytes(noise))
    return d


CLASSES = "sky; grass"


@pytest.mark.parametrize("upload, classes, options, message", [
    (None, CLASSES, {}, "No image yet: upload or paste one"),
    ("scene", "", {}, "Type the classes to look for"),
    ("scene", " ; , ;", {}, "Type the classes to look for"),
    ("scene", "cat, dog, cat", {}, "duplicate class name 'cat'"),
    ("scene", "tv, television; sofa; television", {}, "duplicate class name 'television'"),
    ("scene", ", ".join(f"class {i}" for i in range(MAX_CLASSES + 1)), {}, f"up to {MAX_CLASSES}"),
    ("notes.png", CLASSES, {}, "not an image this app can read"),
    ("empty.jpg", CLASSES, {}, "empty (0 bytes)"),
    ("truncated.png", CLASSES, {}, "damaged or truncated"),
    ("huge.png", CLASSES, {}, "1200x1000 (1.2 megapixels); this app takes up to 1 megapixels"),
    ("heavy.png", CLASSES, {}, f"this app takes images up to {MAX_MB:g} MB"),
    (np.zeros((1001, 1000, 3), np.uint8), CLASSES, {}, "1000x1001 (1.0 megapixels)"),
    (np.zeros((4, 4, 5), np.uint8), CLASSES, {}, "That is not an image"),
    (RejectedUpload("refused by the page"), CLASSES, {}, "refused by the page"),
    ("scene", CLASSES, {"method": "no-such-method"}, "Unknown method 'no-such-method'"),
    ("scene", CLASSES, {"threshold": 1.5}, "threshold must be at least 0"),
    ("scene", CLASSES, {"mode": "sideways"}, "Unknown mode"),
    ("scene", "background; cat", {"background": "sky"}, "already include 'background'"),
])
def test_bad_input_gets_a_readable_message(app, scene, bad_files, upload, classes, options, message):
    if isinstance(upload, str):
        upload = str(scene if upload == "scene" else bad_files / upload)
    with pytest.raises(AppError, match=None) as err:
        app.segment(upload, classes, **options)
    assert message in str(err.value)
    # the page's handler: the message in the status line, nothing else, never a traceback
    args = dict(method="maskclip", mode=None, key_smoothing=False, prompt_denoising=False, background="",
                threshold=0.0) | options
    overlay, shares, status, download = app.run(upload, classes, args["method"], args["mode"], args["key_smoothing"],
                                                args["prompt_denoising"], args["background"], args["threshold"])
    assert status.startswith("**Error:**") and message in status and "Traceback" not in status
    assert overlay is None and shares == [] and download is None


def test_an_internal_failure_is_not_a_traceback(app, scene, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom in the model")

    monkeypatch.setattr(app, "segment", broken)
    _, _, status, _ = app.run(str(scene), CLASSES, "maskclip", None, False, False, "", 0.0)
    assert status.startswith("**Error:** the segmentation failed") and "boom" not in status


def test_cli_app_without_gradio_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if Gradio were not installed
    assert main(["app"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == 'vocaseg app: error: the app needs Gradio, an optional extra: pip install "vocaseg[app]"'


def test_app_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["app", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for part in ("--host", "127.0.0.1", "--port", "--max-upload-mb", "--max-megapixels", "vocaseg[app]"):
        assert part in text


def test_gradio_is_imported_only_inside_functions():
    """`import vocaseg` and the CLI work without Gradio: no module imports it at load time."""
    import ast

    import vocaseg

    for path in Path(vocaseg.__file__).parent.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:  # module level only
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] == "gradio" for n in names), path
