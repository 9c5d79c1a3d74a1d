"""MaskCLIP+: pseudo-label rules, phases, frozen parts, the loss, training, run folders, settings."""

import json

import numpy as np
import pytest
import torch

from vocaseg.methods.maskclip_plus import (IGNORE_INDEX, UNLABELED, MaskClipPlusRecipe, fill_pseudo_labels,
                                           label_function, make_config, mean_over_all_pixels_ce,
                                           train_maskclip_plus)


def tiny_config(out, **kw):
    """The toy recipe shrunk to seconds on a CPU: 64-px crops, batch 4."""
    base = dict(out=str(out), steps=6, batch_size=4, crop=64, eval_images=0, progress=False, checkpoint_every=2,
                templates="photo", log_every=1)
    base.update(kw)
    return make_config("synth", **base)


# ---------------------------------------------------------------------------- pseudo labels
def test_only_unlabeled_pixels_are_rewritten():
    labels = torch.tensor([[[UNLABELED, 2, IGNORE_INDEX], [UNLABELED, UNLABELED, 0]]])
    scores = torch.zeros(1, 4, 2, 3)
    scores[0, 3] = 1.0  # class 3 wins everywhere
    out = fill_pseudo_labels(labels, scores, torch.tensor([True, True, True, True]))
    assert out.tolist() == [[[3, 2, IGNORE_INDEX], [3, 3, 0]]]
    assert labels[0, 0, 0] == UNLABELED  # the input is not modified


def test_argmax_stays_among_candidates():
    torch.manual_seed(0)
    labels = torch.full((2, 8, 8), UNLABELED)
    scores = torch.randn(2, 5, 4, 4)
    scores[:, 0] += 10  # a non-candidate that would win everywhere
    candidates = torch.tensor([False, True, False, True, True])
    out = fill_pseudo_labels(labels, scores, candidates)
    assert set(out.unique().tolist()) <= {1, 3, 4}
    up = torch.nn.functional.interpolate(scores, size=(8, 8), mode="bilinear", align_corners=False)
    assert torch.equal(out, up[:, [1, 3, 4]].argmax(1).new_tensor([1, 3, 4])[up[:, [1, 3, 4]].argmax(1)])


def test_confidence_threshold_ignores_unsure_pixels():
    labels = torch.full((1, 1, 2), UNLABELED)
    scores = torch.tensor([[[[5.0, 0.0]], [[0.0, 0.0]]]])  # sure at pixel 0, a tie at pixel 1
    out = fill_pseudo_labels(labels, scores, torch.tensor([True, True]), confidence=0.9)
    assert out.tolist() == [[[0, IGNORE_INDEX]]]


def test_loss_is_averaged_over_all_pixels():
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 4, 4)
    labels = torch.randint(0, 3, (2, 4, 4))
    labels[0, :2] = IGNORE_INDEX
    per_pixel = torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
    assert per_pixel[labels == IGNORE_INDEX].eq(0).all()
    torch.testing.assert_close(mean_over_all_pixels_ce(logits, labels), per_pixel.sum() / 32)


def test_label_maps_of_each_setting():
    gt = torch.tensor([0, 1, 2, 3, IGNORE_INDEX])
    seen = torch.tensor([True, True, False, False])  # classes 2 and 3 unseen
    assert label_function("annotation-free", "unseen-gt", seen, void_from_gt=False) is None  # no label read at all
    void = label_function("annotation-free", "unseen-gt", seen, void_from_gt=True)
    assert void(gt).tolist() == [UNLABELED] * 4 + [IGNORE_INDEX]
    official = label_function("transductive", "unseen-gt", seen, False)
    assert official(gt).tolist() == [0, 1, UNLABELED, UNLABELED, IGNORE_INDEX]
    strict = label_function("transductive", "strict", seen, False)
    assert strict(gt).tolist() == [0, 1, UNLABELED, UNLABELED, UNLABELED]
    supervised = label_function("supervised", "unseen-gt", seen, False)
    assert supervised(gt).tolist() == [0, 1, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]


# ---------------------------------------------------------------------------- the recipe
@pytest.fixture(scope="module")
def zs3_recipe(tmp_path_factory):
    cfg = tiny_config(tmp_path_factory.mktemp("zs3"), setting="transductive", split_set="synth_zs",
                      self_training_from=4)
    return MaskClipPlusRecipe(cfg)


def test_phase_switches_at_the_exact_step(zs3_recipe):
    assert [zs3_recipe.phase(s) for s in (1, 3, 4, 5)] == ["guided", "guided", "self-training", "self-training"]
    never = MaskClipPlusRecipe.__new__(MaskClipPlusRecipe)
    never.cfg = make_config("synth", out="x")
    assert never.phase(10 ** 6) == "guided"  # annotation-free: guided learning throughout


