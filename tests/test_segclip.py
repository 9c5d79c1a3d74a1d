"""SegCLIP: the group module, the losses and the scoring rule against independent computations on
random weights, the released checkpoint's names, the data sources, a short toy training, run folders
and an exact resume."""

import dataclasses
import json
import math
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import assert_sigkill_resume_is_exact, tiny_clip, torchrun_cli
from vocaseg.cli import main
from vocaseg.dense import Classifier
from vocaseg.methods.segclip import (Felzenszwalb, GroupedViT, ReconstructionBranch, SegClipArch, SegClipModel,
                                     SemanticGroup, caption_tokens, make_config, masked_patch_mse,
                                     mix_batch_like_official, official_state_dict_to_vocaseg, patch_labels,
                                     patchify, pixel_scores, region_class_scores, segclip_from_official,
                                     sincos_position_embedding, superpixel_kl, train_segclip, visible_count)


def tiny_model_dir(root):
    """A model folder with a small random ViT CLIP (32 px, patch 8, 3 blocks): seconds per run on a CPU."""
    root.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": {"embed_dim": 32,
                            "vision_cfg": {"image_size": 32, "layers": 3, "width": 32, "head_width": 16, "patch_size": 8},
                            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2,
                                         "layers": 1}}}
    (root / "open_clip_config.json").write_text(json.dumps(config))
    return root


TINY = ["--pretrained", "none", "--group-after", "2", "--decoder-width", "16", "--decoder-heads", "2",
        "--train-images", "6", "--eval-images", "0"]


# ---------------------------------------------------------------------------- the group module
def test_group_module_shapes_and_hard_one_hot_assignment():
    torch.manual_seed(0)
    group = SemanticGroup(32, heads=4, centres=5, cross_attention_blocks=2)
    patches = torch.randn(2, 12, 32)
    for training in (True, False):
        group.train(training)
        out = group(patches)
        assert out.regions.shape == (2, 5, 32) and out.assignment.shape == (2, 5, 12) and out.logits.shape == (2, 5, 12)
        a = out.assignment.detach()
        assert set(a.unique().tolist()) <= {0.0, 1.0} and torch.equal(a.sum(1), torch.ones(2, 12))  # one centre each
    # eval: no noise, the argmax of the logits; region k = MLP(LN(centre_k + mean of its patches' values))
    assert torch.equal(out.assignment.argmax(1), out.logits.argmax(1))


def test_assignment_forward_is_one_hot_and_gradient_the_soft_gumbel_path():
    torch.manual_seed(0)
    group = SemanticGroup(32, heads=4, centres=4).train()
    patches = torch.randn(2, 10, 32)
    torch.manual_seed(7)
    out = group(patches)
    torch.manual_seed(7)  # the module's only random draw is its Gumbel noise: draw it again
    g = -torch.empty(2, 4, 10).exponential_().log()
    logits = out.logits.detach()
    assert torch.equal(out.assignment.detach(), F.one_hot((logits + g).argmax(1), 4).transpose(1, 2).float())
    # backward: that of softmax((A + g) / 0.9), tau = 0.9 as the official module
    weights = torch.randn(2, 4, 10)
    got = torch.autograd.grad((out.assignment * weights).sum(), out.logits)[0]
    ref = logits.clone().requires_grad_(True)
    want = torch.autograd.grad((torch.softmax((ref + g) / 0.9, dim=1) * weights).sum(), ref)[0]
    torch.testing.assert_close(got, want)
    assert got.abs().sum() > 0


def test_gradient_reaches_the_key_projection_only_through_the_soft_path():
    """The keys enter only the assignment logits: with the straight-through Gumbel they get gradient,
    with the hard argmax of evaluation none."""
    torch.manual_seed(0)
    group = SemanticGroup(32, heads=4, centres=4)
    patches = torch.randn(2, 10, 32)
    group.train()
    group(patches).regions.square().sum().backward()
    assert group.key_proj.weight.grad.abs().sum() > 0 and group.centres.grad.abs().sum() > 0
    group.zero_grad(set_to_none=True)
    group.eval()
    group(patches).regions.square().sum().backward()
    assert group.key_proj.weight.grad is None or group.key_proj.weight.grad.abs().sum() == 0


def test_group_module_has_the_official_size():
    """19,011,840 parameters at D = 768, 12 heads, 8 centres, 2 cross-attention blocks (spec Sec. 2)."""
    group = SemanticGroup(768, heads=12, centres=8, cross_attention_blocks=2)
    assert sum(p.numel() for p in group.parameters()) == 19_011_840


def test_cross_attention_is_per_image_and_the_official_emulation_mixes():
    torch.manual_seed(0)
    patches = torch.randn(4, 12, 32)
    group = SemanticGroup(32, heads=4, centres=5).eval()
    with torch.no_grad():
        alone, batched = group(patches[:1]), group(patches)
    torch.testing.assert_close(batched.regions[:1], alone.regions, rtol=1e-5, atol=1e-5)
    assert torch.equal(batched.assignment[:1], alone.assignment)
    group.official_batch_mixing = True
    with torch.no_grad():
        mixed_alone, mixed = group(patches[:1]), group(patches)
    torch.testing.assert_close(mixed_alone.regions, alone.regions)  # B = 1: the official module is right
    assert not torch.allclose(mixed.regions[:1], alone.regions, atol=1e-3)  # B = 4: its neighbours leak in
    # the regrouping itself: image b sees the flat tokens b, B+b, 2B+b, ... of the batch
    tokens = torch.arange(4 * 3).float().view(4, 3, 1)  # value = flat index b * S + s
    assert mix_batch_like_official(tokens)[1, :, 0].tolist() == [1.0, 5.0, 9.0]


