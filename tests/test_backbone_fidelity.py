"""Every last-block rule against a straightforward re-computation from the weights (DESIGN.md formulas)."""

import math

import pytest
import torch
import torch.nn.functional as F

from vocaseg.backbone import CLIPBackbone
from vocaseg.towers import LateClassTokenViT

from conftest import tiny_clip


@pytest.fixture(scope="module", params=["class-token-first", "class-token-last-block", "class-token-mid"])
def any_vit(request, vit_model):
    """open_clip's ViT, and vocaseg's late-class-token variant joining before the last / a middle block."""
    if request.param == "class-token-first":
        return vit_model
    model = tiny_clip("vit", layers={"class-token-last-block": 2, "class-token-mid": 3}[request.param])
    LateClassTokenViT.convert(model.visual, 1)
    return model


def _last_block_input(model, pixels):
    """Tokens entering the last ViT block, captured from open_clip's own forward."""
    captured = {}
    block = model.visual.transformer.resblocks[-1]
    handle = block.register_forward_pre_hook(lambda mod, args: captured.setdefault("x", args[0].clone()))
    with torch.no_grad():
        model.visual(pixels)
    handle.remove()
    return captured["x"]  # (B, N, C), batch first


def _reference_vit(model, pixels, rule):
    vis = model.visual
    blk = vis.transformer.resblocks[-1]
    x = _last_block_input(model, pixels)
    C = x.shape[-1]
    W, bias = blk.attn.in_proj_weight, blk.attn.in_proj_bias
    Wq, Wk, Wv = W[:C], W[C:2 * C], W[2 * C:]
    bq, bk, bv = bias[:C], bias[C:2 * C], bias[2 * C:]
    y = blk.ln_1(x)
    q, k, v = y @ Wq.T + bq, y @ Wk.T + bk, y @ Wv.T + bv
    heads = blk.attn.num_heads
    hd = C // heads
    s = hd ** -0.5
    n = x.shape[1]
    side = int(math.isqrt(n - 1))

    def attend(a_of_head):
        outs = []
        for h in range(heads):
            sl = slice(h * hd, (h + 1) * hd)
            outs.append(a_of_head(q[..., sl], k[..., sl]) @ v[..., sl])
        return torch.cat(outs, dim=-1)

    out_proj = blk.attn.out_proj
    if rule == "maskclip":
        z = x + out_proj(v)
        z = z + blk.mlp(blk.ln_2(z))
    elif rule == "raw":
        z = x + out_proj(attend(lambda qh, kh: torch.softmax(qh @ kh.transpose(-1, -2) * s, -1)))
        z = z + blk.mlp(blk.ln_2(z))
    elif rule == "sclip":
        z = x + out_proj(attend(lambda qh, kh: torch.softmax(qh @ qh.transpose(-1, -2) * s, -1)
                                + torch.softmax(kh @ kh.transpose(-1, -2) * s, -1)))
        z = z + blk.mlp(blk.ln_2(z))
    elif rule == "clearclip":
        z = out_proj(attend(lambda qh, kh: torch.softmax(qh @ qh.transpose(-1, -2) * s, -1)))
    elif rule == "naclip":
        G = torch.zeros(n, n)
        for i in range(n - 1):
            for j in range(n - 1):
                yi, xi, yj, xj = i // side, i % side, j // side, j % side
                G[i + 1, j + 1] = math.exp(-((yi - yj) ** 2 + (xi - xj) ** 2) / (2 * 5.0 ** 2))
        z = out_proj(attend(lambda qh, kh: torch.softmax(kh @ kh.transpose(-1, -2) * s + G, -1)))
    f = vis.ln_post(z) @ vis.proj
    f = f[:, 1:] / f[:, 1:].norm(dim=-1, keepdim=True)
    return f.transpose(1, 2).reshape(x.shape[0], -1, side, side)


@pytest.mark.parametrize("rule", ["maskclip", "raw", "sclip", "clearclip", "naclip"])
def test_vit_rules_match_formulas(any_vit, rule):
    pixels = torch.randn(2, 3, 64, 64)
    ours = CLIPBackbone(any_vit).dense(pixels, rule).features
    with torch.no_grad():
        ref = _reference_vit(any_vit, pixels, rule)
    assert ours.shape == (2, 32, 4, 4)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


def test_vit_raw_matches_open_clip_tokens(any_vit):
    """raw == the tower's own token output projected (an independent path through the model)."""
    pixels = torch.randn(2, 3, 64, 64)
    any_vit.visual.output_tokens = True
    try:
        with torch.no_grad():
            _, tokens = any_vit.visual(pixels)
    finally:
        any_vit.visual.output_tokens = False
    ref = F.normalize(tokens @ any_vit.visual.proj, dim=-1).transpose(1, 2).reshape(2, -1, 4, 4)
    torch.testing.assert_close(CLIPBackbone(any_vit).dense(pixels, "raw").features, ref, atol=2e-5, rtol=1e-4)


