"""Image-tower variants vocaseg builds on top of open_clip's modules (used by the toy CLIP).

``LateClassTokenViT`` is open_clip's ``VisionTransformer`` with one change: the class token joins
the sequence only before block ``class_token_block`` (CaiT's "class attention" idea) instead of
before block 0. Blocks before it see patch tokens only. With the class token joining before the
last block, the image embedding is a readout of that block's attention over the patches' values,
and the patch outputs of the last block are never trained — the situation MaskCLIP relies on in
a real CLIP, which a small CLIP trained briefly with a class token from block 0 does not reach
(README, "The toy CLIP").

The parameters and their names are exactly those of the open_clip tower (the class token keeps
its positional embedding, row 0), so state dicts move between the two unchanged. The variant is
declared in a model folder's ``open_clip_config.json`` under a top-level ``"vocaseg"`` key, which
open_clip itself ignores::

    "vocaseg": {"class_token_block": 5}
"""

from __future__ import annotations

import torch
from open_clip.transformer import VisionTransformer

from .backbone import vit_tokens

CONFIG_KEY = "vocaseg"


class LateClassTokenViT(VisionTransformer):
    """A ViT whose class token joins before block ``class_token_block`` (0 = open_clip's own tower)."""

    class_token_block: int = 0

    @classmethod
    def convert(cls, visual: VisionTransformer, class_token_block: int) -> "LateClassTokenViT":
        """Turn a built open_clip ViT into this variant in place (same modules, same weights)."""
        if not isinstance(visual, VisionTransformer):
            raise TypeError(f"a late class token needs an open_clip VisionTransformer, not {type(visual).__name__}")
        layers = len(visual.transformer.resblocks)
        if not 0 <= class_token_block < layers:
            raise ValueError(f"class_token_block must be in [0, {layers - 1}] for a {layers}-block tower, "
                             f"got {class_token_block}")
        if visual.attn_pool is not None or visual.pool_type != "tok" or visual.final_ln_after_pool:
            raise ValueError("a late class token needs class-token pooling (pool_type 'tok', no attentional pool)")
        if not isinstance(visual.patch_dropout, torch.nn.Identity):
            raise ValueError("patch dropout is not supported with a late class token")
        visual.__class__ = cls
        visual.class_token_block = class_token_block
        return visual

    def forward(self, x: torch.Tensor):
        x, _ = vit_tokens(self, x, len(self.transformer.resblocks))
        pooled, tokens = self._pool(x)
        if self.proj is not None:
            pooled = pooled @ self.proj
        return (pooled, tokens) if self.output_tokens else pooled

    def forward_intermediates(self, *args, **kwargs):
        raise NotImplementedError("forward_intermediates is not defined for a late class token tower")


def apply_tower_config(model: torch.nn.Module, config: dict) -> torch.nn.Module:
    """Apply a model folder's ``"vocaseg"`` tower options (see module docstring) to a built model."""
    options = dict(config.get(CONFIG_KEY) or {})
    block = options.pop("class_token_block", 0)
    if options:
        raise ValueError(f"unknown {CONFIG_KEY!r} options in open_clip_config.json: {', '.join(options)}")
    if block:
        LateClassTokenViT.convert(model.visual, int(block))
    return model
