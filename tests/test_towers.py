"""vocaseg's late-class-token ViT: same parameters as open_clip's, class token joining late, config handling."""

import json

import pytest
import torch
from conftest import tiny_clip

from vocaseg.backbone import CLIPBackbone
from vocaseg.loading import TOY_WEIGHTS, load_clip
from vocaseg.towers import LateClassTokenViT, apply_tower_config


def test_same_parameters_as_open_clip_tower():
    plain, late = tiny_clip("vit", seed=0), tiny_clip("vit", seed=0)
    LateClassTokenViT.convert(late.visual, 1)
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in late.state_dict().items()}
    late.load_state_dict(plain.state_dict(), strict=True)  # checkpoints move between the two


def test_block_zero_is_open_clips_own_forward():
    plain, late = tiny_clip("vit", seed=0), tiny_clip("vit", seed=0)
    LateClassTokenViT.convert(late.visual, 0)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(late.encode_image(pixels), plain.encode_image(pixels), atol=1e-5, rtol=1e-4)


def test_patches_do_not_see_a_class_token_before_it_joins():
    pixels = torch.randn(1, 3, 64, 64)
    for block, patches_should_change in ((0, True), (1, False)):
        model = tiny_clip("vit", seed=0)
        if block:
            LateClassTokenViT.convert(model.visual, block)
        bb = CLIPBackbone(model)
        with torch.no_grad():
            before, _ = bb.tokens_before_last_block(pixels)
            emb = model.encode_image(pixels)
            model.visual.class_embedding.add_(torch.randn_like(model.visual.class_embedding))  # (a constant would vanish in ln_pre)
            after, _ = bb.tokens_before_last_block(pixels)
            assert not torch.allclose(model.encode_image(pixels), emb, atol=1e-4)  # the readout depends on it
        assert (not torch.allclose(before[:, 1:], after[:, 1:], atol=1e-5)) == patches_should_change


def test_tower_config_is_checked():
    model = tiny_clip("vit")
    with pytest.raises(ValueError, match="class_token_block must be in"):
        apply_tower_config(model, {"vocaseg": {"class_token_block": 2}})
    with pytest.raises(ValueError, match="unknown 'vocaseg' options"):
        apply_tower_config(model, {"vocaseg": {"class_token_blok": 1}})
    with pytest.raises(TypeError, match="VisionTransformer"):
        LateClassTokenViT.convert(tiny_clip("resnet").visual, 1)
    assert type(apply_tower_config(model, {}).visual).__name__ == "VisionTransformer"


def test_model_folder_declares_the_tower(tmp_path):
    from vocaseg.loading import TOY_DIR

    config = json.loads((TOY_DIR / "open_clip_config.json").read_text())
    config["vocaseg"] = {"class_token_block": 3}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    visual = load_clip(str(tmp_path), pretrained=None).model.visual
    assert isinstance(visual, LateClassTokenViT) and visual.class_token_block == 3


@pytest.mark.skipif(not TOY_WEIGHTS.is_file(), reason="toy weights not shipped in this checkout")
def test_shipped_toy_reads_the_class_token_out_of_the_last_block():
    visual = load_clip("toy").model.visual
    assert isinstance(visual, LateClassTokenViT)
    assert visual.class_token_block == len(visual.transformer.resblocks) - 1
