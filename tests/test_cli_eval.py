import json

import numpy as np
from PIL import Image

from vocaseg.cli import main


def test_eval_synth_writes_result_with_config_and_predictions(tmp_path, capsys):
    out = tmp_path / "r.json"
    preds = tmp_path / "preds"
    code = main(["eval", "--dataset", "synth", "--limit", "4", "--model", "toy", "--pretrained", "none",
                 "--templates", "photo", "--workers", "0", "--split-set", "synth_zs", "--out", str(out),
                 "--save-predictions", str(preds)])
    assert code == 0
    r = json.loads(out.read_text())
    for key in ("aAcc", "mIoU", "mAcc", "fwIoU", "per_class", "num_images", "mIoU_seen", "mIoU_unseen", "hIoU"):
        assert key in r
    assert r["num_images"] == 4 and len(r["per_class"]) == 16
    assert r["config"]["inference"]["short_side"] == 96 and r["config"]["method"] == "maskclip"
    assert "mIoU" in capsys.readouterr().out  # the table is printed
    # predictions written by eval score to the same numbers with `score`
    out2 = tmp_path / "s.json"
    assert main(["score", "--dataset", "synth", "--limit", "4", "--pred-dir", str(preds), "--out", str(out2)]) == 0
    assert json.loads(out2.read_text())["mIoU"] == r["mIoU"]


def test_eval_folder_dataset(tmp_path):
    from vocaseg.data.synth import export_folder

    export_folder(tmp_path / "data", split="val", count=2)
    out = tmp_path / "r.json"
    assert main(["eval", "--dataset", "folder", "--data-root", str(tmp_path / "data"), "--model", "toy",
                 "--pretrained", "none", "--templates", "photo", "--workers", "1", "--short-side", "96",
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text())["num_images"] == 2


def test_eval_errors_name_the_problem(tmp_path, capsys):
    assert main(["eval", "--dataset", "voc21", "--data-root", str(tmp_path / "none"), "--model", "toy"]) == 2
    assert "does not exist" in capsys.readouterr().err
    root = tmp_path / "d"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "classes.txt").write_text("a\nb\n")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "images" / "x.png")
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(root / "labels" / "x.png")
    for workers in ("0", "1"):
        assert main(["eval", "--dataset", "folder", "--data-root", str(root), "--model", "toy", "--pretrained",
                     "none", "--templates", "photo", "--workers", workers]) == 2
        err = capsys.readouterr().err
        assert "x.png: label size 8x9 differs" in err and "Traceback" not in err