def test_maskclip_differs_from_raw(vit_model):
    pixels = torch.randn(1, 3, 64, 64)
    bb = CLIPBackbone(vit_model)
    assert not torch.allclose(bb.dense(pixels, "maskclip").features, bb.dense(pixels, "raw").features, atol=1e-3)


def _attnpool_input(model, pixels):
    """The feature map entering the ResNet's attention pool, captured from open_clip's own forward."""
    captured = {}
    handle = model.visual.attnpool.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0].clone()))
    with torch.no_grad():
        model.visual(pixels)
    handle.remove()
    return captured["x"]  # (B, C, h, w)


def test_resnet_maskclip_is_value_then_c_proj(resnet_model):
    vis = resnet_model.visual
    pixels = torch.randn(2, 3, 64, 64)
    x = _attnpool_input(resnet_model, pixels)
    pool = vis.attnpool
    with torch.no_grad():
        ref = torch.einsum("bchw,oc->bohw", x, pool.v_proj.weight) + pool.v_proj.bias[:, None, None]
        ref = torch.einsum("bchw,oc->bohw", ref, pool.c_proj.weight) + pool.c_proj.bias[:, None, None]
        ref = ref / ref.norm(dim=1, keepdim=True)
    torch.testing.assert_close(CLIPBackbone(resnet_model).dense(pixels, "maskclip").features, ref,
                               atol=2e-5, rtol=1e-4)


def test_resnet_raw_query_of_mean_token_equals_clip_pooling(resnet_model):
    """With each location as a query, the pooled (mean-token) query reproduces open_clip's attnpool output;
    check our per-location attention by recomputing one location by hand."""
    vis = resnet_model.visual
    pixels = torch.randn(1, 3, 64, 64)
    x = _attnpool_input(resnet_model, pixels)
    pool = vis.attnpool
    tokens = x.flatten(2).permute(0, 2, 1)[0]  # (hw, C)
    seq = torch.cat([tokens.mean(0, keepdim=True), tokens]) + pool.positional_embedding
    with torch.no_grad():
        q, k, v = pool.q_proj(seq), pool.k_proj(seq), pool.v_proj(seq)
        heads, C = pool.num_heads, seq.shape[1]
        hd = C // heads
        loc = 3  # location index (token loc+1)
        outs = []
        for hh in range(heads):
            sl = slice(hh * hd, (hh + 1) * hd)
            a = torch.softmax(q[loc + 1, sl] @ k[:, sl].T * hd ** -0.5, -1)
            outs.append(a @ v[:, sl])
        ref = pool.c_proj(torch.cat(outs))
        ref = ref / ref.norm()
    ours = CLIPBackbone(resnet_model).dense(pixels, "raw").features[0].flatten(1)[:, loc]
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("rule", ["sclip", "clearclip", "naclip"])
def test_resnet_rejects_vit_only_rules(resnet_model, rule):
    with pytest.raises(NotImplementedError, match="ViT"):
        CLIPBackbone(resnet_model).dense(torch.randn(1, 3, 64, 64), rule)


def test_positional_embedding_interpolates_to_any_grid(vit_model):
    out = CLIPBackbone(vit_model).dense(torch.randn(1, 3, 96, 160), "maskclip").features
    assert out.shape == (1, 32, 6, 10)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(1, 6, 10))


@pytest.mark.parametrize("kind", ["paper", "official"])
def test_keys_for_key_smoothing(vit_model, kind):
    """paper: the last block's keys W_k ln_1(x) + b_k; official (MaskCLIP's code): those keys through
    the attention's out_proj. Patch tokens only, not normalised."""
    backbone = CLIPBackbone(vit_model)
    pixels = torch.randn(2, 3, 64, 64)
    out = backbone.dense(pixels, "maskclip", keys=kind)
    x, _ = backbone.tokens_before_last_block(pixels)
    block = vit_model.visual.transformer.resblocks[-1]
    c = x.shape[-1]
    k = block.ln_1(x) @ block.attn.in_proj_weight[c:2 * c].T + block.attn.in_proj_bias[c:2 * c]
    if kind == "official":
        k = k @ block.attn.out_proj.weight.T + block.attn.out_proj.bias
    assert out.keys.shape == (2, 16, 64)
    torch.testing.assert_close(out.keys, k[:, 1:], atol=1e-5, rtol=1e-5)


def test_resnet_keys_are_k_proj(resnet_model):
    backbone = CLIPBackbone(resnet_model)
    pixels = torch.randn(1, 3, 64, 64)
    visual = resnet_model.visual
    x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(pixels)))))
    tokens = x.flatten(2).transpose(1, 2)
    for kind in ("paper", "official"):
        torch.testing.assert_close(backbone.dense(pixels, "maskclip", keys=kind).keys,
                                   visual.attnpool.k_proj(tokens), atol=1e-5, rtol=1e-5)
