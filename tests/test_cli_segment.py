"""`vocaseg segment` end to end on generated images, including every kind of bad input."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from vocaseg.cli import main
from vocaseg.images import read_image

ARGS = ["--model", "toy", "--pretrained", "none", "--templates", "photo", "--short-side", "96"]


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    rng = np.random.default_rng(0)
    rgb = (rng.random((60, 80, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(d / "rgb.png")
    Image.fromarray(rgb[..., 0]).save(d / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full((60, 80), 128, np.uint8)])).save(d / "rgba.png")
    Image.fromarray(rgb).convert("P").save(d / "palette.png")
    Image.fromarray((rng.random((60, 80)) * 65535).astype(np.uint16)).save(d / "sixteen.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.fromarray(rgb).save(d / "rotated.jpg", exif=exif.tobytes())
    (d / "empty.jpg").write_bytes(b"")
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG")
    (d / "truncated.jpg").write_bytes(buf.getvalue()[:200])
    (d / "notes.png").write_text("this is not an image")
    return d


def test_read_image_modes(images):
    assert read_image(images / "gray.png").shape == (60, 80, 3)
    assert read_image(images / "rgba.png").shape == (60, 80, 3)
    assert read_image(images / "palette.png").shape == (60, 80, 3)
    six = read_image(images / "sixteen.png")
    assert six.dtype == np.uint8 and six.max() > 200  # scaled from 16 bit, not clipped to 255
    assert read_image(images / "rotated.jpg").shape == (80, 60, 3)  # EXIF orientation applied


def test_segment_end_to_end_with_bad_files(images, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["segment", str(images), "--classes", "sky, road, car", "--out", str(out)] + ARGS)
    err = capsys.readouterr().err
    assert code == 1  # some inputs failed, the rest were segmented
    for bad, why in [("empty.jpg", "empty file"), ("truncated.jpg", "truncated"), ("notes.png", "not an image")]:
        assert bad in err and why in err
    for good, shape in [("rgb", (60, 80)), ("gray", (60, 80)), ("rgba", (60, 80)), ("palette", (60, 80)),
                        ("sixteen", (60, 80)), ("rotated", (80, 60))]:
        labels = np.asarray(Image.open(out / f"{good}.png"))
        assert labels.shape == shape and labels.max() < 3
        assert (out / f"{good}_overlay.png").is_file()
        info = json.loads((out / f"{good}.json").read_text())
        assert info["classes"] == ["sky", "road", "car"]
        assert sum(info["fractions"].values()) == pytest.approx(1.0)


def test_segment_never_overwrites(images, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["segment", str(images / "rgb.png"), "--classes", "sky, road", "--out", str(out)] + ARGS
    assert main(args) == 0
    (out / "rgb.json").write_text("user data")
    assert main(args) == 0
    assert (out / "rgb.json").read_text() == "user data"
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    assert json.loads((out / "rgb.json").read_text())["classes"] == ["sky", "road"]


def test_glob_and_background(images, tmp_path):
    out = tmp_path / "out"
    assert main(["segment", str(images / "r*.png"), "--classes", "car; road, street", "--background",
                 "sky,wall", "--out", str(out)] + ARGS) == 0
    info = json.loads((out / "rgb.json").read_text())
    assert info["classes"] == ["background", "car", "road"]
    assert not (out / "gray.json").exists()


@pytest.mark.parametrize("classes", ["", " , ", "cat, dog, Cat"])
def test_bad_class_list_rejected_before_loading(classes, images, tmp_path, capsys, monkeypatch):
    import vocaseg.loading

    def boom(*a, **k):
        raise AssertionError("model loaded before the class list was checked")

    monkeypatch.setattr(vocaseg.loading, "load_clip", boom)
    code = main(["segment", str(images / "rgb.png"), "--classes", classes, "--out", str(tmp_path / "o")] + ARGS)
    assert code == 2
    assert "error:" in capsys.readouterr().err


def test_missing_input_and_unknown_model(tmp_path, capsys):
    assert main(["segment", str(tmp_path / "nope.jpg"), "--classes", "a, b", "--out", str(tmp_path / "o")]
                + ARGS) == 1
    assert "nope.jpg: file not found" in capsys.readouterr().err
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    assert main(["segment", str(img), "--classes", "a, b", "--model", "ViT-Q-99", "--out", str(tmp_path / "o")]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_missing_local_checkpoint(tmp_path, capsys):
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    assert main(["segment", str(img), "--classes", "a, b", "--model", "RN50", "--pretrained",
                 str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o")]) == 2
    assert "checkpoint file not found" in capsys.readouterr().err


def test_banded_tint_and_overlay_equal_one_pass(monkeypatch):
    """Huge photos are tinted in bands of rows; the picture is the same as in one pass."""
    from vocaseg import visualize

    rng = np.random.default_rng(0)
    image = (rng.random((37, 23, 3)) * 255).astype(np.uint8)
    labels = rng.integers(0, 4, (37, 23))
    labels[:5] = 255
    one_pass = visualize.tint(image, labels, 4)
    colours = visualize.colourise(labels, 4).astype(np.float32)
    want = (image.astype(np.float32) * 0.5 + colours * 0.5).astype(np.uint8)
    want[labels == 255] = image[labels == 255]
    assert np.array_equal(one_pass, want)
    whole = np.asarray(visualize.overlay(image, labels, ["a", "b", "c", "d"], title="t"))
    monkeypatch.setattr(visualize, "BAND_PIXELS", 23 * 4)  # bands of 4 rows
    assert np.array_equal(visualize.tint(image, labels, 4), one_pass)
    assert np.array_equal(np.asarray(visualize.overlay(image, labels, ["a", "b", "c", "d"], title="t")), whole)


def test_banded_overlay_of_compact_labels_and_counts(monkeypatch):
    """`vocaseg segment` hands uint8 labels to the overlay and counts them in bands: same picture, same counts."""
    from vocaseg import visualize

    rng = np.random.default_rng(1)
    image = (rng.random((37, 23, 3)) * 255).astype(np.uint8)
    labels = rng.integers(0, 6, (37, 23))
    labels[:3] = 255
    whole = np.asarray(visualize.overlay(image, labels, list("abcdef")))
    monkeypatch.setattr(visualize, "BAND_PIXELS", 23 * 4 + 5)  # bands that cut rows
    compact = labels.astype(np.uint8)
    np.testing.assert_array_equal(visualize.label_counts(compact, 300), np.bincount(labels.ravel(), minlength=300))
    np.testing.assert_array_equal(visualize.label_counts(compact[:0]), [0])
    assert np.array_equal(np.asarray(visualize.overlay(image, compact, list("abcdef"))), whole)


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "CMYK", "I;16"])
def test_photos_are_copied_out_of_pil_in_bands_with_the_same_pixels(monkeypatch, tmp_path, mode):
    from vocaseg import images as images_module

    rng = np.random.default_rng(2)
    img = Image.fromarray((rng.random((41, 29, 3)) * 255).astype(np.uint8))
    img = img.convert("I;16") if mode == "I;16" else img.convert(mode)
    path = tmp_path / ("x.tif" if mode in ("CMYK", "I;16") else "x.png")
    img.save(path)
    want = read_image(path)
    monkeypatch.setattr(images_module, "BAND_PIXELS", 29 * 3 + 1)  # 3-row bands, the last one short
    got = read_image(path)
    assert got.shape == (41, 29, 3) and got.dtype == np.uint8 and got.flags.writeable
    assert np.array_equal(got, want)
