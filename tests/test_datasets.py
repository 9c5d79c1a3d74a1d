"""Each on-disk layout read from a small generated tree; bad data gives errors that name the file."""

import json

import numpy as np
import pytest
from PIL import Image

from vocaseg.cli import main
from vocaseg.data.datasets import DatasetError, build_dataset


def _write(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _pair(img_path, lbl_path, values, size=(12, 16)):
    rng = np.random.default_rng(0)
    _write(img_path, (rng.random(size + (3,)) * 255).astype(np.uint8))
    _write(lbl_path, rng.choice(values, size=size).astype(np.uint8))


def test_voc_layouts(tmp_path):
    base = tmp_path / "VOCdevkit" / "VOC2012"
    for i in ("a", "b"):
        _pair(base / "JPEGImages" / f"{i}.jpg", base / "SegmentationClass" / f"{i}.png", [0, 1, 20, 255])
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("a\nb\n")
    v21 = build_dataset("voc21", tmp_path)
    assert len(v21) == 2 and v21.classes[0] == "background" and len(v21.classes) == 21
    assert v21.protocol["logit_scale"] == 65.0 and v21.protocol["short_side"] == 336
    s = v21[0]
    assert set(np.unique(s.label)) <= {0, 1, 20, 255}
    v20 = build_dataset("voc20", base)
    lab = v20[0].label
    assert set(np.unique(lab)) <= {0, 19, 255}  # 0 -> ignore, k -> k-1
    assert len(v20.classes) == 20


def test_context_ade_cityscapes_coco_layouts(tmp_path):
    ctx = tmp_path / "VOC2010"
    _pair(ctx / "JPEGImages" / "x.jpg", ctx / "SegmentationClassContext" / "x.png", [0, 5, 59])
    (ctx / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    (ctx / "ImageSets" / "SegmentationContext" / "val.txt").write_text("x\n")
    assert len(build_dataset("context60", tmp_path).classes) == 60
    assert set(np.unique(build_dataset("context59", ctx)[0].label)) <= {4, 58, 255}

    ade = tmp_path / "ADEChallengeData2016"
    _pair(ade / "images" / "validation" / "ADE_val_1.jpg", ade / "annotations" / "validation" / "ADE_val_1.png", [0, 1, 150])
    d = build_dataset("ade150", tmp_path)
    assert len(d.classes) == 150 and set(np.unique(d[0].label)) <= {0, 149, 255}

    cs = tmp_path / "cityscapes"
    _pair(cs / "leftImg8bit" / "val" / "berlin" / "berlin_1_leftImg8bit.png",
          cs / "gtFine" / "val" / "berlin" / "berlin_1_gtFine_labelTrainIds.png", [0, 18, 255])
    d = build_dataset("cityscapes19", tmp_path)
    assert len(d) == 1 and d.pairs[0][0] == "berlin_1_leftImg8bit" and d.protocol["short_side"] == 560

    coco = tmp_path / "coco_stuff164k"
    _pair(coco / "images" / "val2017" / "1.jpg", coco / "annotations" / "val2017" / "1_labelTrainIds.png", [0, 170, 255])
    _write(coco / "annotations" / "val2017" / "1_instanceTrainIds.png", np.full((12, 16), 80, np.uint8))
    assert len(build_dataset("coco_stuff171", tmp_path).classes) == 171
    obj = build_dataset("coco_object", tmp_path)
    assert len(obj.classes) == 81 and obj[0].label.max() == 80


def _folder(tmp_path, n=3, classes="sky\nroad\ncar, automobile\n"):
    for i in range(n):
        _pair(tmp_path / "images" / f"im{i}.png", tmp_path / "labels" / f"im{i}.png", [0, 1, 2, 255])
    (tmp_path / "classes.txt").write_text(classes)
    return tmp_path


def test_folder_dataset_and_errors(tmp_path):
    root = _folder(tmp_path)
    d = build_dataset("folder", root)
    assert d.classes == ["sky", "road", "car"] and len(d) == 3
    # size mismatch
    _write(root / "labels" / "im0.png", np.zeros((5, 5), np.uint8))
    with pytest.raises(DatasetError, match="im0.png.*differs"):
        d[0]
    # value outside the class range
    _write(root / "labels" / "im1.png", np.full((12, 16), 7, np.uint8))
    with pytest.raises(DatasetError, match=r"im1.png: label values \[7\]"):
        d[1]
    # missing label
    (root / "labels" / "im2.png").unlink()
    with pytest.raises(DatasetError, match="im2.png: label file missing"):
        d[2]
    # unreadable image
    (root / "images" / "im2.png").write_bytes(b"not a png")
    _write(root / "labels" / "im2.png", np.zeros((12, 16), np.uint8))
    with pytest.raises(DatasetError, match="im2.png"):
        d[2]


def test_empty_split_is_an_error(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    (tmp_path / "classes.txt").write_text("a\n")
    with pytest.raises(DatasetError, match="no images"):
        build_dataset("folder", tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        build_dataset("voc21", tmp_path / "nope")


def test_score_end_to_end(tmp_path, capsys):
    root = _folder(tmp_path / "data")
    preds = tmp_path / "preds"
    preds.mkdir()
    d = build_dataset("folder", root)
    for sid, _, lbl in d.pairs:  # perfect predictions except image 0, all 'sky'
        label = np.asarray(Image.open(lbl))
        Image.fromarray(label if sid != "im0" else np.zeros_like(label)).save(preds / f"{sid}.png")
    out = tmp_path / "r.json"
    assert main(["score", "--dataset", "folder", "--data-root", str(root), "--pred-dir", str(preds),
                 "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["num_images"] == 3 and 0 < r["mIoU"] < 100 and set(r["per_class"]) == {"sky", "road", "car"}
    assert r["config"]["dataset"] == "folder"
    # an existing result is never overwritten without --overwrite
    main(["score", "--dataset", "folder", "--data-root", str(root), "--pred-dir", str(preds), "--out", str(out)])
    assert len(list(tmp_path.glob("r*.json"))) == 2
    # a missing prediction is an error naming the file
    (preds / "im1.png").unlink()
    assert main(["score", "--dataset", "folder", "--data-root", str(root), "--pred-dir", str(preds)]) == 2
    assert "im1.png: prediction missing" in capsys.readouterr().err


def test_camvid_sample(shared_data):
    d = build_dataset("folder", shared_data / "camvid", image_dir="val", label_dir="valannot",
                      classes_file=str(_camvid_classes(shared_data)), ignore_index=11)
    assert len(d) == 101
    s = d[0]
    assert s.image.shape == (360, 480, 3) and s.label.shape == (360, 480)
    assert set(np.unique(s.label)) <= set(range(11)) | {255}


def _camvid_classes(shared_data):
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / "camvid.txt"
    path.write_text("sky\nbuilding\npole\nroad\npavement, sidewalk\ntree\nsign, symbol\nfence\ncar\n"
                    "pedestrian, person\nbicyclist, cyclist\n")
    return path


def test_ade_sample(shared_data, tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    (root / "images" / "validation").symlink_to(shared_data / "ade20k_sample" / "images")
    (root / "annotations" / "validation").symlink_to(shared_data / "ade20k_sample" / "annotations")
    d = build_dataset("ade150", tmp_path)
    assert len(d) == 3
    for i in range(3):
        s = d[i]
        assert s.label.shape == s.image.shape[:2] and s.label[s.label != 255].max() < 150
