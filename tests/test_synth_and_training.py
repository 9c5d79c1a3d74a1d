import hashlib

import numpy as np
import pytest
import torch

from vocaseg.data.synth import CLASSES, SynthScenes, make_scene


def test_generator_is_deterministic_and_seeded():
    a, b = make_scene(7, "val"), make_scene(7, "val")
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask) and a.caption == b.caption
    assert not np.array_equal(make_scene(8, "val").image, a.image)
    assert not np.array_equal(make_scene(7, "test").image, a.image)
    assert not np.array_equal(make_scene(7, "val", seed=1).image, a.image)


def test_generator_pixels_are_pinned():
    """The same seed gives the same pixels on any machine: pinned by a digest of fixed scenes."""
    h = hashlib.sha256()
    scenes = [make_scene(i, "val") for i in range(4)] + [make_scene(i, "train", size=96) for i in range(6)]
    for s in scenes:
        h.update(s.image.tobytes())
        h.update(s.mask.astype(np.uint8).tobytes())
        h.update(s.caption.encode())
    assert h.hexdigest()[:16] == PINNED_DIGEST


PINNED_DIGEST = "3b3eccf862d4911d"  # update deliberately when the world changes


def test_scene_content():
    for i in range(20):
        s = make_scene(i, "val", size=128)
        assert s.image.shape == (128, 128, 3) and s.image.dtype == np.uint8
        assert s.mask.shape == (128, 128) and s.mask.max() < len(CLASSES)
        present = {CLASSES[c] for c in np.unique(s.mask)}
        # every named class is visible (captions never name what is not there)
        for name in CLASSES:
            if f" {name}" in f" {s.caption}".replace(",", " "):
                assert name in present, (s.caption, present)
    assert len(SynthScenes("val")) == 500 and len(SynthScenes("test")) == 500


def test_export_to_folder_layout(tmp_path):
    from vocaseg.data.datasets import build_dataset
    from vocaseg.data.synth import export_folder

    export_folder(tmp_path, split="val", count=3)
    ds = build_dataset("folder", tmp_path)
    assert len(ds) == 3 and ds.classes == list(CLASSES)
    assert np.array_equal(ds[0].label, make_scene(0, "val").mask)


def _train(tmp_path, resume=False, steps=4):
    from vocaseg.training.clip_pretrain import ClipPretrainConfig, train_clip

    cfg = ClipPretrainConfig(out=str(tmp_path), steps=steps, batch_size=4, checkpoint_every=2, warmup_steps=2,
                             workers=0, eval_scenes=8, resume=resume)
    return train_clip(cfg)


def test_training_resume_is_exact(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    _train(tmp_path / "straight")
    # a second run, killed after step 2 (its checkpoint was written), then resumed
    calls = {"n": 0}
    real_step = torch.optim.AdamW.step

    def dying_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "resumed")
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    with pytest.raises(FileExistsError):
        _train(tmp_path / "resumed")  # never silently restart over an existing run
    info = _train(tmp_path / "resumed", resume=True)
    assert info["steps"] == 4
    a = load_file(str(tmp_path / "straight" / "open_clip_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "open_clip_model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_twins_differ_only_in_shapes():
    from vocaseg.data.synth import STUFF_CLASSES

    for i in range(10):
        a, b = make_scene(i, "train", size=96), make_scene(i, "train", size=96, twin=1)
        stuff_a, stuff_b = a.mask < len(STUFF_CLASSES), b.mask < len(STUFF_CLASSES)
        both = stuff_a & stuff_b  # background visible in both: identical pixels and classes
        assert np.array_equal(a.image[both], b.image[both]) and np.array_equal(a.mask[both], b.mask[both])
        assert a.caption != b.caption or "a " not in a.caption


def test_things_wear_their_class_colours_and_train_has_closeups():
    from vocaseg.data.synth import COLOUR_FAMILIES, COLOURS, STUFF_CLASSES, THING_CLASSES

    closeups = 0
    for i in range(60):
        s = make_scene(i, "train", size=96)
        things = set(np.unique(s.mask).tolist()) - set(range(len(STUFF_CLASSES)))
        for cid in things:
            name = THING_CLASSES[cid - len(STUFF_CLASSES)]
            # the brightest pixels of a thing (markings darken it) are nearest to its class colours
            pixels = s.image[s.mask == cid].astype(np.float32) / 255
            top = pixels[pixels.sum(1) >= np.quantile(pixels.sum(1), 0.9)]
            palette = np.array(list(COLOURS.values()), np.float32)
            nearest = np.array(list(COLOURS))[np.abs(top[:, None] - palette[None]).sum(-1).argmin(1)]
            assert np.isin(nearest, COLOUR_FAMILIES[name]).mean() > 0.9, (i, name)
        closeups += len(things) == 1 and (s.mask >= len(STUFF_CLASSES)).mean() > 0.25
    assert 8 <= closeups <= 35  # about 30% of train scenes are close-ups of one thing
