import numpy as np
import pytest
import torch

from vocaseg import Segmenter, Vocabulary, VocabularyError
from vocaseg.dense import key_smoothing
from vocaseg.inference import prompt_denoising, upsample_and_label, window_starts


@pytest.fixture
def seg(vit_model, tokenizer):
    return Segmenter(vit_model, tokenizer, templates="photo", logit_scale=40.0)


def _img(h, w, seed=0):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


CLASSES = ["cat", "dog", "grass, lawn"]


def test_predict_contract(seg):
    res = seg.predict(_img(50, 70), CLASSES)
    assert res.labels.shape == (50, 70) and res.labels.dtype == np.int64
    assert res.probs.shape == (3, 50, 70) and res.probs.dtype == np.float32
    np.testing.assert_allclose(res.probs.sum(0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(res.labels, res.probs.argmax(0))
    assert res.classes == ["cat", "dog", "grass"]


def test_encode_text_contract(seg):
    emb = seg.encode_text(["cat", "dog"])
    assert emb.shape == (2, 32) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))


def test_encode_dense_contract(seg):
    out = seg.encode_dense(torch.randn(2, 3, 64, 96))
    assert out.shape == (2, 32, 4, 6)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2, 4, 6))


def test_one_window_equals_whole_image(seg):
    img = _img(64, 64)
    slide = seg.with_options(mode="slide", short_side=None, window=64, stride=32).predict(img, CLASSES)
    whole = seg.with_options(mode="whole", short_side=None).predict(img, CLASSES)
    np.testing.assert_allclose(slide.probs, whole.probs, atol=1e-6)


def test_whole_logits_are_classifier_on_dense_features(seg):
    """Whole-image logits == bilinear upsampling of (dense features . text), max over synonyms."""
    img = _img(64, 64)
    res = seg.with_options(mode="whole", short_side=None).predict(img, CLASSES)
    pixels = (torch.from_numpy(img).permute(2, 0, 1).float() / 255 - seg.mean) / seg.std
    feats = seg.encode_dense(pixels[None])[0]
    text = seg.encode_text(["cat", "dog", "grass", "lawn"])
    cos = torch.einsum("dhw,nd->nhw", feats, text)
    cls = torch.stack([cos[0], cos[1], torch.maximum(cos[2], cos[3])])
    up = torch.nn.functional.interpolate(cls[None], size=(64, 64), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(res.logits, up, atol=1e-5, rtol=1e-5)


def test_batch_equals_one_by_one(seg):
    imgs = [_img(50, 70, 1), _img(80, 40, 2), _img(64, 64, 3)]
    s = seg.with_options(short_side=64, batch_size=5)
    together = s.predict_batch(imgs, CLASSES)
    for img, res in zip(imgs, together):
        np.testing.assert_allclose(res.probs, s.predict(img, CLASSES).probs, atol=1e-5)


def test_image_smaller_than_window_and_odd_sizes(seg):
    for h, w in [(10, 13), (1, 1), (200, 31)]:
        res = seg.with_options(short_side=None, window=64, stride=32).predict(_img(h, w), CLASSES)
        assert res.labels.shape == (h, w)
    res = seg.with_options(mode="whole", short_side=None).predict(_img(37, 50), CLASSES)
    assert res.labels.shape == (37, 50)


def test_multiscale_runs_and_differs(seg):
    img = _img(64, 80)
    one = seg.with_options(short_side=64).predict(img, CLASSES)
    multi = seg.with_options(short_side=64, scales=(0.75, 1.0, 1.5)).predict(img, CLASSES)
    assert multi.probs.shape == one.probs.shape
    assert not np.allclose(multi.probs, one.probs)


def test_window_starts_cover_and_end_flush():
    assert window_starts(224, 224, 112) == [0]
    assert window_starts(100, 224, 112) == [0]
    assert window_starts(336, 224, 112) == [0, 112]
    assert window_starts(500, 224, 112) == [0, 112, 224, 276]


def test_key_smoothing_paper_formula():
    """Eq. 5 of MaskCLIP: p_i <- sum_j cos(k_i, k_j) p_j where max_c p_i < t."""
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 2, 2) * 0.02
    keys = torch.randn(1, 4, 5)
    out = key_smoothing(logits, keys, threshold=0.5, mode="paper")
    p = torch.softmax(100 * logits.flatten(2), dim=1)[0]  # (C, N)
    kn = keys[0] / keys[0].norm(dim=-1, keepdim=True)
    for i in range(4):
        if p[:, i].max() < 0.5:
            ref = sum((kn[i] @ kn[j]) * p[:, j] for j in range(4)).clamp_min(1e-8)
            got = torch.softmax(100 * out.flatten(2)[0, :, i], 0)
            torch.testing.assert_close(got, ref / ref.sum(), atol=1e-5, rtol=1e-4)
        else:
            torch.testing.assert_close(out.flatten(2)[0, :, i], logits.flatten(2)[0, :, i])