def test_whole_model_output_does_not_depend_on_batch_neighbours(tmp_path):
    from vocaseg.loading import load_clip

    torch.manual_seed(0)
    loaded = load_clip(str(tiny_model_dir(tmp_path / "m")), pretrained=None)
    model = SegClipModel(loaded.model, SegClipArch(group_after=2), loaded.mean, loaded.std).eval()
    clf = Classifier(F.normalize(torch.randn(3, 32), dim=1), torch.arange(3), 3, {"background_threshold": None})
    pixels = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.logits(pixels[:1], clf), model.logits(pixels, clf)[:1])


# ---------------------------------------------------------------------------- towers
def test_tower_cut_around_the_module_on_an_open_clip_vit():
    """Blocks before the module see patches only (no class token); the image embedding is the max over
    the region tokens after the later blocks, through ln_post and proj."""
    clip = tiny_clip("vit", layers=3)
    tower = GroupedViT(clip.visual, group_after=2, centres=4).eval()
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = tower(pixels)
        assert out.embeddings.shape == (2, 5, 32) and out.grid == (4, 4)
        x = clip.visual.conv1(pixels).flatten(2).transpose(1, 2) + clip.visual.positional_embedding[1:]
        x = clip.visual.ln_pre(x)
        for block in clip.visual.transformer.resblocks[:2]:
            x = block(x)
        regions = tower.group(x).regions
        regions = clip.visual.transformer.resblocks[2](regions)
        tokens = torch.cat([regions.max(1, keepdim=True).values, regions], 1)
        torch.testing.assert_close(out.embeddings, clip.visual.ln_post(tokens) @ clip.visual.proj)
    assert tower.stage1[0] is clip.visual.transformer.resblocks[0]  # the CLIP's own blocks, trained in place
    names = set(dict(tower.named_parameters()))
    assert not any(n.startswith(("conv1", "positional_embedding", "ln_pre")) for n in names)  # frozen: not here
    with pytest.raises(ValueError, match="group_after"):
        GroupedViT(clip.visual, group_after=4)
    # the mean-pool option (GroupViT's) changes only the image embedding: the mean of the same region tokens
    mean_tower = GroupedViT(clip.visual, group_after=2, centres=4, image_pool="mean").eval()
    mean_tower.group.load_state_dict(tower.group.state_dict())
    with torch.no_grad():
        mean_out = mean_tower(pixels)
        torch.testing.assert_close(mean_out.embeddings[:, 1:], out.embeddings[:, 1:])
        torch.testing.assert_close(mean_out.embeddings[:, 0], clip.visual.ln_post(regions.mean(1)) @ clip.visual.proj)
    with pytest.raises(ValueError, match="image_pool"):
        GroupedViT(clip.visual, group_after=2, image_pool="sum")


def test_caption_is_cut_with_its_end_of_text_token_kept(tokenizer):
    tokens = caption_tokens(tokenizer, "a red circle on grass with a blue square and sand and water", 8)
    plain = tokenizer(["a red circle on grass with a blue square and sand and water"])[0]
    assert tokens[7] == plain.max() and tokens[8:].eq(0).all() and torch.equal(tokens[:7], plain[:7])
    assert torch.equal(caption_tokens(tokenizer, "a circle", 8), tokenizer(["a circle"])[0])


# ---------------------------------------------------------------------------- the losses
def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def _softmax(v):
    e = [math.exp(x) for x in v]
    return [x / sum(e) for x in e]


def test_superpixel_kl_on_a_hand_made_case():
    """Patches 0 and 1 share a superpixel but sit on different centres; patch 2 is alone."""
    m = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]])
    labels = torch.tensor([[7, 7, 3]])
    p0, p1 = _softmax([1, 0]), _softmax([0, 1])
    # code: P^ = softmax(mean of the one-hot rows) = (0.5, 0.5) for patches 0 and 1; patch 2 agrees with itself
    half = [0.5, 0.5]
    code = (_kl(half, p0) + _kl(p0, half) + _kl(half, p1) + _kl(p1, half)) / (2 * 1 * 3 * 2)
    torch.testing.assert_close(superpixel_kl(m, labels, "code"), torch.tensor(code, dtype=torch.float32))
    # paper: P^ = softmax(mean of P); a lone patch still differs from softmax(P) (the double softmax)
    mean01 = [(a + b) / 2 for a, b in zip(p0, p1)]
    q01, q2 = _softmax(mean01), _softmax(p0)
    paper = (_kl(p0, q01) + _kl(q01, p0) + _kl(p1, q01) + _kl(q01, p1) + _kl(p0, q2) + _kl(q2, p0)) / (2 * 3)
    torch.testing.assert_close(superpixel_kl(m, labels, "paper"), torch.tensor(paper, dtype=torch.float32))
    # one superpixel per centre: nothing to pull together
    assert superpixel_kl(m, torch.tensor([[0, 1, 0]]), "code") == 0
    # the same ids in another image are another superpixel
    two = superpixel_kl(torch.cat([m, m]), torch.tensor([[7, 7, 3], [7, 7, 3]]), "code")
    torch.testing.assert_close(two, torch.tensor(code, dtype=torch.float32))


