"""Dense, text-aligned features from a frozen open_clip image tower.

The wrapped model is used through its own modules (no CLIP code is copied); only the last block of
the image tower is re-run under a *rule* that decides how patch tokens are formed:

- ``maskclip``: the value path only, ``x + out_proj(v)`` then the MLP (ViT); the attention-pool's
  ``v_proj`` then ``c_proj`` at every location (ResNet). No query/key attention.
- ``raw``: the unmodified last block (the baseline MaskCLIP improves on).
- ``sclip``: correlative attention ``softmax(qq^T s) + softmax(kk^T s)``, then residual and MLP.
- ``clearclip``: ``out_proj(softmax(qq^T s) v)``, no residual, no MLP.
- ``naclip``: ``out_proj(softmax(kk^T s + G) v)`` with a Gaussian neighbourhood bias G, no residual,
  no MLP.
Positional embeddings are interpolated bicubically to the input grid, so any input size works.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

RULES = ("maskclip", "raw", "sclip", "clearclip", "naclip")
RESNET_RULES = ("maskclip", "raw")
NACLIP_SIGMA = 5.0


KEY_KINDS = ("official", "paper")


@dataclass
class DenseOutput:
    features: torch.Tensor  # (B, D, h, w) float32, L2-normalised along D (unless asked not to be)
    keys: torch.Tensor | None  # (B, h*w, K) float32 patch keys of the last attention (not normalised)


def _interpolate_grid_embedding(pos: torch.Tensor, grid: tuple[int, int], prefix: int = 1) -> torch.Tensor:
    """Resize a (prefix + g*g, C) positional embedding to (prefix + h*w, C), bicubic."""
    n = pos.shape[0] - prefix
    side = int(round(math.sqrt(n)))
    if side * side != n:
        raise ValueError(f"positional embedding of {n} tokens is not a square grid")
    if (side, side) == tuple(grid):
        return pos
    patch = pos[prefix:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patch = F.interpolate(patch.float(), size=grid, mode="bicubic", align_corners=False).to(pos.dtype)
    return torch.cat([pos[:prefix], patch.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)])


def neighbourhood_bias(grid: tuple[int, int], sigma: float = NACLIP_SIGMA, prefix: int = 1,
                       device=None, dtype=torch.float32) -> torch.Tensor:
    """NACLIP's G: Gaussian of squared grid distance between patches; 0 for the class token."""
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], 1).to(dtype)
    gauss = torch.exp(-torch.cdist(pos, pos).pow(2) / (2 * sigma ** 2))
    return F.pad(gauss, (prefix, 0, prefix, 0))


