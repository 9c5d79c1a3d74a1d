"""`vocaseg gallery`: every method is a column, each panel shows what that method predicted, and the
header numbers are what `vocaseg eval` gives on the same scenes."""

import json

import numpy as np
import pytest
from PIL import Image

from vocaseg import METHODS as RULES
from vocaseg.cli import main
from vocaseg.data.datasets import build_dataset
from vocaseg.gallery import cell_image, panel_box
from vocaseg.runs import shipped_runs

SCENES = 2


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    out = tmp_path_factory.mktemp("gallery")
    assert main(["gallery", "--out", str(out), "--scenes", str(SCENES)]) == 0
    return out, json.loads((out / "gallery.json").read_text()), Image.open(out / "gallery.png").convert("RGB")


def test_every_method_is_a_column(gallery):
    _, info, grid = gallery
    methods = [m["method"] for m in info["methods"]]
    assert methods[:len(RULES)] == list(RULES)
    assert [m["model"] for m in info["methods"][len(RULES):]] == list(shipped_runs())
    assert info["layout"]["columns"][:2] == ["image", "ground truth"]
    assert len(info["layout"]["columns"]) == 2 + len(info["methods"])
    right, bottom = panel_box(SCENES - 1, len(info["layout"]["columns"]) - 1)[2:]
    assert grid.width >= right and grid.height > bottom  # the legend sits below the last row


def test_panels_show_image_truth_and_each_prediction(gallery, tmp_path):
    out, info, grid = gallery
    ds = build_dataset("synth", split="test", length=SCENES)
    n = len(ds.classes)
    for row in range(SCENES):
        s = ds[row]
        assert np.array_equal(np.asarray(grid.crop(panel_box(row, 0))), np.asarray(cell_image(s.image, None, n)))
        assert np.array_equal(np.asarray(grid.crop(panel_box(row, 1))), np.asarray(cell_image(s.image, s.label, n)))
    # two columns checked against `vocaseg eval` of the same method on the same scenes
    for col in (info["layout"]["columns"].index("NACLIP"), info["layout"]["columns"].index("toy-reclip-rect")):
        rec = info["methods"][col - 2]
        preds = tmp_path / rec["label"]
        args = ["eval", "--dataset", "synth", "--split", "test", "--limit", str(SCENES), "--model", rec["model"],
                "--workers", "0", "--save-predictions", str(preds), "--out", str(tmp_path / f"{rec['label']}.json")]
        if rec["kind"] == "training-free":
            args += ["--method", rec["method"]]
        assert main(args) == 0
        assert json.loads((tmp_path / f"{rec['label']}.json").read_text())["mIoU"] == pytest.approx(rec["mIoU"])
        for row in range(SCENES):
            s = ds[row]
            pred = np.asarray(Image.open(preds / f"{s.id}.png")).astype(np.int64)
            panel = np.asarray(grid.crop(panel_box(row, col))).copy()
            expected = np.asarray(cell_image(s.image, pred, n)).copy()
            panel[:20, :40] = expected[:20, :40] = 0  # the corner holds the image's own mIoU
            assert np.array_equal(panel, expected), (rec["label"], row)


def test_methods_differ_and_scores_are_percentages(gallery):
    _, info, _ = gallery
    scores = [m["mIoU"] for m in info["methods"]]
    assert all(0 <= s <= 100 for s in scores) and len(set(scores)) > 1
    assert all(len(m["scene_mIoU"]) == SCENES for m in info["methods"])


def test_gallery_is_not_overwritten(gallery, capsys):
    out, _, _ = gallery
    assert main(["gallery", "--out", str(out), "--scenes", "1"]) == 2
    assert "--overwrite" in capsys.readouterr().err