def test_superpixel_kl_sends_gradient_through_the_straight_through_rows():
    torch.manual_seed(0)
    group = SemanticGroup(16, heads=2, centres=3).train()
    out = group(torch.randn(1, 6, 16))
    superpixel_kl(out.assignment.transpose(1, 2), torch.zeros(1, 6, dtype=torch.long)).backward()
    assert group.key_proj.weight.grad.abs().sum() > 0


def test_patch_labels_floor_of_mean_or_majority():
    sp = torch.tensor([[0, 0, 2, 2],
                       [0, 1, 3, 3],
                       [1, 3, 5, 5],
                       [3, 3, 5, 5]])
    # patches: [0,0,0,1] -> 0 | [2,2,3,3] -> 2 | [1,3,3,3] -> floor 2.5 = 2 (an unrelated id), majority 3 | 5
    assert patch_labels(sp, 2, "floor_mean").tolist() == [0, 2, 2, 5]
    assert patch_labels(sp, 2, "majority").tolist() == [0, 2, 3, 5]


def test_felzenszwalb_scaled_and_cached(tmp_path, monkeypatch):
    assert Felzenszwalb.official_at(224) == Felzenszwalb(224.0, 0.9, 224)
    assert Felzenszwalb.official_at(96) == Felzenszwalb(96.0, 0.9, 41)  # scale with the side, min_size the area
    from vocaseg.data.synth import make_scene

    image = make_scene(0, "train", 0, 96).image
    fz = Felzenszwalb(100.0, 0.9, 64, cache_dir=str(tmp_path))
    first = fz(image, key="scene-0")
    assert first.shape == (96, 96) and 2 <= len(np.unique(first)) <= 60
    monkeypatch.setattr(Felzenszwalb, "compute", lambda self, img: pytest.fail("recomputed a cached map"))
    assert np.array_equal(fz(image, key="scene-0"), first)


def test_reconstruction_target_mask_and_positions():
    pixels = torch.arange(2 * 3 * 4 * 4).float().view(2, 3, 4, 4)
    patches = patchify(pixels, 2)
    # patch (row 0, col 1) of image 1: its 2x2 pixels in (row, col, channel) order
    want = torch.stack([pixels[1, :, y, x] for y in (0, 1) for x in (2, 3)]).flatten()
    assert patches.shape == (2, 4, 12) and torch.equal(patches[1, 1], want)
    prediction, target = torch.zeros(1, 4, 3), torch.ones(1, 4, 3)
    target[0, 1] = 3.0
    keep = torch.tensor([[0, 2]])  # patches 1 and 3 were dropped: only they count
    torch.testing.assert_close(masked_patch_mse(prediction, target, keep), torch.tensor((9.0 + 1.0) / 2))
    assert visible_count(196, 0.75) == 48 and visible_count(144, 0.75) == 35  # class slot kept among int(.25 (N+1))
    pos = sincos_position_embedding(8, (2, 3))
    assert pos.shape == (7, 8) and pos[0].eq(0).all()
    # patch (row 1, col 2): first half encodes the column, second the row; [sin, cos] at 1/10000^(i/2)
    omega = [1.0, 1.0 / 100]
    want = [math.sin(2 * w) for w in omega] + [math.cos(2 * w) for w in omega] + \
           [math.sin(1 * w) for w in omega] + [math.cos(1 * w) for w in omega]
    torch.testing.assert_close(pos[1 + 1 * 3 + 2], torch.tensor(want))


def test_reconstruction_branch_predicts_every_patch_from_the_visible_ones():
    clip = tiny_clip("vit", layers=3)
    tower = GroupedViT(clip.visual, group_after=2, centres=4).train()
    branch = ReconstructionBranch(tower, decoder_width=16, decoder_depth=1, decoder_heads=2)
    assert branch.blocks[0] is not tower.stage3[0]  # a fresh copy of the later blocks, not the CLIP's
    assert not torch.equal(branch.blocks[0].mlp.c_fc.weight, tower.stage3[0].mlp.c_fc.weight)
    patches, _ = tower.patches(torch.randn(2, 3, 64, 64))
    keep = torch.tensor([[0, 5, 9, 15], [1, 2, 3, 4]])
    pred = branch(tower, patches, keep)
    assert pred.shape == (2, 16, 16 * 16 * 3)
    pred.sum().backward()
    assert tower.group.key_proj.weight.grad.abs().sum() > 0  # through the same group module's assignment