def input_size(visual: torch.nn.Module) -> int:
    """The square input size an open_clip image tower was built for (ViT ``image_size``, ResNet ``input_resolution``)."""
    size = visual.image_size if hasattr(visual, "image_size") else getattr(visual, "input_resolution", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def vit_embed(visual: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """An open_clip ViT's input tokens after ``ln_pre``, batch first: the patch tokens (B, h*w, C), the
    class token (B, 1, C) and the patch grid (h, w); the positional embedding is resized to the grid."""
    x = visual.conv1(pixels.to(visual.conv1.weight.dtype))
    grid = (x.shape[-2], x.shape[-1])
    pos = _interpolate_grid_embedding(visual.positional_embedding, grid)
    x = visual.ln_pre(x.flatten(2).transpose(1, 2) + pos[1:].to(x.dtype))
    cls = visual.ln_pre((visual.class_embedding + pos[0]).to(x.dtype)).expand(x.shape[0], 1, -1)
    return x, cls, grid


def _plain_block(block: nn.Module) -> bool:
    """open_clip's default pre-norm block with a self-attention ``nn.MultiheadAttention`` (what CLIP ViTs use)."""
    attn = getattr(block, "attn", None)
    return (type(block).__name__ == "ResidualAttentionBlock" and isinstance(attn, nn.MultiheadAttention)
            and attn._qkv_same_embed_dim and attn.in_proj_bias is not None and not hasattr(block, "ln_1_kv"))


def run_block(block: nn.Module, x: torch.Tensor, batch_first: bool = True) -> torch.Tensor:
    """One residual block on batch-first tokens, whichever layout the tower's blocks expect.

    open_clip's default block is computed here with ``scaled_dot_product_attention``, which is the
    same arithmetic as its ``nn.MultiheadAttention`` but never holds the (tokens x tokens) attention
    matrix: a fused kernel on the CPU as on the GPU (torch's inference fast path for
    ``MultiheadAttention`` forms the matrix with batched matmuls, and large window batches then
    spend a third of their time there); any other block, or one with hooks, runs as it is."""
    if not _plain_block(block) or block._forward_hooks or block._forward_pre_hooks:
        return block(x) if batch_first else block(x.transpose(0, 1)).transpose(0, 1)
    attn = block.attn
    b, n, c = x.shape
    heads = attn.num_heads
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    mixed = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
    x = x + block.ls_1(attn.out_proj(mixed))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def vit_tokens(visual: nn.Module, pixels: torch.Tensor, stop: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """An open_clip ViT's tokens entering block ``stop`` (the tower's output for ``stop`` = its depth), batch first.

    The class token joins before block ``visual.class_token_block``: 0 in open_clip's towers, later in
    vocaseg's ``LateClassTokenViT`` (towers.py), whose forward is this function plus the pooling.
    Returns the tokens, class token first once it has joined, and the patch grid (h, w).
    """
    x, cls, grid = vit_embed(visual, pixels)
    joins = getattr(visual, "class_token_block", 0)
    batch_first = getattr(visual.transformer, "batch_first", True)
    for i, block in enumerate(visual.transformer.resblocks[:stop]):
        if i == joins:
            x = torch.cat([cls, x], dim=1)
        x = run_block(block, x, batch_first)
    if joins == stop:
        x = torch.cat([cls, x], dim=1)
    return x, grid


class CLIPBackbone(nn.Module):
    """Adapter over an open_clip CLIP model: text embeddings and dense image features."""

    def __init__(self, clip_model: nn.Module, visual: nn.Module | None = None):
        """``visual``: an image tower to use instead of the model's own (its int8 copy, quantize.py)."""
        super().__init__()
        self.clip = clip_model
        visual = clip_model.visual if visual is None else visual
        self.visual = visual
        if hasattr(visual, "attnpool"):
            self.kind = "resnet"
            self.stride = 32
            self.embed_dim = visual.attnpool.c_proj.out_features
        elif hasattr(visual, "conv1") and hasattr(visual, "transformer"):
            self.kind = "vit"
            if getattr(visual, "attn_pool", None) is not None:
                raise NotImplementedError("ViTs with an attentional pooler are not supported (no token-level path)")
            last = visual.transformer.resblocks[-1]
            if not (isinstance(getattr(last, "attn", None), nn.MultiheadAttention) or hasattr(last.attn, "qkv")):
                raise NotImplementedError("only ViTs built from open_clip's default residual blocks are supported")
            self.stride = visual.conv1.stride[0]
            self.embed_dim = visual.proj.shape[1]
        else:
            raise NotImplementedError(
                f"image tower {type(visual).__name__} is not supported; vocaseg needs a ViT or ModifiedResNet tower")
        self.image_size = input_size(visual)

    # ----------------------------------------------------------------- text
    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, context) token ids -> (N, D) float32, L2-normalised: ``clip.encode_text``, run only up to
        the batch's longest prompt where that is the same computation (a causal text tower pooled at
        the end-of-text token, whose position is the argmax of the ids): the padding after it cannot
        reach the pooled token, and prompts are mostly much shorter than the 77-token context."""
        clip = self.clip
        trims = (getattr(clip, "text_pool_type", None) == "argmax" and getattr(clip, "attn_mask", None) is not None
                 and hasattr(clip, "token_embedding") and hasattr(clip, "ln_final"))
        if not trims:
            return F.normalize(clip.encode_text(tokens).float(), dim=-1)
        end = tokens.argmax(dim=-1)
        length = int(end.max()) + 1
        cast = clip.transformer.get_cast_dtype()
        x = clip.token_embedding(tokens[:, :length]).to(cast) + clip.positional_embedding[:length].to(cast)
        x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask[:length, :length]))
        x = x[torch.arange(len(x), device=x.device), end]
        proj = clip.text_projection
        if proj is not None:
            x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return F.normalize(x.float(), dim=-1)

    # ----------------------------------------------------------------- image
    @torch.no_grad()
    def dense(self, pixels: torch.Tensor, rule: str = "maskclip", keys: str | None = None,
              normalize: bool = True) -> DenseOutput:
        """pixels (B,3,H,W) normalised -> features (B,D,H/s,W/s); H and W must be multiples of the stride.

        normalize: L2-normalise the features along D (False: the projected features as they are,
        e.g. for a feature-distillation target).

        keys: also return the last attention's patch keys for key smoothing: ``"paper"`` = the keys
        ``W_k ln_1(x) + b_k`` (MaskCLIP Eq. 5); ``"official"`` = the same passed through the attention's
        ``out_proj``, as MaskCLIP's released code does for ViTs (ResNets: ``k_proj`` either way).
        """
        if keys is not None and keys not in KEY_KINDS:
            raise ValueError(f"keys must be one of {KEY_KINDS} or None, not {keys!r}")
        if rule not in RULES:
            raise ValueError(f"unknown method {rule!r}; choose one of {', '.join(RULES)}")
        if pixels.shape[-1] % self.stride or pixels.shape[-2] % self.stride:
            raise ValueError(f"input size {tuple(pixels.shape[-2:])} is not a multiple of the stride {self.stride}")
        if self.kind == "vit":
            return self._dense_vit(pixels, rule, keys, normalize)
        if rule not in RESNET_RULES:
            raise NotImplementedError(
                f"method {rule!r} is defined for ViT image towers; ResNet towers support {', '.join(RESNET_RULES)}")
        return self._dense_resnet(pixels, rule, keys, normalize)

    def tokens_before_last_block(self, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """ViT: the tokens entering the last block, (B, 1 + h*w, width) with the class token first, and (h, w)."""
        return vit_tokens(self.visual, pixels, len(self.visual.transformer.resblocks) - 1)

    @torch.no_grad()
    def global_and_dense(self, pixels: torch.Tensor, rule: str = "raw") -> tuple[torch.Tensor, torch.Tensor]:
        """ViT: CLIP's image embedding (B, D), not normalised (the unmodified tower's class token through
        ``ln_post`` and ``proj``: ``encode_image`` at any input size, positional embeddings resized), and
        the dense features (B, D, h, w) of ``rule``, L2-normalised; the blocks before the last run once."""
        if self.kind != "vit":
            raise NotImplementedError("the image embedding together with dense tokens needs a ViT image tower")
        visual = self.visual
        x, grid = self.tokens_before_last_block(pixels)
        z = run_block(visual.transformer.resblocks[-1], x, getattr(visual.transformer, "batch_first", True))
        image = (visual.ln_post(z[:, 0]) @ visual.proj).float()
        if rule == "raw":
            f = F.normalize((visual.ln_post(z[:, 1:]) @ visual.proj).float(), dim=-1)
            return image, f.transpose(1, 2).reshape(x.shape[0], -1, *grid)
        return image, self._dense_vit(pixels, rule, None, tokens=(x, grid)).features

    def _dense_vit(self, pixels: torch.Tensor, rule: str, keys: str | None, normalize: bool = True,
                   tokens: tuple[torch.Tensor, tuple[int, int]] | None = None) -> DenseOutput:
        visual = self.visual
        x, grid = self.tokens_before_last_block(pixels) if tokens is None else tokens
        block = visual.transformer.resblocks[-1]
        attn: nn.MultiheadAttention = block.attn
        b, n, c = x.shape
        heads = attn.num_heads
        h = block.ln_1(x)
        if rule == "maskclip" and not hasattr(attn, "qkv"):
            # MaskCLIP reads only the values (and the keys for key smoothing): skip the query rows of
            # the projection (and the key rows without smoothing), 1-2 % of a whole-image forward
            w, bias = attn.in_proj_weight, attn.in_proj_bias
            rows = slice(c, 3 * c) if keys else slice(2 * c, 3 * c)
            kv = F.linear(h, w[rows], None if bias is None else bias[rows])
            q = None
            k, v = kv.chunk(2, dim=-1) if keys else (None, kv)
        else:
            qkv = attn.qkv(h) if hasattr(attn, "qkv") else F.linear(h, attn.in_proj_weight, attn.in_proj_bias)
            q, k, v = qkv.chunk(3, dim=-1)

        def split(t):  # (B, N, C) -> (B, heads, N, C/heads)
            return t.reshape(b, n, heads, c // heads).transpose(1, 2)

        def merge(t):
            return t.transpose(1, 2).reshape(b, n, c)

        if rule == "maskclip":
            z = x + block.ls_1(attn.out_proj(v))
            z = z + block.ls_2(block.mlp(block.ln_2(z)))
        else:
            qh, kh, vh = split(q), split(k), split(v)
            if rule == "raw":
                mixed = F.scaled_dot_product_attention(qh, kh, vh)
            elif rule == "sclip":
                mixed = F.scaled_dot_product_attention(qh, qh, vh) + F.scaled_dot_product_attention(kh, kh, vh)
            elif rule == "clearclip":
                mixed = F.scaled_dot_product_attention(qh, qh, vh)
            else:  # naclip
                bias = neighbourhood_bias(grid, device=x.device, dtype=qh.dtype)
                mixed = F.scaled_dot_product_attention(kh, kh, vh, attn_mask=bias)
            out = attn.out_proj(merge(mixed))
            if rule in ("raw", "sclip"):
                z = x + block.ls_1(out)
                z = z + block.ls_2(block.mlp(block.ln_2(z)))
            else:  # clearclip / naclip drop the residual and the MLP
                z = out
        f = visual.ln_post(z[:, 1:]) @ visual.proj
        f = F.normalize(f.float(), dim=-1) if normalize else f.float()
        features = f.transpose(1, 2).reshape(b, -1, *grid)
        if keys == "official":
            k = attn.out_proj(k)
        return DenseOutput(features, k[:, 1:].float() if keys else None)

    def _dense_resnet(self, pixels: torch.Tensor, rule: str, keys: str | None,
                      normalize: bool = True) -> DenseOutput:
        visual = self.visual
        x = visual.stem(pixels.to(visual.conv1.weight.dtype))
        x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))
        b, c, h, w = x.shape
        pool = visual.attnpool
        tokens = x.flatten(2).transpose(1, 2)  # (B, hw, C)
        if rule == "maskclip":
            f = pool.c_proj(pool.v_proj(tokens))
        else:  # raw: attention pooling with every location as a query (the mean token stays a key)
            seq = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
            seq = seq + _interpolate_grid_embedding(pool.positional_embedding, (h, w)).to(seq.dtype)
            heads = pool.num_heads
            q, k, v = (proj(seq).reshape(b, h * w + 1, heads, -1).transpose(1, 2)
                       for proj in (pool.q_proj, pool.k_proj, pool.v_proj))
            mixed = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, h * w + 1, -1)
            f = pool.c_proj(mixed)[:, 1:]
        f = F.normalize(f.float(), dim=-1) if normalize else f.float()
        features = f.transpose(1, 2).reshape(b, -1, h, w)
        return DenseOutput(features, pool.k_proj(tokens).float() if keys else None)