def test_key_smoothing_official_computation():
    """MaskCLIP's released refine_output, re-computed step by step: probabilities softmax(100 x),
    keys (N, hw, C) L2-normalised along dim 1 (each channel over the positions), weight = k k^T,
    smoothed where the max probability is below ks_thresh = 1.0."""
    torch.manual_seed(1)
    n, c, h, w, kd = 2, 4, 3, 5, 8
    logits = torch.randn(n, c, h, w) * 0.03
    keys = torch.randn(n, h * w, kd) + 0.5  # a shared component, as real keys have
    out = key_smoothing(logits, keys, threshold=1.0, mode="official")
    prob = torch.softmax(logits * 100, dim=1).view(n, c, -1).transpose(-2, -1)  # (N, hw, C)
    k = keys / keys.norm(p=2, dim=1, keepdim=True)
    weighted = (k @ k.transpose(-2, -1)) @ prob
    selected = (prob.max(dim=-1, keepdim=True)[0] < 1.0).expand(-1, -1, c)
    ref = prob.clone()
    ref[selected] = weighted[selected]
    assert selected.any()
    # ours returns log(p / sum p) / 100 per location: its softmax(100 x) is the renormalised official output
    got = torch.softmax(100 * out, dim=1).view(n, c, -1).transpose(-2, -1)
    ref = ref.clamp_min(1e-8)
    torch.testing.assert_close(got, ref / ref.sum(-1, keepdim=True), atol=1e-5, rtol=1e-4)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    with pytest.raises(ValueError):
        key_smoothing(logits, keys, 1.0, mode="cosine")


def test_key_smoothing_default_is_official_everywhere(seg):
    s = seg.with_options(key_smoothing=True)
    assert s.config.key_smoothing == 1.0 and s.config.key_smoothing_mode == "official"
    assert s.model.key_smoothing == 1.0 and s.model.key_smoothing_mode == "official"
    paper = seg.with_options(key_smoothing=True, key_smoothing_mode="paper")
    a, b = s.predict(_img(64, 64), CLASSES), paper.predict(_img(64, 64), CLASSES)
    assert not torch.allclose(a.logits, b.logits)


def test_prompt_denoising_drops_unlikely_classes():
    logits = torch.zeros(3, 2, 2)
    logits[0] = 0.3  # class 0 dominates everywhere
    logits[1, 0, 0] = 0.35  # class 1 wins one location confidently
    logits[2] = 0.29  # class 2 never confident
    out = prompt_denoising(logits, 0.5)
    assert torch.isinf(out[2]).all() and not torch.isinf(out[:2]).any()