# ---------------------------------------------------------------------------- inference
def test_scoring_rule_on_a_constructed_case():
    """Two regions, three classes plus background. Region 0 looks like class 1, region 1 like class 2;
    the image embedding lets only class 1 through the top-1 gate."""
    e = torch.eye(4)
    text = Classifier(torch.stack([e[3], e[0], e[1], e[2]]), torch.arange(4), 4)  # class 0 = background
    regions = F.normalize(torch.stack([e[0] + 0.1 * e[1], e[1] + 0.2 * e[0]]), dim=1)[None]
    image = F.normalize(e[0] + 0.5 * e[1], dim=0)[None]
    scale = 10.0
    got = region_class_scores(regions, image, text, scale, top_k=1, first_class=1)
    logits = scale * regions[0] @ torch.stack([e[0], e[1], e[2]]).T  # (2 regions, 3 fg classes)
    plain = logits.softmax(-1)
    gated = torch.full_like(logits, float("-inf"))
    gated[:, 0] = logits[:, 0]  # only class 1 (index 0 among the foreground) passes
    torch.testing.assert_close(got[0], gated.softmax(-1) * plain)
    # with the top-2 gate region 1 keeps its own class
    got2 = region_class_scores(regions, image, text, scale, top_k=2, first_class=1)
    assert got2[0, 1].argmax() == 1 and got[0, 1].argmax() == 0
    # pixels take their centre's row; background where the best score < min(threshold, max of A)
    centre = torch.tensor([[[0, 1], [1, 1]]])
    scores = torch.tensor([[[0.9, 0.05, 0.05], [0.3, 0.4, 0.1]]])
    out = pixel_scores(centre, scores, background_threshold=0.5)
    assert out.shape == (1, 4, 2, 2)
    assert out[0].argmax(0).tolist() == [[1, 0], [0, 0]]  # region 1's best (0.4) is below 0.5: background
    assert torch.equal(out[0, 1:, 0, 0], scores[0, 0])
    low = pixel_scores(centre, scores * 0.3, background_threshold=0.5)  # nothing reaches 0.5: min(t, max A) = 0.27
    assert low[0].argmax(0).tolist() == [[1, 0], [0, 0]]
    assert pixel_scores(centre, scores, None).shape == (1, 3, 2, 2)


def test_background_threshold_follows_the_benchmark_class_list(tmp_path):
    from vocaseg.data.datasets import class_file
    from vocaseg.loading import load_clip
    from vocaseg.vocabulary import VOC_BACKGROUND_WORDS, Vocabulary

    loaded = load_clip(str(tiny_model_dir(tmp_path / "m")), pretrained=None)
    model = SegClipModel(loaded.model, SegClipArch(group_after=2))
    voc21 = class_file("voc20").with_background(VOC_BACKGROUND_WORDS)
    assert model.background_threshold(voc21) == 0.80  # the released code's VOC value (the paper prints 0.75)
    assert model.background_threshold(class_file("context59").with_background()) == 0.25
    assert model.background_threshold(Vocabulary.parse(["cat", "dog"]).with_background()) == 0.5
    assert model.background_threshold(Vocabulary.parse(["cat", "dog"])) is None


