"""Every MaskCLIP+ preset for real data runs end to end on a tiny generated tree in its dataset's layout.

The presets' CLIP architectures (ViT-B/16, RN50) and students (DeepLab R101) are built for real, with
random weights (nothing can be downloaded here), and run for one step on 64-px crops; the papers'
crops, steps and learning rates are checked as configured values.
"""

import json

import numpy as np
import pytest
from PIL import Image

from vocaseg.cli import main
from vocaseg.methods.maskclip_plus import PRESETS


def _write(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _pairs(images, labels, names, values, suffix=".png", seed=0):
    rng = np.random.default_rng(seed)
    for name in names:
        _write(images / f"{name}.jpg", (rng.random((72, 96, 3)) * 255).astype(np.uint8))
        _write(labels / f"{name}{suffix}", rng.choice(values, size=(72, 96)).astype(np.uint8))


def make_tree(root, dataset):
    """A few images with labels for the train and val splits of ``dataset``'s on-disk layout."""
    if dataset in ("voc20", "voc21"):
        base = root / "VOC2012"
        _pairs(base / "JPEGImages", base / "SegmentationClassAug", ["t0", "t1", "t2"], [0, 3, 15, 19, 255])
        _pairs(base / "JPEGImages", base / "SegmentationClass", ["v0", "v1"], [0, 3, 16, 20, 255])
        _pairs(base / "JPEGImages", base / "SegmentationClass", ["t0", "t1", "t2"], [0, 3, 15, 19, 255])
        sets = base / "ImageSets" / "Segmentation"
        sets.mkdir(parents=True)
        (sets / "trainaug.txt").write_text("t0\nt1\nt2\n")
        (sets / "train.txt").write_text("t0\nt1\nt2\n")
        (sets / "val.txt").write_text("v0\nv1\n")
    elif dataset in ("context59", "context60"):
        base = root / "VOC2010"
        _pairs(base / "JPEGImages", base / "SegmentationClassContext", ["t0", "t1", "v0"], [0, 1, 8, 33, 59])
        sets = base / "ImageSets" / "SegmentationContext"
        sets.mkdir(parents=True)
        (sets / "train.txt").write_text("t0\nt1\n")
        (sets / "val.txt").write_text("v0\n")
    elif dataset == "coco_stuff171":
        base = root / "coco_stuff164k"
        for split, names in (("train2017", ["1", "2"]), ("val2017", ["3"])):
            _pairs(base / "images" / split, base / "annotations" / split, names, [0, 18, 111, 170, 255],
                   suffix="_labelTrainIds.png")
    elif dataset == "ade150":
        base = root / "ADEChallengeData2016"
        for split, names in (("training", ["a1", "a2"]), ("validation", ["a3"])):
            _pairs(base / "images" / split, base / "annotations" / split, names, [0, 1, 75, 150])
    else:
        raise ValueError(dataset)
    return root


REAL_PRESETS = [p for p in PRESETS if not p.startswith("synth")]


# the VOC presets run by default (one annotation-free, one zero-shot); the others, which differ in
# dataset layout and schedule numbers only, run with -m slow (each takes 12-25 s on the 2-core CPU)
@pytest.mark.parametrize("preset", [pytest.param(p, marks=[] if p in ("voc20", "voc_zs3") else [pytest.mark.slow])
                                    for p in REAL_PRESETS])
def test_preset_runs_on_a_tiny_tree(preset, tmp_path):
    values = PRESETS[preset]
    root = make_tree(tmp_path / "data", values["dataset"])
    out = tmp_path / "run"
    code = main(["train", "maskclip-plus", "--preset", preset, "--data-root", str(root), "--out", str(out),
                 "--pretrained", "none", "--student-weights", "none", "--crop", "64", "--steps", "2",
                 "--batch-size", "2", "--templates", "plain", "--eval-images", "0"])
    assert code == 0
    info = json.loads((out / "method.json").read_text())
    cfg = info["config"]
    assert cfg["preset"] == preset and cfg["student"] == values["student"] and cfg["dataset"] == values["dataset"]
    assert cfg["setting"] == values["setting"] and cfg["split_set"] == values.get("split_set")
    assert info["clip"]["model"] == values["model"]
    # the paper's schedule, as configured (the run above overrode crop, steps and batch only)
    assert (values["crop"], values["steps"], values["batch_size"]) in {
        (480, 4000, 16), (512, 8000, 16), (512, 2000, 16), (512, 20000, 16), (480, 40000, 16), (512, 80000, 16)}
    if values["setting"] == "transductive":
        assert values["self_training_from"] == values["steps"] // 10
    # the run loads and segments with any class names (the paper's protocol: whole image, short side 512)
    from vocaseg import Segmenter

    seg = Segmenter.from_pretrained(str(out), short_side=64)
    assert seg.config.mode == "whole"
    assert seg.predict(np.zeros((40, 50, 3), np.uint8), ["cat", "road"]).labels.shape == (40, 50)


def test_learned_background_is_class_zero(tmp_path):
    """context_zs3: a learned background embedding stands for class 0, at training and at inference."""
    root = make_tree(tmp_path / "data", "context60")
    out = tmp_path / "run"
    assert main(["train", "maskclip-plus", "--preset", "context_zs3", "--data-root", str(root), "--out", str(out),
                 "--pretrained", "none", "--student-weights", "none", "--crop", "64", "--steps", "1",
                 "--batch-size", "2", "--templates", "plain", "--eval-images", "0"]) == 0
    from vocaseg import Segmenter

    seg = Segmenter.from_pretrained(str(out))
    clf = seg.classifier(seg.vocabulary(["cat", "road"], background=True))
    import torch

    bg = torch.nn.functional.normalize(seg.trained.background.detach(), dim=0)
    torch.testing.assert_close(clf.weights[clf.owner == 0][0], bg)
    assert (clf.owner == 0).sum() == 1 and clf.num_classes == 3