def test_strip_upsampling_equals_interpolate():
    logits = torch.randn(4, 7, 9)
    ref = torch.nn.functional.interpolate(logits[None], size=(50, 61), mode="bilinear", align_corners=False)[0]
    labels, probs = upsample_and_label(logits, (50, 61), 40.0, None, None, keep_probs=True, max_elements=500)
    torch.testing.assert_close(probs, torch.softmax(40 * ref, 0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("threshold,background", [(None, None), (0.6, 0)])
def test_compact_labels_are_the_labels_in_uint8(threshold, background):
    from vocaseg.inference import SegmentationResult, compact_label_dtype

    def result():
        return SegmentationResult(classes=["a", "b", "c"], size=(50, 61), logits=logits, logit_scale=40.0,
                                  prob_threshold=threshold, background_index=background)

    logits = torch.randn(3, 7, 9) * 0.1
    first_compact, reference = result(), result()
    compact = first_compact.labels_compact
    assert compact.dtype == np.uint8 and first_compact._cache["labels"].dtype == torch.uint8  # no int64 map made
    np.testing.assert_array_equal(compact, reference.labels)
    assert first_compact.labels.dtype == np.int64 and np.array_equal(first_compact.labels, reference.labels)
    assert reference.labels_compact.dtype == np.uint8 and first_compact.fractions() == reference.fractions()
    assert len(np.unique(compact)) > 1
    assert [compact_label_dtype(n) for n in (2, 255, 256, 40000)] == [torch.uint8, torch.uint8, torch.int16, torch.int32]


def test_background_words_and_threshold(seg):
    res = seg.predict(_img(40, 40), ["cat", "dog"], background=["sky", "wall"])
    assert res.classes == ["background", "cat", "dog"]
    thr = seg.with_options(prob_threshold=0.99).predict(_img(40, 40), ["cat", "dog"])
    assert thr.classes[0] == "background" and (thr.labels == 0).mean() > 0.5


def test_refinements_run(seg):
    for opts in [dict(key_smoothing=True), dict(prompt_denoising=0.5), dict(pamr=True),
                 dict(area_threshold=0.1)]:
        res = seg.with_options(**opts).predict(_img(48, 48), CLASSES)
        assert res.labels.shape == (48, 48)


@pytest.mark.parametrize("classes", [[], "", " , ,", ["cat", "Cat"], ["dog", "puppy, dog"]])
def test_bad_class_lists(seg, classes):
    with pytest.raises(VocabularyError):
        seg.predict(_img(8, 8), classes)


def test_vocabulary_parsing():
    assert Vocabulary.parse("cat, dog, grass").names == ["cat", "dog", "grass"]
    v = Vocabulary.parse("tv monitor, television; cat")
    assert v.classes == (("tv monitor", "television"), ("cat",))


def test_text_cache_on_disk(vit_model, tokenizer, tmp_path):
    seg = Segmenter(vit_model, tokenizer, templates="photo", model_id="tiny|x", cache_dir=tmp_path)
    a = seg.encode_text(["cat"])
    assert len(list(tmp_path.glob("*.pt"))) == 1
    seg2 = Segmenter(vit_model, tokenizer, templates="photo", model_id="tiny|x", cache_dir=tmp_path)
    seg2.backbone.encode_text = None  # a cache hit must not touch the text tower
    torch.testing.assert_close(seg2.encode_text(["cat"]), a)


def test_resnet_segmenter(resnet_model, tokenizer):
    seg = Segmenter(resnet_model, tokenizer, templates="photo", short_side=None, window=64, stride=32)
    res = seg.predict(_img(70, 90), CLASSES)
    assert res.labels.shape == (70, 90)
    with pytest.raises(NotImplementedError):
        Segmenter(resnet_model, tokenizer, method="sclip")


def test_huge_image_is_capped(seg):
    from vocaseg.inference import resize_short_side

    assert resize_short_side(6000, 8000, None, 2048) == (1536, 2048)
    assert resize_short_side(300, 400, None, 2048) == (300, 400)
    assert resize_short_side(300, 400, 336, 2048) == (336, 448)
    res = seg.with_options(short_side=None, max_long_side=128).predict(_img(1200, 1600), CLASSES)
    assert res.labels.shape == (1200, 1600) and res.logits.shape[-2:] == (96, 128)