# ---------------------------------------------------------------------------- the released checkpoint
def _official_names(clip, s, decoder_blocks=1, centres=8, width=64, heads=4, patch=16, grid=4):
    """A state dict in the official naming, random where SegCLIP adds modules (names and shapes as in
    the released code's SemanticLearnerModule, ReconstructLayer, MAEDecoder)."""
    g = torch.Generator().manual_seed(1)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    state = {}
    for k, v in clip.state_dict().items():
        if k.startswith("visual.transformer.resblocks."):
            i, _, rest = k[len("visual.transformer.resblocks."):].partition(".")
            k = f"visual.transformer.layers0.{i}.{rest}" if int(i) < s else f"visual.transformer.layers2.{int(i) - s}.{rest}"
            if int(i) >= s:
                state["clip." + k.replace("layers2", "layers_mae2")] = r(*v.shape)
        state["clip." + k] = v.clone()
    sl, d = "clip.visual.transformer.semantic_layer2.", width
    state.update({sl + "norm.weight": r(d), sl + "norm.bias": r(d), sl + "semantic_center": r(centres, d),
                  sl + "cross_ln.weight": r(d), sl + "cross_ln.bias": r(d), sl + "k_conv.weight": r(d, d // heads, 1),
                  sl + "k_ln.weight": r(d), sl + "k_ln.bias": r(d), sl + "v_conv.weight": r(d, d // heads, 1),
                  sl + "proj_o.ln.weight": r(d), sl + "proj_o.ln.bias": r(d),
                  sl + "proj_o.mlp.fc1.weight": r(4 * d, d), sl + "proj_o.mlp.fc1.bias": r(4 * d),
                  sl + "proj_o.mlp.fc2.weight": r(d, 4 * d), sl + "proj_o.mlp.fc2.bias": r(d)})
    for b in range(2):
        c = f"{sl}cross_att.{b}."
        state.update({c + "attn.in_proj_weight": r(3 * d, d), c + "attn.in_proj_bias": r(3 * d),
                      c + "attn.out_proj.weight": r(d, d), c + "attn.out_proj.bias": r(d),
                      c + "ln_x.weight": r(d), c + "ln_x.bias": r(d), c + "ln_k.weight": r(d), c + "ln_k.bias": r(d),
                      c + "mlp.c_fc.weight": r(4 * d, d), c + "mlp.c_fc.bias": r(4 * d),
                      c + "mlp.c_proj.weight": r(d, 4 * d), c + "mlp.c_proj.bias": r(d),
                      c + "ln_2.weight": r(d), c + "ln_2.bias": r(d)})
    rl = "clip.visual.transformer.reconstruct_layer2.rec_proj_a.a_fc."
    state.update({rl + "weight": r(centres, centres), rl + "bias": r(centres)})
    dw, md = d // 2, "vis_mae_decoder."
    state.update({md + "decoder_embed.weight": r(dw, d), md + "decoder_embed.bias": r(dw), md + "mask_token": r(1, 1, dw),
                  md + "decoder_pos_embed": r(1, 1 + grid * grid, dw), md + "decoder_norm.weight": r(dw),
                  md + "decoder_norm.bias": r(dw), md + "decoder_pred.weight": r(patch * patch * 3, dw),
                  md + "decoder_pred.bias": r(patch * patch * 3)})
    for b in range(decoder_blocks):
        c = f"{md}decoder_blocks.{b}."
        state.update({c + "norm1.weight": r(dw), c + "norm1.bias": r(dw), c + "attn.qkv.weight": r(3 * dw, dw),
                      c + "attn.qkv.bias": r(3 * dw), c + "attn.proj.weight": r(dw, dw), c + "attn.proj.bias": r(dw),
                      c + "norm2.weight": r(dw), c + "norm2.bias": r(dw), c + "mlp.fc1.weight": r(4 * dw, dw),
                      c + "mlp.fc1.bias": r(4 * dw), c + "mlp.fc2.weight": r(dw, 4 * dw), c + "mlp.fc2.bias": r(dw)})
    state["seq_mae_decoder.decoder_embed.weight"] = r(2, 2)  # the text MAE, no part of the paper's model
    return state


def test_official_state_dict_loads_and_runs():
    source = tiny_clip("vit", layers=3, seed=1)
    state = _official_names(source, s=2)
    weights = official_state_dict_to_vocaseg(state)
    assert (weights.group_after, weights.centres, weights.cross_attention_blocks) == (2, 8, 2)
    assert weights.ignored == ["seq_mae_decoder.decoder_embed.weight"]
    target = tiny_clip("vit", layers=3, seed=2)  # other weights: every one must be replaced
    model = segclip_from_official(weights, target).eval()
    for k, v in source.state_dict().items():  # the CLIP, stages joined back into resblocks
        assert torch.equal(target.state_dict()[k], v), k
    sl = "clip.visual.transformer.semantic_layer2."
    pairs = {"centres": "semantic_center", "norm_in.weight": "norm.weight", "key_proj.weight": "k_conv.weight",
             "norm_key.bias": "k_ln.bias", "value_proj.weight": "v_conv.weight", "norm_centres.weight": "cross_ln.weight",
             "out_norm.bias": "proj_o.ln.bias", "out_mlp.fc1.weight": "proj_o.mlp.fc1.weight",
             "out_mlp.fc2.bias": "proj_o.mlp.fc2.bias", "cross_attention.1.norm_query.weight": "cross_att.1.ln_x.weight",
             "cross_attention.1.norm_context.bias": "cross_att.1.ln_k.bias",
             "cross_attention.0.norm_mlp.weight": "cross_att.0.ln_2.weight",
             "cross_attention.0.attn.in_proj_weight": "cross_att.0.attn.in_proj_weight",
             "cross_attention.1.mlp.c_proj.weight": "cross_att.1.mlp.c_proj.weight"}
    group = model.tower.group.state_dict()
    for ours, theirs in pairs.items():
        assert torch.equal(group[ours], state[sl + theirs]), ours
    # the training-only branch fits vocaseg's reconstruction branch exactly
    branch = ReconstructionBranch(model.tower, decoder_width=32, decoder_depth=1, decoder_heads=2)
    branch.load_state_dict(weights.reconstruction, strict=True)
    assert torch.equal(branch.decoder.blocks[0].attn.in_proj_weight,
                       state["vis_mae_decoder.decoder_blocks.0.attn.qkv.weight"])
    assert torch.equal(branch.reconstruct.weight, state["clip.visual.transformer.reconstruct_layer2.rec_proj_a.a_fc.weight"])
    clf = Classifier(F.normalize(torch.randn(3, 32), dim=1), torch.arange(3), 3, {"background_threshold": None})
    assert model.logits(torch.rand(2, 3, 64, 64), clf).shape == (2, 3, 64, 64)


def test_official_checkpoint_converts_to_a_run_folder(tmp_path):
    """Through the command: a random toy-sized checkpoint in the official naming becomes a run folder
    holding every weight; the run loads and segments with the checkpoint's weights."""
    from vocaseg import Segmenter
    from vocaseg.loading import load_clip

    torch.manual_seed(3)
    source = load_clip("toy", pretrained=None).model
    state = _official_names(source, s=4, width=128, heads=4, patch=8, grid=12)
    path = tmp_path / "segclip.bin"
    torch.save(state, path)
    out = tmp_path / "paper"
    assert main(["convert", "segclip", str(path), "--model", "toy", "--out", str(out)]) == 0
    info = json.loads((out / "method.json").read_text())
    assert info["model"]["full_clip"] and info["model"]["group_after"] == 4
    seg = Segmenter.from_pretrained(str(out))
    assert torch.equal(seg.trained.tower.group.centres, state["clip.visual.transformer.semantic_layer2.semantic_center"])
    assert torch.equal(seg.backbone.clip.token_embedding.weight, source.token_embedding.weight)
    res = seg.predict(np.zeros((40, 50, 3), np.uint8), ["cat", "road"], background=True)
    assert res.labels.shape == (40, 50)


def test_official_checkpoint_errors(tmp_path, capsys):
    assert main(["convert", "segclip", str(tmp_path / "segclip.bin"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "segclip.bin" in err and "checkpoint_v0" in err  # names the file and where to get it
    plain = tmp_path / "clip.bin"
    torch.save(tiny_clip("vit").state_dict(), plain)
    assert main(["convert", "segclip", str(plain), "--out", str(tmp_path / "o")]) == 2
    assert "not a SegCLIP checkpoint" in capsys.readouterr().err
    with pytest.raises(ValueError, match="does not fit"):
        segclip_from_official(official_state_dict_to_vocaseg(_official_names(tiny_clip("vit", layers=3), s=2)),
                              tiny_clip("vit", layers=2))


# ---------------------------------------------------------------------------- data
def _write_pairs(root, n=3):
    """n synth scenes as PNG files, listed in a CSV and packed into a webdataset shard."""
    from PIL import Image

    from vocaseg.data.synth import make_scene

    root.mkdir(parents=True, exist_ok=True)
    rows, scenes = ["path,caption"], []
    with tarfile.open(root / "shard-000.tar", "w") as tar:
        for i in range(n):
            scene = make_scene(i, "train", 0, 48)
            Image.fromarray(scene.image).save(root / f"s{i}.png")
            rows.append(f"s{i}.png,\"{scene.caption}\"")
            tar.add(root / f"s{i}.png", arcname=f"sample{i:03d}.png")
            (root / f"s{i}.txt").write_text(scene.caption)
            tar.add(root / f"s{i}.txt", arcname=f"sample{i:03d}.txt")
            scenes.append(scene)
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    return scenes


def test_csv_and_webdataset_sources_give_the_same_pairs(tmp_path):
    from vocaseg.data.pairs import build_pairs

    scenes = _write_pairs(tmp_path / "data")
    csv = build_pairs("csv", str(tmp_path / "data" / "pairs.csv"))
    shards = build_pairs("webdataset", str(tmp_path / "data" / "shard-{000..000}.tar"), cache_dir=str(tmp_path / "c"))
    assert len(csv) == len(shards) == 3
    for i, scene in enumerate(scenes):
        for source in (csv, shards):
            image, caption = source.pair(i)
            assert np.array_equal(image, scene.image) and caption == scene.caption
    assert list((tmp_path / "c").glob("*.json"))  # the shard index is cached
    assert len(build_pairs("csv", str(tmp_path / "data" / "pairs.csv"), length=2)) == 2


def test_stream_items_depend_on_their_index_only(tmp_path, tokenizer):
    from vocaseg.data.pairs import build_pairs
    from vocaseg.methods.segclip import ImageTextStream

    _write_pairs(tmp_path / "data")
    pairs = build_pairs("csv", str(tmp_path / "data" / "pairs.csv"))
    fz = Felzenszwalb(30.0, 0.9, 10, cache_dir=str(tmp_path / "sp"))
    stream = ImageTextStream(pairs, tokenizer, (0.5,) * 3, (0.25,) * 3, 32, 8, seed=0, stored_side=40,
                             superpixels=fz)
    a, b = stream[5], stream[5]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    pixels, tokens, labels = a
    assert pixels.shape == (3, 32, 32) and tokens.shape == (16,) and labels.shape == (16,)
    assert len(list((tmp_path / "sp").rglob("*.npy"))) == 1  # superpixels computed once per image, cached
    assert not torch.equal(stream[6][0], pixels)
    from vocaseg.methods.segclip import TrainingNoise

    stream.noise = TrainingNoise(centres=4, patches=16, visible=3)
    gumbel, keep, masked = stream[5][3:]
    assert gumbel.shape == (4, 16) and masked.shape == (4, 3) and keep.tolist() == sorted(set(keep.tolist()))
    assert all(torch.equal(x, y) for x, y in zip(stream[5], stream[5]))  # the item's own draws


def test_random_resized_crop_keeps_image_and_map_aligned():
    from vocaseg.training.augment import random_resized_crop

    image = np.zeros((60, 80, 3), np.uint8)
    image[:, 40:] = 255
    label = (image[..., 0] > 0).astype(np.int64)
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    pixels, mask = random_resized_crop(image, label, 32, generator=g1)
    again, _ = random_resized_crop(image, label, 32, generator=g2)
    assert torch.equal(pixels, again) and pixels.shape == (3, 32, 32) and mask.shape == (32, 32)
    inside = (mask == 1) == (pixels[0] > 0.5)
    assert inside.float().mean() > 0.95  # the map follows the image (bicubic blurs the edge column)


# ---------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """20 steps of the toy recipe at batch 4 on 4 scenes (and their twins), from the shipped toy CLIP."""
    out = tmp_path_factory.mktemp("segclip") / "run"
    cfg = make_config("synth", out=str(out), steps=20, batch_size=4, train_images=4, eval_images=8, log_every=1,
                      checkpoint_every=20, warmup=0.1, progress=False)
    train_segclip(cfg)
    return out


def test_toy_training_loss_falls(toy_run):
    rows = [r for r in map(json.loads, (toy_run / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(rows) == 20 and {"loss_contrastive", "loss_reconstruction", "loss_superpixel"} <= set(rows[0])
    first = np.mean([r["loss"] for r in rows[:5]])
    last = np.mean([r["loss"] for r in rows[-5:]])
    assert last < 0.8 * first, (first, last)
    assert np.mean([r["loss_contrastive"] for r in rows[-5:]]) < np.mean([r["loss_contrastive"] for r in rows[:5]])


def test_run_folder_holds_the_trained_parts_only_and_loads(toy_run):
    from safetensors.torch import load_file

    from vocaseg import Segmenter
    from vocaseg.loading import load_clip

    weights = load_file(str(toy_run / "weights.safetensors"))
    assert any(k.startswith("tower.group.") for k in weights) and "clip_logit_scale" in weights
    assert any(k.startswith("text.transformer.") for k in weights)
    # frozen (reloaded from the toy) and training-only parts are not stored
    assert not any("conv1" in k or "token_embedding" in k or "positional_embedding" in k or "decoder" in k
                   for k in weights)
    seg = Segmenter.from_pretrained(str(toy_run))
    assert seg.method == "segclip" and seg.model_id.endswith("|run:" + seg.model_id.split("|run:")[1])
    toy = load_clip("toy").model
    assert torch.equal(seg.backbone.clip.visual.conv1.weight, toy.visual.conv1.weight)  # frozen, unchanged
    assert not torch.equal(seg.backbone.clip.visual.transformer.resblocks[0].attn.in_proj_weight,
                           toy.visual.transformer.resblocks[0].attn.in_proj_weight)  # stage 1 trained (lr 1e-6)
    # the text side is the run's fine-tuned tower, not the toy's (so its embeddings are cached apart)
    plain = Segmenter.from_pretrained("toy", templates="photo")
    assert not torch.allclose(seg.encode_text(["circle"]), plain.encode_text(["circle"]))
    res = seg.predict(np.zeros((40, 50, 3), np.uint8), ["cat", "road", "sky"])
    assert res.labels.shape == (40, 50)


def test_run_replaces_a_benchmark_protocols_thresholds(toy_run):
    """VOC21's SCLIP protocol thresholds softmax probabilities (0.1) and class areas; SegCLIP's products of
    softmaxes would be misread by them, so its run's own rule (the background threshold) replaces them."""
    from vocaseg.runs import run_inference_defaults
    from vocaseg.data.datasets import _sclip

    protocol = _sclip(336, 65.0, prob_threshold=0.1, area_threshold=0.1)  # voc21's
    merged = {**protocol, **run_inference_defaults(str(toy_run))}  # what `vocaseg eval` does
    assert merged["prob_threshold"] is None and merged["area_threshold"] is None


def test_run_through_eval_and_its_recorded_score(toy_run, tmp_path):
    out = tmp_path / "eval.json"
    assert main(["eval", "--dataset", "synth", "--model", str(toy_run), "--limit", "8", "--workers", "0",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    recorded = json.loads((toy_run / "eval.json").read_text())
    assert result["config"]["method"] == "segclip"
    assert result["mIoU"] == pytest.approx(recorded["val_mIoU"], abs=0.01)  # the same 8 val scenes, same model


def test_param_groups_two_learning_rates_and_no_decay_on_biases(tmp_path):
    from vocaseg.methods.segclip import SegClipRecipe

    cfg = make_config(None, out=str(tmp_path / "r"), model=str(tiny_model_dir(tmp_path / "m")), pretrained="none",
                      group_after=2, decoder_width=16, decoder_heads=2, lr=1e-3, clip_lr=1e-6)
    recipe = SegClipRecipe(cfg)
    module = recipe.build()
    names = {id(p): n for n, p in module.named_parameters()}
    for group in recipe.param_groups(module):
        for p in group["params"]:
            name = names[id(p)]
            slow = name.startswith(("model.tower.stage1.", "model.text.", "model.clip_logit_scale"))
            assert group.get("lr_mult", 1.0) == (1e-3 if slow else 1.0), name
            assert group["weight_decay"] == (0.0 if name.endswith("bias") else 0.05), name
    trained = {names[id(p)] for g in recipe.param_groups(module) for p in g["params"]}
    assert "model.tower.group.centres" in trained and "model.tower.ln_post.weight" in trained
    assert not any("conv1" in n or "token_embedding" in n for n in trained)


def test_sigkill_then_resume_gives_the_uninterrupted_weights(tmp_path):
    """Bit-exact on CPU: data order, crops, masks and Gumbel noise all continue where they stopped."""
    model = tiny_model_dir(tmp_path / "m")
    args = ["train", "segclip", "--model", str(model), *TINY, "--steps", "6", "--batch-size", "2",
            "--checkpoint-every", "1"]
    assert_sigkill_resume_is_exact(args, tmp_path)


@pytest.mark.slow  # about 20 s: two torchrun processes
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_two_process_torchrun_matches_one_process(tmp_path):
    """Global batch 4, on one process or two taking 2 pairs each: the contrastive loss sees every caption
    of the global batch (gathered), and every random draw (crop, mask, Gumbel noise) belongs to its
    item, so the two runs agree (float64, to 1e-9) after 3 steps."""
    from safetensors.torch import load_file

    args = ["train", "segclip", "--model", str(tiny_model_dir(tmp_path / "m")), *TINY, "--steps", "3",
            "--batch-size", "4", "--precision", "fp64"]
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    torchrun_cli(args, tmp_path / "two")
    one, two = load_file(str(tmp_path / "one" / "weights.safetensors")), load_file(str(tmp_path / "two" / "weights.safetensors"))
    assert one.keys() == two.keys() and one["tower.group.centres"].dtype == torch.float64
    for k in one:
        torch.testing.assert_close(one[k], two[k], atol=1e-9, rtol=0, msg=k)
    assert (one["tower.group.centres"] - _untrained_centres(tmp_path)).abs().max() > 1e-4  # it did train


def _untrained_centres(tmp_path):
    from vocaseg.methods.segclip import SegClipRecipe

    cfg = make_config(None, out=str(tmp_path / "u"), model=str(tmp_path / "m"), pretrained="none", group_after=2,
                      decoder_width=16, decoder_heads=2)
    recipe = SegClipRecipe(cfg)
    torch.manual_seed(cfg.seed)  # as the trainer, before build
    return recipe.build().model.tower.group.centres.detach().double()


@pytest.mark.parametrize("flags", [["--losses", "contrastive"], ["--losses", "contrastive,superpixel",
                                                                  "--official-batch-mixing", "--kl-form", "paper"],
                                   ["--cross-attention-blocks", "0", "--centres", "3", "--group-after", "3",
                                    "--image-pool", "mean"]])
def test_ablation_flags_train_and_are_recorded(flags, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "segclip", "--model", str(tiny_model_dir(tmp_path / "m")), *TINY, "--steps", "2",
                 "--batch-size", "2", "--out", str(out), *flags]) == 0
    info = json.loads((out / "method.json").read_text())
    config = info["config"]
    for flag, value in zip(flags[::2], flags[1::2]):
        if flag.startswith("--") and not value.startswith("--"):
            key = flag[2:].replace("-", "_")
            assert str(config[key]) == value, key
    if "--official-batch-mixing" in flags:
        assert info["model"]["official_batch_mixing"] is True
    if "--image-pool" in flags:  # the run loads with the pooling it was trained with
        assert info["model"]["image_pool"] == "mean"
        from vocaseg import Segmenter

        assert Segmenter.from_pretrained(str(out)).trained.tower.image_pool == "mean"
    from safetensors.torch import load_file

    assert load_file(str(out / "weights.safetensors"))  # and no reconstruction branch in the model's weights


def test_errors_name_the_problem(tmp_path, capsys):
    def error_of(argv):
        assert main(argv) == 2
        return capsys.readouterr().err

    base = ["train", "segclip", "--out", str(tmp_path / "x")]
    assert "contrastive" in error_of(base + ["--losses", "reconstruction"])
    assert "--data-root" in error_of(base + ["--dataset", "csv"])
    assert "nope.csv" in error_of(base + ["--dataset", "csv", "--data-root", str(tmp_path / "nope.csv")])
    assert "--dataset webdataset" in error_of(base + ["--dataset", "csv", "--data-root", str(tmp_path)])
    assert "group-after 9" in error_of(base + ["--group-after", "9"])
    assert "nothing to resume" in error_of(base + ["--resume"])


@pytest.mark.slow  # ViT-B/16 with random weights, one step
def test_paper_preset_runs_on_a_csv_of_pairs(tmp_path):
    _write_pairs(tmp_path / "data")
    out = tmp_path / "run"
    assert main(["train", "segclip", "--preset", "cc3m_coco", "--data-root", str(tmp_path / "data" / "pairs.csv"),
                 "--pretrained", "none", "--steps", "1", "--batch-size", "2", "--out", str(out)]) == 0
    info = json.loads((out / "method.json").read_text())
    config = info["config"]
    assert info["clip"]["model"] == "ViT-B-16" and info["model"]["group_after"] == 10
    assert (config["lr"], config["clip_lr"], config["decoder_width"], config["stored_side"]) == (4e-3, 4e-6, 384, 224)
    assert info["inference"] == {"mode": "slide", "short_side": 224, "window": 224, "stride": 224,
                                 "prob_threshold": None, "area_threshold": None}
    from vocaseg import Segmenter

    seg = Segmenter.from_pretrained(str(out))
    assert seg.predict(np.zeros((40, 50, 3), np.uint8), ["cat", "road"]).labels.shape == (40, 50)


def test_cpu_preset_is_the_synth_recipe_with_a_cpu_schedule():
    """synth_cpu is the toy recipe with batch 32 x 600 steps and nothing else changed, so the README's
    shipped command (preset synth plus those flags) and the preset give the same run."""
    cpu = make_config("synth_cpu", out="x")
    flags = make_config("synth", out="x", batch_size=32, steps=600, lr=4e-3)
    assert dataclasses.replace(cpu, preset="synth") == flags
    assert (cpu.batch_size, cpu.steps, cpu.lr, cpu.clip_lr) == (32, 600, 4e-3, 1e-6)