def test_transductive_candidates_are_the_unseen_classes(zs3_recipe):
    names = [zs3_recipe.vocab.names[i] for i in zs3_recipe.candidates.nonzero().flatten()]
    assert names == ["wood", "hexagon", "crescent"]


def test_annotation_free_never_reads_labels(tmp_path, monkeypatch):
    from vocaseg.data.datasets import SegDataset

    recipe = MaskClipPlusRecipe(tiny_config(tmp_path))

    def no_labels(*a, **k):
        raise AssertionError("annotation-free training read a label")

    monkeypatch.setattr(SegDataset, "read_label", no_labels)
    monkeypatch.setattr(type(recipe.train_data), "__getitem__", no_labels)
    stream = recipe.dataset()
    pixels, mask = stream[0]
    assert pixels.shape == (3, 64, 64) and set(mask.unique().tolist()) <= {UNLABELED, IGNORE_INDEX}


def test_teacher_and_text_classifier_never_change_and_loss_falls(tmp_path):
    from safetensors.torch import load_file

    from vocaseg.training.loop import sgd_poly_config
    from vocaseg.training.loop import read_log, train

    cfg = tiny_config(tmp_path, steps=20, lr=0.05, checkpoint_every=100)
    recipe = MaskClipPlusRecipe(cfg)
    teacher = {k: v.clone() for k, v in recipe.clip.backbone.clip.state_dict().items()}
    text = recipe.text_classifier.weights.clone()
    train(recipe, sgd_poly_config(cfg))
    for k, v in recipe.clip.backbone.clip.state_dict().items():
        assert torch.equal(v, teacher[k]), k
    assert torch.equal(recipe.text_classifier.weights, text)
    assert len([r for r in read_log(tmp_path / "log.jsonl") if "loss" in r]) == 20
    for name in ("method.json", "weights.safetensors", "state.pt", "log.jsonl", "curves.png"):
        assert (tmp_path / name).is_file(), name

    # the training loss on crops it never saw (same teacher labels), before and after training
    stream = recipe.dataset()
    pixels, labels = (torch.stack(t) for t in zip(*[stream[10_000 + i] for i in range(16)]))
    labels = fill_pseudo_labels(labels, recipe.teacher_scores(pixels), recipe.candidates)

    def loss_of(model):  # batch statistics: 20 steps are too few for BatchNorm's running averages
        model.train()
        with torch.no_grad():
            return mean_over_all_pixels_ce(model.logits(pixels, recipe.text_classifier), labels).item()

    torch.manual_seed(cfg.seed)
    initial = recipe.build()
    final = recipe.build()
    final.load_state_dict(load_file(str(tmp_path / "weights.safetensors")))
    assert loss_of(final) < 0.8 * loss_of(initial), (loss_of(initial), loss_of(final))


# ---------------------------------------------------------------------------- run folders
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train_maskclip_plus(tiny_config(out, steps=2))
    return out


def test_run_folder_contents(run_dir):
    info = json.loads((run_dir / "method.json").read_text())
    assert info["method"] == "maskclip-plus" and info["setting"] == "annotation-free" and info["format"] == 1
    assert info["clip"]["model"] == "toy" and info["clip"]["pretrained"] == "default"
    assert "fingerprint" in info["clip"] and len(info["classes"]) == 16
    assert info["inference"] == {"mode": "whole", "short_side": 96}
    assert info["config"]["steps"] == 2 and info["command"]
    from safetensors.torch import load_file

    weights = load_file(str(run_dir / "weights.safetensors"))
    assert all(k.startswith("student.") for k in weights)  # only what was trained: no CLIP inside


def test_run_folder_loads_and_stays_open_vocabulary(run_dir):
    from vocaseg import Segmenter

    seg = Segmenter.from_pretrained(str(run_dir))
    assert seg.method == "maskclip-plus" and seg.logit_scale == 1.0
    img = (np.random.default_rng(0).random((70, 90, 3)) * 255).astype(np.uint8)
    res = seg.predict(img, ["a red thing", "sky, clouds", "grass"])
    assert res.labels.shape == (70, 90) and res.probs.shape == (3, 70, 90)
    # the same CLIP without the trained part, on request
    assert seg.with_options(method="maskclip").predict(img, ["sky", "grass"]).labels.shape == (70, 90)


def test_run_folder_through_every_command(run_dir, tmp_path, capsys):
    from PIL import Image

    from vocaseg.cli import main

    out = tmp_path / "r.json"
    preds = tmp_path / "preds"
    assert main(["eval", "--dataset", "synth", "--limit", "4", "--model", str(run_dir), "--workers", "0",
                 "--out", str(out), "--save-predictions", str(preds)]) == 0
    r = json.loads(out.read_text())
    assert r["config"]["method"] == "maskclip-plus" and r["config"]["inference"]["mode"] == "whole"
    assert main(["score", "--dataset", "synth", "--limit", "4", "--pred-dir", str(preds),
                 "--out", str(tmp_path / "s.json")]) == 0
    assert json.loads((tmp_path / "s.json").read_text())["mIoU"] == r["mIoU"]
    img = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8)).save(img)
    assert main(["segment", str(img), "--classes", "sky, grass", "--model", str(run_dir),
                 "--out", str(tmp_path / "seg")]) == 0
    assert json.loads((tmp_path / "seg" / "in.json").read_text())["method"] == "maskclip-plus"
    assert main(["bench", "--model", str(run_dir), "--images", "1", "--device", "cpu"]) == 0
    assert "images/s" in capsys.readouterr().out


