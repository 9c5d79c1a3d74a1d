"""``--precision int8``: dynamic int8 quantisation of a CLIP ViT image tower, for CPU inference.

Every Linear of the image tower runs as torch's dynamically quantised Linear (weights int8 per
tensor, activations quantised per call from their observed range, int32 accumulation). The weights
are packed for one of torch's int8 engines (:func:`int8_engine`): oneDNN on CPUs with AMX int8
tiles, on which it runs the int8 matrix products, torch's default (x86) elsewhere. open_clip's
attention keeps its q/k/v projection as one fused matrix inside
``nn.MultiheadAttention``, which dynamic quantisation does not touch, so each block's attention is
first rebuilt as :class:`Int8ReadySelfAttention` with that projection as an ordinary Linear (same
weights, same computation in float32); the attention itself (softmax(QK^T)V), the layer norms, the
positional embeddings and the final projection stay float32. The text tower is not quantised: text
embeddings are computed once and cached.
"""

from __future__ import annotations

import copy
import os
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


def int8_engine() -> str:
    """The int8 engine to pack the weights for: ``onednn`` where the CPU has AMX int8 tiles (on a 2-core
    Sapphire Rapids host the tower ran 3.3x fp32 with it, 2.0x with ``x86`` or ``fbgemm``), else torch's
    current engine (``x86`` by default; oneDNN without AMX was no faster on the AVX-512 host).
    The environment variable ``VOCASEG_INT8_ENGINE`` names one instead (to compare engines)."""
    engines = torch.backends.quantized.supported_engines
    chosen = os.environ.get("VOCASEG_INT8_ENGINE")
    if chosen:
        if chosen not in engines:
            raise ValueError(f"VOCASEG_INT8_ENGINE={chosen}: this torch build's int8 engines are {', '.join(engines)}")
        return chosen
    amx_int8 = getattr(torch.cpu, "get_capabilities", dict)().get("amx_int8", False)
    if amx_int8 and "onednn" in engines:
        return "onednn"
    return torch.backends.quantized.engine


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

        # the engine matters when the weights are packed (the packed weights carry their kernels), so it
        # is set only for the packing and the user's global setting is left as it was
        before = torch.backends.quantized.engine
        torch.backends.quantized.engine = int8_engine()
        try:
            return quantize_dynamic(tower, {nn.Linear}, dtype=torch.qint8, inplace=True)
        finally:
            torch.backends.quantized.engine = before
