"""ReCLIP: each piece against an independent computation on random weights, a short training of both
stages, resume, run folders, presets on tiny generated trees."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import assert_sigkill_resume_is_exact, tiny_clip
from vocaseg.cli import main
from vocaseg.dense import Classifier
from vocaseg.methods.reclip import (PRESETS, PositionBias, ReclipRectified, ReferencePrompt, _ClipSide,
                                    frobenius_normalize, hard_gumbel_softmax, image_level_classes,
                                    masked_feature_contrast, prune_classes)


@pytest.fixture(scope="module")
def side():
    import open_clip

    return _ClipSide(tiny_clip("vit"), open_clip.get_tokenizer("", context_length=16), (0.5,) * 3, (0.25,) * 3)


def test_reference_prompt_is_the_text_tower_read_at_end_of_text(side):
    """With context vectors set to real tokens' embeddings, the Reference feature is exactly CLIP's own
    encode_text of that token sequence (causal mask, positions, ln_final, projection, EOT read)."""
    names = ["cat", "traffic light"]
    ref = ReferencePrompt(5, 32)
    filler = torch.tensor([320, 1125, 539, 320, 1674])  # "a photo of a ..."-like ids
    with torch.no_grad():
        ref.context.copy_(side.clip.token_embedding.weight[filler])
    ids, eot = ref.tokens(side.tokenizer, names, 16)
    expected_ids = ids.clone()
    expected_ids[:, 1:6] = filler
    plain = side.tokenizer(names)
    for i in range(2):  # [SOT] ctx [name] [EOT]: the name's tokens follow the context, EOT right after
        n = int(plain[i].argmax()) - 1
        assert eot[i] == 1 + 5 + n and expected_ids[i, eot[i]] == plain[i].max()
        assert torch.equal(expected_ids[i, 6:6 + n], plain[i, 1:1 + n])
    with torch.no_grad():
        got = ref(side.clip, ids, eot)
        want = side.clip.encode_text(expected_ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_reference_gradient_reaches_only_the_context(side):
    ref = ReferencePrompt(4, 32, side.clip.token_embedding.weight[0])
    ids, eot = ref.tokens(side.tokenizer, ["cat", "dog"], 16)
    assert torch.equal(ref.context[0], side.clip.token_embedding.weight[0].detach())  # official init: token 0
    for p in side.clip.parameters():
        p.requires_grad_(False)
    frobenius_normalize(ref(side.clip, ids, eot)).sum().backward()
    assert ref.context.grad is not None and ref.context.grad.abs().sum() > 0


def test_long_names_keep_their_end_of_text_token(side):
    ref = ReferencePrompt(10, 32)
    with pytest.warns(UserWarning, match="tokens"):
        ids, eot = ref.tokens(side.tokenizer, ["a very long name of a class indeed"], 16)
    assert eot[0] == 15 and ids[0, 15] == side.tokenizer(["x"])[0].max()


def test_frobenius_normalisation_is_over_the_whole_matrix():
    w = torch.randn(5, 8)
    out = frobenius_normalize(w)
    torch.testing.assert_close(out.norm(), torch.tensor(1.0))
    torch.testing.assert_close(out, w / torch.sqrt((w ** 2).sum()))
    assert not torch.allclose(out.norm(dim=1), torch.ones(5))  # rows are not unit vectors


def test_hard_gumbel_forward_is_the_one_hot_argmax_and_backward_the_softmax():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 3, 3, requires_grad=True)
    noise = -torch.empty(2, 4, 3, 3).exponential_().log()
    out = hard_gumbel_softmax(logits, 1000.0, noise=noise)
    want = F.one_hot((1000 * logits + noise).argmax(1), 4).permute(0, 3, 1, 2).float()
    assert torch.equal(out.detach(), want)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    ref = logits.detach().clone().requires_grad_(True)
    (torch.softmax(1000 * ref + noise, 1) * weights).sum().backward()
    torch.testing.assert_close(logits.grad, ref.grad)


def test_masked_feature_contrast_equals_its_formula():
    torch.manual_seed(0)
    b, c, d, h, w = 2, 3, 6, 4, 5
    masks = F.one_hot(torch.randint(0, c, (b, h, w)), c).permute(0, 3, 1, 2).float()
    features = F.normalize(torch.randn(b, d, h, w), dim=1)
    text = Classifier(F.normalize(torch.randn(c, d), dim=1), torch.arange(c), c)
    present = torch.tensor([[True, False, True], [False, False, False]])
    got = masked_feature_contrast(masks, features, text, present)
    terms = []
    for cls in (0, 2):  # image 0's classes; image 1 has none but counts in the batch
        pooled = (features[0] * masks[0, cls]).sum((1, 2)) / (h * w)
        logits = 100 * pooled @ text.weights.T
        terms.append(F.cross_entropy(logits[None], torch.tensor([cls])))
    want = torch.stack(terms).mean() / 2
    torch.testing.assert_close(got, want)


def test_pruning_drops_unlikely_classes_and_never_all():
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 0] = 0.5  # dominant everywhere but one position
    logits[0, 1, 0, 0] = 0.55  # wins one position with p = softmax(10 x) ~ 0.62: kept at 0.5, not at 0.7
    out = prune_classes(logits, 10.0, 0.5)
    assert torch.equal(out[0, :2], logits[0, :2]) and (out[0, 2] == -100).all()
    out = prune_classes(logits, 10.0, 0.7)  # a class that wins a position is pruned when unsure there
    assert (out[0, 1:] == -100).all() and out[0].argmax(0).eq(0).all()
    # no class reaches the threshold: the image keeps its most probable class (not 'everything class 0')
    flat = torch.zeros(1, 4, 2, 2)
    flat[0, 2, 1, 1] = 0.01
    out = prune_classes(flat, 10.0, 0.9)
    assert (out[0, 2] == flat[0, 2]).all() and (out[0, [0, 1, 3]] == -100).all()


def test_image_level_classes_threshold_then_top_k():
    scores = torch.tensor([[30.0, 10.0, 25.0, 5.0], [12.0, 15.0, 11.0, 14.0]])
    present = image_level_classes(scores, 20.0, 2)
    assert present.tolist() == [[True, False, True, False], [False, True, False, True]]


def test_rectified_logits_and_position_bias(side):
    torch.manual_seed(0)
    names = ["cat", "dog", "grass"]
    model = ReclipRectified(side, names, n_context=6)
    for mode in ("per-class", "shared"):
        bias_net = PositionBias(64, 3 if mode == "per-class" else 1)
        pos = side.clip.visual.positional_embedding[1:].T.reshape(1, 64, 4, 4)
        out = bias_net(pos)
        assert out.shape == (1, 3 if mode == "per-class" else 1, 4, 4) and (out >= 0).all()
    from vocaseg.vocabulary import Vocabulary

    vocab = Vocabulary.parse(names)
    query = F.normalize(torch.randn(3, 32), dim=1)
    clf = model.classifier(vocab, lambda n: query[: len(n)])
    features = F.normalize(torch.randn(2, 32, 4, 4), dim=1)
    got = model.rectify(features, clf, clf.extra["reference"])
    reference = frobenius_normalize(model.reference(side.clip, *model.reference_tokens(names)))
    bias = model.position_bias(side.clip.visual.positional_embedding[1:].T.reshape(1, 64, 4, 4))
    want = (torch.einsum("bdhw,cd->bchw", features, query)
            - (torch.einsum("bdhw,cd->bchw", features, reference) + bias))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # another vocabulary: classes not trained with get no space bias
    other = Vocabulary.parse(["dog", "tree"])
    clf2 = model.classifier(other, lambda n: query[: len(n)])
    assert clf2.extra["channel"].tolist() == [1, -1]


# ---------------------------------------------------------------------------- training, run folders
def _train(args):
    return main(["train", "reclip", "--pretrained", "none", "--templates", "plain", "--train-images", "24",
                 "--eval-images", "4", "--crop", "64", *args])


@pytest.fixture(scope="module")
def rect_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reclip") / "rect"
    assert _train(["--stage", "rect", "--out", str(out), "--steps", "40", "--batch-size", "4", "--lr", "0.05",
                   "--checkpoint-every", "20"]) == 0
    return out


def test_rect_run_folder(rect_run):
    info = json.loads((rect_run / "method.json").read_text())
    assert info["method"] == "reclip-rect" and info["setting"] == "unsupervised"
    assert info["pseudo_classes"]["images"] == 24 and "quantile" in info["pseudo_classes"]["rule"]
    from safetensors.torch import load_file

    keys = load_file(str(rect_run / "weights.safetensors")).keys()
    assert "reference.context" in keys and any(k.startswith("position_bias.") for k in keys)
    assert not any(k.startswith("side") or "visual" in k for k in keys)  # the frozen CLIP is not stored
    losses = [r["loss"] for r in map(json.loads, (rect_run / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert all(np.isfinite(losses))


def test_rect_only_the_context_and_bias_net_change(rect_run):
    """The frozen CLIP is the one the run names (random weights from the run's seed): reloading gives
    the same Query; the trained Reference context moved away from its token-0 initialisation."""
    from vocaseg import Segmenter

    seg = Segmenter.from_pretrained(str(rect_run))
    model = seg.trained
    init = model.side.clip.token_embedding.weight[0]
    assert not torch.allclose(model.reference.context, init.expand_as(model.reference.context))
    res = seg.predict(np.zeros((40, 50, 3), np.uint8), ["cat", "road", "sky"])  # any class names
    assert res.labels.shape == (40, 50)


def test_distill_loss_falls_and_run_loads(rect_run, tmp_path):
    out = tmp_path / "distill"
    assert _train(["--stage", "distill", "--rect-run", str(rect_run), "--out", str(out), "--steps", "30",
                   "--batch-size", "4", "--lr", "0.05", "--student-weights", "none"]) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    rows = [r for r in log if "loss_mask" in r]
    assert {"loss_feature", "loss_text"} <= set(rows[0])
    first, last = rows[0]["loss_feature"], rows[-1]["loss_feature"]
    assert last < first  # the student's features move towards the teacher's
    from vocaseg import Segmenter

    seg = Segmenter.from_pretrained(str(out))
    assert seg.method == "reclip"
    assert seg.predict(np.zeros((40, 50, 3), np.uint8), ["cat", "road"]).labels.shape == (40, 50)
    info = json.loads((out / "method.json").read_text())
    assert info["rect_run"]["path"] == str(rect_run)


def test_distill_gradients_flow_through_all_three_losses(rect_run, tmp_path):
    from vocaseg.methods.reclip import DistillationRecipe, make_config

    cfg = make_config(None, "distill", out=str(tmp_path / "d"), rect_run=str(rect_run), pretrained="none",
                      templates="plain", train_images=8, crop=64, student_weights="none", progress=False)
    recipe = DistillationRecipe(cfg)
    module = recipe.build()
    stream = recipe.dataset()
    batch = recipe.collate([stream[i] for i in range(2)])
    batch = (batch[0], torch.ones_like(batch[1]))  # every class present: the text loss has terms
    for loss_name in ("mask", "feature", "text"):
        recipe.cfg.losses = loss_name
        module.zero_grad()
        loss, _ = recipe.training_step(module, batch, 1)
        loss.backward()
        grads = [p.grad.abs().sum() for p in module.student.parameters() if p.grad is not None]
        assert grads and sum(grads) > 0, loss_name
        assert module.reference.context.grad is None  # the inherited Reference stays frozen


@pytest.mark.parametrize("stage", ["rect", "distill"])
def test_sigkill_then_resume_gives_the_uninterrupted_weights(stage, rect_run, tmp_path):
    args = ["train", "reclip", "--pretrained", "none", "--templates", "plain", "--train-images", "12",
            "--eval-images", "0", "--crop", "64", "--stage", stage, "--steps", "6", "--batch-size", "2",
            "--checkpoint-every", "1", "--student-weights", "none"]
    if stage == "distill":
        args += ["--rect-run", str(rect_run)]
    assert_sigkill_resume_is_exact(args, tmp_path)


# ---------------------------------------------------------------------------- presets for real data
# voc20 in the default suite; the others (59 and 150 class names through ViT-B's text tower) are slow
@pytest.mark.parametrize("preset", [pytest.param(p, marks=[] if p == "voc20" else [pytest.mark.slow])
                                    for p in PRESETS if p != "synth"])
def test_real_preset_runs_both_stages_on_a_tiny_tree(preset, tmp_path):
    """ViT-B/16 (random weights) and the DeepLabV2-R50 student, one step each on 64-px crops; the
    paper's schedule is checked as configured."""
    from test_presets import make_tree

    rect_values, distill_values = PRESETS[preset]["rect"], PRESETS[preset]["distill"]
    root = make_tree(tmp_path / "data", rect_values["dataset"])
    common = ["--preset", preset, "--data-root", str(root), "--pretrained", "none", "--crop", "64", "--steps", "1",
              "--templates", "plain", "--eval-images", "0"]
    rect = tmp_path / "rect"
    assert main(["train", "reclip", "--stage", "rect", "--out", str(rect), *common]) == 0
    info = json.loads((rect / "method.json").read_text())
    assert info["clip"]["model"] == "ViT-B-16" and info["config"]["batch_size"] == 1  # official batch
    assert info["pseudo_classes"]["rule"] == "official threshold"
    assert info["inference"]["prompt_denoising"] == rect_values["test_pruning"]  # the official test pruning
    n_ctx = info["model"]["n_context"]
    assert n_ctx + 2 + 1 <= 77 and n_ctx >= 60  # every free slot, names never cut
    out = tmp_path / "distill"
    assert main(["train", "reclip", "--stage", "distill", "--rect-run", str(rect), "--out", str(out),
                 "--student-weights", "none", "--batch-size", "2", *common]) == 0
    info = json.loads((out / "method.json").read_text())
    assert info["model"]["student"] == "deeplabv2-r50" and distill_values["batch_size"] == 16
    assert "prompt_denoising" not in info["inference"]  # the student is evaluated without pruning
    from vocaseg import Segmenter

    seg = Segmenter.from_pretrained(str(out), short_side=64)
    assert seg.predict(np.zeros((40, 50, 3), np.uint8), ["cat", "road"]).labels.shape == (40, 50)