# ---------------------------------------------------------------------------- errors users meet
def test_errors_name_the_problem(run_dir, tmp_path, capsys):
    from vocaseg.cli import main

    def error_of(argv):
        assert main(argv) == 2
        return capsys.readouterr().err

    assert "already holds a run" in error_of(["train", "maskclip-plus", "--out", str(run_dir), "--steps", "1"])
    assert "unknown preset" in error_of(["train", "maskclip-plus", "--preset", "nope", "--out", str(tmp_path / "a")])
    assert "does not exist" in error_of(["train", "maskclip-plus", "--dataset", "voc20", "--data-root",
                                         str(tmp_path / "missing"), "--out", str(tmp_path / "b")])
    assert "--split-set" in error_of(["train", "maskclip-plus", "--setting", "transductive",
                                      "--out", str(tmp_path / "c")])
    assert "nothing to resume" in error_of(["train", "maskclip-plus", "--out", str(tmp_path / "d"), "--resume"])
    # an empty class file for a folder dataset
    root = tmp_path / "folder"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "classes.txt").write_text("# nothing\n")
    assert "empty" in error_of(["train", "maskclip-plus", "--dataset", "folder", "--data-root", str(root),
                                "--out", str(tmp_path / "e")])


def test_resuming_a_run_of_another_method_is_refused(tmp_path):
    from vocaseg.training.loop import prepare_out_dir

    torch.save({"method": "clip", "step": 3}, tmp_path / "state.pt")
    with pytest.raises(ValueError, match="'clip' run"):
        prepare_out_dir(tmp_path, "maskclip-plus", resume=True, overwrite=False)


def test_run_whose_clip_weights_are_missing(run_dir, tmp_path):
    import shutil

    from vocaseg.loading import TOY_DIR, WeightsUnavailableError
    from vocaseg.runs import RunError, load_run

    moved = tmp_path / "run"
    shutil.copytree(run_dir, moved)
    info = json.loads((moved / "method.json").read_text())
    clip_file = tmp_path / "clip.safetensors"
    shutil.copy(TOY_DIR / "open_clip_model.safetensors", clip_file)
    info["clip"]["pretrained"] = str(clip_file)
    (moved / "method.json").write_text(json.dumps(info))
    load_run(moved)  # the same weights from another file: fine
    clip_file.unlink()
    with pytest.raises(WeightsUnavailableError, match="not there"):
        load_run(moved)
    info["clip"]["pretrained"] = "default"
    info["clip"]["fingerprint"]["size"] += 1  # other weights than it was trained with
    (moved / "method.json").write_text(json.dumps(info))
    with pytest.raises(RunError, match="differ"):
        load_run(moved)
    info["format"] = 99
    (moved / "method.json").write_text(json.dumps(info))
    with pytest.raises(RunError, match="newer vocaseg"):
        load_run(moved)


def test_run_on_random_clip_weights_reloads_the_same_weights(tmp_path):
    """Runs trained on a random CLIP (tests, speed runs) name the seed that drew it."""
    from vocaseg import Segmenter

    cfg = tiny_config(tmp_path, steps=1, pretrained="none")  # None would mean "the preset's"
    recipe = MaskClipPlusRecipe(cfg)
    from vocaseg.training.loop import sgd_poly_config
    from vocaseg.training.loop import train

    train(recipe, sgd_poly_config(cfg))
    assert json.loads((tmp_path / "method.json").read_text())["clip"]["random_init_seed"] == 0
    seg = Segmenter.from_pretrained(str(tmp_path))
    torch.testing.assert_close(seg.classifier(recipe.vocab).weights, recipe.text_classifier.weights)


def test_resuming_a_random_clip_run_keeps_random_weights(tmp_path):
    """--pretrained none stays in the saved config, so --resume does not fall back to the preset's weights."""
    from vocaseg.cli import main

    out = tmp_path / "r"
    assert main(["train", "maskclip-plus", "--out", str(out), "--pretrained", "none", "--steps", "2",
                 "--batch-size", "2", "--crop", "64", "--eval-images", "0", "--templates", "photo"]) == 0
    assert main(["train", "maskclip-plus", "--out", str(out), "--resume"]) == 0
    info = json.loads((out / "method.json").read_text())
    assert info["clip"]["pretrained"] is None and info["clip"]["random_init_seed"] == 0
    assert "fingerprint" not in info["clip"]
