"""``--precision int8``: dynamic int8 quantisation of a CLIP ViT image tower, for CPU inference.

Every Linear of the image tower runs as torch's dynamically quantised Linear (weights int8 per
tensor, activations quantised per call from their observed range, int32 accumulation; fbgemm/x86 or
qnnpack kernels). open_clip's attention keeps its q/k/v projection as one fused matrix inside
``nn.MultiheadAttention``, which dynamic quantisation does not touch, so each block's attention is
first rebuilt as :class:`Int8ReadySelfAttention` with that projection as an ordinary Linear (same
weights, same computation in float32); the attention itself (softmax(QK^T)V), the layer norms, the
positional embeddings and the final projection stay float32. The text tower is not quantised: text
embeddings are computed once and cached.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from torch import nn


class Int8ReadySelfAttention(nn.Module):
    """Self-attention with the same call signature and result as the ``nn.MultiheadAttention`` it
    replaces (``attn(x, x, x, need_weights=False, attn_mask=...)``), its projections plain Linears."""

    def __init__(self, attn: nn.MultiheadAttention):
        super().__init__()
        if attn.in_proj_weight is None or attn.bias_k is not None or attn.add_zero_attn:
            raise NotImplementedError("only open_clip's default self-attention (fused q/k/v projection) is supported")
        dim = attn.embed_dim
        self.num_heads, self.batch_first, self.embed_dim = attn.num_heads, attn.batch_first, dim
        self.qkv = nn.Linear(dim, 3 * dim, bias=attn.in_proj_bias is not None)
        self.out_proj = nn.Linear(dim, dim, bias=attn.out_proj.bias is not None)
        with torch.no_grad():
            self.qkv.weight.copy_(attn.in_proj_weight)
            if attn.in_proj_bias is not None:
                self.qkv.bias.copy_(attn.in_proj_bias)
            self.out_proj.weight.copy_(attn.out_proj.weight)
            if attn.out_proj.bias is not None:
                self.out_proj.bias.copy_(attn.out_proj.bias)

    def forward(self, query, key=None, value=None, need_weights: bool = False, attn_mask=None):
        x = query if self.batch_first else query.transpose(0, 1)
        b, n, c = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = self.out_proj(out.transpose(1, 2).reshape(b, n, c))
        return (out if self.batch_first else out.transpose(0, 1)), None


def quantize_image_tower(visual: nn.Module) -> nn.Module:
    """An int8 copy of an open_clip ViT image tower (the original is left untouched)."""
    if not (hasattr(visual, "conv1") and hasattr(visual, "transformer")):
        raise NotImplementedError(f"int8 inference supports ViT image towers, not {type(visual).__name__} "
                                  "(use --precision fp32)")
    engines = torch.backends.quantized.supported_engines
    if not any(e in engines for e in ("x86", "fbgemm", "qnnpack")):
        raise RuntimeError(f"this torch build has no int8 CPU kernels (engines: {engines}); use --precision fp32")
    tower = copy.deepcopy(visual).float().eval()
    for block in tower.transformer.resblocks:
        if not isinstance(block.attn, nn.MultiheadAttention):
            raise NotImplementedError("only open_clip's default residual blocks can be quantised")
        block.attn = Int8ReadySelfAttention(block.attn)
    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(tower, {nn.Linear}, dtype=torch.qint8, inplace=True)
