"""CLIP-RC (Zhang et al., "Exploring Regional Clues in CLIP for Zero-Shot Semantic Segmentation", CVPR 2024).

Zero-shot segmentation trained with pixel labels of the *seen* classes only, on a frozen CLIP ViT.
Read top to bottom:

1. **Deep visual prompts** (VPT-deep, inherited from ZegCLIP): K learnable tokens enter every block of
   the frozen image tower after ``ln_pre``, each block's K outputs replaced by the next block's own
   prompts; all pass one shared trainable Linear and dropout.
2. **Region-level bridge (RLB)**: M frozen tokens, each a copy of the class token, join the sequence
   where the class token joins (block 0 in open_clip's towers, later in vocaseg's toy tower). An
   attention mask confines region token r to the patches of cell r of a sqrt(M) x sqrt(M) grid and
   itself; those patches also see it (the official code's two-way link); the class token, prompts
   and patches never see the other region tokens. Each region token becomes a class token of its
   region. (:func:`rlb_attention_mask`; ``region_block`` moves the join earlier, a toy ablation: the
   toy's class token joins only before its last block, so its region tokens see one attention step)
3. **Region alignment (RAM)**: per region m and class c the *relationship descriptor*
   ``[T_c * (R_m + G), T_c]`` (T: frozen text embedding, G: the class token, R_m: region token m),
   projected to the decoder width, is a class query; the image tokens are ``Linear([up(R), G, I])``.
4. **Decoder**: layers of two cross-attention steps in parallel, queries attending to image tokens
   and image tokens to queries (post-norm, no self-attention); masks are the dot products of the
   final queries and image tokens, averaged over the M regions.
5. **Recovery decoder** (training only): one more parallel layer maps the decoder's outputs back to
   the descriptors and the CLIP patch features; its L1 loss keeps the head from forgetting CLIP's
   space while it fits the seen classes.
6. **Loss**: per-class sigmoid, focal (alpha 0.25, gamma 2) x100 + dice x1 + recovery x2 (VOC's
   official weights); ignored and unseen pixels are negatives for every class (official).
7. **Inference**: sigmoid scores; inductive runs subtract 0.1 from the classes they were trained on
   (the seen classes) so unseen ones can win.

Settings: ``inductive`` (seen classes only, unseen pixels negatives), ``transductive`` (starts from an
inductive run's weights, all class names, and the model's own online argmax over the unseen classes
written at the ground-truth-unseen pixels, as the official code), ``supervised`` (every class
labelled: the upper bound).

Where vocaseg departs from the official code (github.com/uyzhang/CLIP-RC @68927c1), and why: pixels
are normalised with the CLIP's own statistics (official: ImageNet's); the class token is added once,
as open_clip does (official: twice, a ZegCLIP quirk); positional embeddings are resized bicubically
(official: bilinearly, at load time); the region partition is computed for each input's grid
(``floor(i * grid / sqrt(M))`` boundaries, equal to the official one for 512 px windows), so any
window or whole image works; the transductive run starts from the inductive run's final weights
(official: its half-schedule checkpoint); the N_m normaliser of the losses is per process (official:
averaged over GPUs). The head keeps PyTorch's default initialisation, which is what the official
training ran (its ``init_weights`` is never called). The toy's inductive preset trains at lr 1e-3, not
the papers' 2e-4, which is sized for 40k steps and undertrains the head over the toy's 2000.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import CLIPBackbone, vit_embed
from ..data.datasets import IGNORE_INDEX
from ..dense import Classifier, DenseModel, full_precision, trained_mask
from ..inference import Segmenter
from ..loading import load_clip
from ..runs import RunError, clip_identity, find_run, read_run_info, training_record, vocaseg_command, write_run
from ..training.augment import MMSEG_VOC_COCO, AugmentConfig, JointAugment
from ..training.loop import SegDatasetRecipe, RunFields, poly_config, train, unwrap
from ..training.stream import TrainStream
from ..vocabulary import Vocabulary
from . import config_from, register_method
from .maskclip_plus import UNLABELED, fill_pseudo_labels

SETTINGS = ("inductive", "transductive", "supervised")
FUSE = ("both", "cls", "rlb", "none")
DENSE_RULES = ("raw", "maskclip")
LOSSES = ("focal_dice", "ce")


# ---------------------------------------------------------------------------- the region-level bridge
def region_index(grid: tuple[int, int], side: int, device=None) -> torch.Tensor:
    """(h*w,) the region of each patch (row-major) on a side x side partition of the grid."""
    h, w = grid
    rows = torch.arange(h, device=device) * side // h
    cols = torch.arange(w, device=device) * side // w
    return (rows[:, None] * side + cols[None, :]).flatten()


def rlb_attention_mask(grid: tuple[int, int], side: int, n_prompts: int, device=None) -> torch.Tensor:
    """The additive (E, E) mask of the sequence [class token, K prompts, h*w patches, side^2 region
    tokens]: 0 where attention is allowed, -inf where it is blocked (see the module docstring, 2)."""
    regions = region_index(grid, side, device)
    n, m = len(regions), side * side
    first = 1 + n_prompts  # the first patch
    e = first + n + m
    allowed = torch.zeros(e, e, dtype=torch.bool, device=device)
    allowed[:first + n, :first + n] = True  # class token, prompts and patches see each other
    own = F.one_hot(regions, m).bool()  # (n, m): patch p lies in region r
    allowed[first:first + n, first + n:] = own  # a patch sees its region's token ...
    allowed[first + n:, first:first + n] = own.T  # ... and the token its patches
    allowed[first + n:, first + n:] = torch.eye(m, dtype=torch.bool, device=device)  # and itself
    return torch.zeros(e, e, device=device).masked_fill(~allowed, float("-inf"))


def _run_block(block: nn.Module, x: torch.Tensor, mask: torch.Tensor | None, value_rows: slice | None) -> torch.Tensor:
    """One open_clip residual block on (B, E, W) tokens under an additive mask. ``value_rows``: these
    tokens take MaskCLIP's value path (their own value, no attention) instead of attending."""
    attn = block.attn
    b, e, c = x.shape
    heads = attn.num_heads
    q, k, v = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(b, e, heads, c // heads).transpose(1, 2) for t in (q, k, v))
    mixed = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask.to(q.dtype))
    if value_rows is not None:
        idx = torch.arange(e, device=x.device)
        keep = ((idx >= value_rows.start) & (idx < value_rows.stop)).view(1, 1, e, 1)
        mixed = torch.where(keep, v, mixed)
    x = x + block.ls_1(attn.out_proj(mixed.transpose(1, 2).reshape(b, e, c)))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


class PromptedEncoder(nn.Module):
    """The trainable parts of the image encoder: deep visual prompts, their shared projection, and the
    ``prompt_norm`` applied before the frozen ``ln_post``. The frozen tower is passed in at forward."""

    def __init__(self, width: int, layers: int, patch: int, n_prompts: int = 10, deep: bool = True,
                 dropout: float = 0.1):
        super().__init__()
        self.n_prompts = n_prompts
        bound = math.sqrt(6.0 / (3 * patch * patch + width))  # VPT's uniform init (official)
        self.shallow = nn.Parameter(torch.empty(1, n_prompts, width).uniform_(-bound, bound))
        deep_count = layers - 1 if deep else 0
        self.deep = nn.Parameter(torch.empty(deep_count, n_prompts, width).uniform_(-bound, bound)) if deep_count \
            else None
        self.prompt_proj = nn.Linear(width, width)
        nn.init.kaiming_normal_(self.prompt_proj.weight, mode="fan_out")
        nn.init.zeros_(self.prompt_proj.bias)
        self.prompt_dropout = nn.Dropout(dropout)
        self.prompt_norm = nn.LayerNorm(width, eps=1e-6)

    def prompts(self, block: int, batch: int) -> torch.Tensor:
        source = self.shallow[0] if block == 0 else self.deep[block - 1]
        return self.prompt_dropout(self.prompt_proj(source)).expand(batch, -1, -1)

    def forward(self, visual: nn.Module, pixels: torch.Tensor, regions: int, dense_rule: str = "raw",
                region_block: int | None = None):
        """Normalised pixels (B, 3, H, W) -> G (B, D), I (B, D, h, w), R (B, D, s, s) or None; each
        L2-normalised over D. ``regions``: M region tokens (a square number; 0: no bridge).
        ``region_block``: the block the region tokens join before (None: where the class token joins,
        the paper's rule; an ablation on the toy, whose class token joins late)."""
        x, cls, grid = vit_embed(visual, pixels)
        b, n = x.shape[0], x.shape[1]
        k = self.n_prompts
        side = math.isqrt(regions)
        joins = getattr(visual, "class_token_block", 0)
        region_joins = joins if region_block is None else region_block
        blocks = visual.transformer.resblocks
        if not 0 <= region_joins < len(blocks):
            raise ValueError(f"region tokens cannot join before block {region_joins}: the tower has "
                             f"{len(blocks)} blocks (0 to {len(blocks) - 1})")
        mask = rlb_attention_mask(grid, side, k, x.device) if regions else None
        seq = torch.cat([self.prompts(0, b), x], 1)  # [P, I] until the class token joins
        joined = regions_in = False
        for i, block in enumerate(blocks):
            offset = 1 if joined else 0
            if i > 0 and self.deep is not None:  # the last block's prompt outputs are dropped for new ones
                seq = torch.cat([seq[:, :offset], self.prompts(i, b), seq[:, offset + k:]], 1)
            if i == joins:  # class token first, region tokens last, both ln_pre(e_cls + pos_0)
                seq = torch.cat([cls, seq], 1)
                joined = True
            if i == region_joins and regions:
                seq = torch.cat([seq, cls.expand(b, regions, -1)], 1)
                regions_in = True
            # before the class token joins, its row and column of the mask are not there
            block_mask = (mask if joined else mask[1:, 1:]) if regions_in else None
            last = i == len(blocks) - 1
            value_rows = slice(1 + k, 1 + k + n) if last and dense_rule == "maskclip" else None
            seq = _run_block(block, seq, block_mask, value_rows)
        main = self.prompt_norm(seq[:, :1 + k + n])  # every token but the region tokens
        tokens = torch.cat([main, seq[:, 1 + k + n:]], 1)
        out = F.normalize(visual.ln_post(tokens) @ visual.proj, dim=-1)
        g = out[:, 0]
        i_feat = out[:, 1 + k:1 + k + n].transpose(1, 2).reshape(b, -1, *grid)
        r = out[:, 1 + k + n:].transpose(1, 2).reshape(b, -1, side, side) if regions else None
        return g, i_feat, r


# ---------------------------------------------------------------------------- the decoder
class CrossStep(nn.Module):
    """a <- LN(a + drop(CrossAttn(a -> b))); a <- LN(a + drop(FFN(a))): post-norm, no self-attention."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(ffn, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a = self.norm1(a + self.drop(self.attn(a, b, b, need_weights=False)[0]))
        return self.norm2(a + self.drop(self.ffn(a)))


class ParallelLayer(nn.Module):
    """Queries and image tokens updated in parallel, each attending to the other's previous state."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.query_step, self.image_step = CrossStep(dim, heads, ffn, dropout), CrossStep(dim, heads, ffn, dropout)

    def forward(self, q: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.query_step(q, image), self.image_step(image, q)


class RegionDecoder(nn.Module):
    """RAM (descriptors and fused image tokens), the decoder, and the training-only recovery decoder."""

    def __init__(self, dim: int, layers: int = 3, heads: int = 8, ffn: int = 2048, dropout: float = 0.1,
                 fuse: str = "both", recovery_layers: int = 1, patch_context: int = 0):
        super().__init__()
        self.fuse = fuse
        self.query_in = nn.Linear(2 * dim, dim)
        self.image_in = nn.Linear(3 * dim, dim)
        # not the paper's (a toy diagnostic): 3x3 convolutions over the image tokens, residual, so a
        # patch's score can see its neighbours; the paper's decoder never mixes the patch tokens
        context = []
        for i in range(patch_context):
            context += [nn.GELU()] if i else []
            context.append(nn.Conv2d(dim, dim, 3, padding=1))
        self.context = nn.Sequential(*context) if context else None
        self.layers = nn.ModuleList(ParallelLayer(dim, heads, ffn, dropout) for _ in range(layers))
        if recovery_layers:
            self.recover_query_in, self.recover_image_in = nn.Linear(dim, dim), nn.Linear(dim, dim)
            self.recovery = nn.ModuleList(ParallelLayer(dim, heads, ffn, dropout) for _ in range(recovery_layers))
            self.recover_query_out, self.recover_image_out = nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        else:
            self.recovery = None

    @staticmethod
    def descriptors(text: torch.Tensor, g: torch.Tensor, r: torch.Tensor | None) -> torch.Tensor:
        """[T_c * (R_m + G), T_c] for every region m and class c: (B, M*C, 2D), index m*C + c. Without
        region tokens M = 1 and R = 0: ZegCLIP's [T * G, T]."""
        b, d = g.shape
        regional = g[:, None] if r is None else r.flatten(2).transpose(1, 2) + g[:, None]  # (B, M, D)
        m, c = regional.shape[1], text.shape[0]
        mixed = text[None, None] * regional[:, :, None]  # (B, M, C, D)
        return torch.cat([mixed, text[None, None].expand(b, m, c, d)], -1).reshape(b, m * c, 2 * d)

    def image_tokens(self, g: torch.Tensor, image: torch.Tensor, r: torch.Tensor | None) -> torch.Tensor:
        """Linear([up(R), G, I]) per patch (the official order); a part the fusion leaves out is zero."""
        b, d, h, w = image.shape
        regions = torch.zeros_like(image) if r is None or self.fuse in ("cls", "none") else \
            F.interpolate(r, size=(h, w), mode="bilinear", align_corners=False)
        glob = g[:, :, None, None].expand(b, d, h, w) * (0.0 if self.fuse in ("rlb", "none") else 1.0)
        return self.image_in(torch.cat([regions, glob, image], 1).flatten(2).transpose(1, 2))

    def forward(self, text: torch.Tensor, g: torch.Tensor, image: torch.Tensor, r: torch.Tensor | None,
                recover: bool = False):
        """text (C, D), g (B, D), image (B, D, h, w), r (B, D, s, s) -> mask logits (B, C, h, w), and
        with ``recover`` the recovery loss (else None)."""
        b, d, h, w = image.shape
        c = text.shape[0]
        described = self.descriptors(text, g, r)
        q, tokens = self.query_in(described), self.image_tokens(g, image, r)
        if self.context is not None:
            grid = tokens.transpose(1, 2).reshape(b, -1, h, w)
            tokens = tokens + self.context(grid).flatten(2).transpose(1, 2)
        for layer in self.layers:
            q, tokens = layer(q, tokens)
        m = q.shape[1] // c
        logits = torch.einsum("bmcd,bnd->bcn", q.reshape(b, m, c, -1), tokens) / m
        logits = logits.reshape(b, c, h, w)
        if not recover or self.recovery is None:
            return logits, None
        rq, rt = self.recover_query_in(q), self.recover_image_in(tokens)
        for layer in self.recovery:
            rq, rt = layer(rq, rt)
        target_image = image.flatten(2).transpose(1, 2)
        loss = (F.l1_loss(self.recover_query_out(rq), described.detach())
                + F.l1_loss(self.recover_image_out(rt), target_image.detach()))
        return logits, loss


# ---------------------------------------------------------------------------- the loss
def focal_dice_loss(logits: torch.Tensor, labels: torch.Tensor, alpha: float = 0.25,
                    gamma: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The non-mutually-exclusive loss: logits (B, C, H, W), labels (B, H, W) with classes 0..C-1 and
    anything else (255, unseen) a negative for every class. Returns (focal, dice), each divided by
    N_m, the number of (image, present class) pairs (at least 1): focal summed over all B*C maps of
    their per-pixel mean, dice summed over the present pairs (with +1 smoothing). The focal term is
    torchvision's ``sigmoid_focal_loss`` written with one boolean mask instead of float targets (the
    same numbers, half the time and memory on these B x C x H x W maps)."""
    c = logits.shape[1]
    target = labels[:, None] == torch.arange(c, device=labels.device).view(1, -1, 1, 1)  # (B, C, H, W)
    x = logits.float()
    p = x.sigmoid()
    # -alpha_t (1 - p_t)^gamma log(p_t), p_t the probability given to the true side
    log_pt = -F.softplus(torch.where(target, -x, x))
    focal_map = torch.where(target, alpha, 1 - alpha) * torch.where(target, 1 - p, p).pow(gamma) * -log_pt
    present = target.flatten(2).any(-1)  # (B, C)
    n = present.sum().clamp_min(1).float()
    focal = focal_map.mean((2, 3)).sum() / n
    pf, yf = p.flatten(2), target.flatten(2).float()
    dice = 1 - (2 * (pf * yf).sum(-1) + 1) / (pf.sum(-1) + yf.sum(-1) + 1)
    return focal, (dice * present).sum() / n


# ---------------------------------------------------------------------------- the trained model
@register_method("clip-rc", "CLIP-RC: deep prompts, region-level bridge tokens and a decoder on a frozen CLIP ViT "
                            "(zero-shot from seen-class labels)")
class ClipRcModel(DenseModel):
    """Prompts and head trained; the frozen CLIP is attached, not stored (run folders hold what was trained)."""

    logit_scale = 10.0  # scores are sigmoid probabilities; softmax(10 s) only orders them for thresholds

    def __init__(self, clip: nn.Module, mean, std, arch: dict):
        super().__init__()
        object.__setattr__(self, "clip", clip)  # not a submodule: not in the state dict
        visual = clip.visual
        backbone = CLIPBackbone(clip)
        if backbone.kind != "vit":
            raise ValueError("CLIP-RC needs a ViT image tower (its prompts and region tokens are tokens)")
        side = math.isqrt(arch["regions"])
        if arch["regions"] and side * side != arch["regions"]:
            raise ValueError(f"regions must be a square number (a side x side grid), not {arch['regions']}")
        self.arch = dict(arch)
        self.stride, self.image_size, self.embed_dim = backbone.stride, arch["crop"], backbone.embed_dim
        self.pad_value = tuple(float(m) for m in mean)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        width = visual.conv1.out_channels
        self.encoder = PromptedEncoder(width, len(visual.transformer.resblocks), backbone.stride,
                                       arch["n_prompts"], arch["deep_prompts"], arch["dropout"])
        dim = self.embed_dim
        self.decoder = RegionDecoder(dim, arch["decoder_layers"], arch["decoder_heads"], arch["decoder_ffn"],
                                     arch["dropout"], arch["fuse"], arch["recovery_layers"],
                                     arch.get("patch_context", 0))
        self.trained_classes = list(arch["trained_classes"])
        self.calibration = float(arch["calibration"])

    @classmethod
    def from_run(cls, info: dict, loaded) -> "ClipRcModel":
        return cls(loaded.model, loaded.mean, loaded.std, info["model"])

    def classifier(self, vocab: Vocabulary, encode_text) -> Classifier:
        """One text embedding per class (its names' embeddings averaged, renormalised: the decoder
        takes one query per class); ``extra["seen"]``: the classes this run was trained on."""
        clf = super().classifier(vocab, encode_text)
        c, device = len(vocab), clf.weights.device
        return Classifier(clf.class_embeddings(), torch.arange(c, device=device), c,
                          extra={"seen": trained_mask(vocab, self.trained_classes, device)})

    def encode(self, pixels: torch.Tensor):
        """RGB [0, 1] (B, 3, H, W) -> the prompted tower's G, I and R (see :class:`PromptedEncoder`)."""
        return self.encoder(self.clip.visual, (pixels - self.mean) / self.std, self.arch["regions"],
                            self.arch["dense_rule"], self.arch.get("region_block"))

    def forward(self, pixels: torch.Tensor, text: torch.Tensor, recover: bool = False):
        """RGB [0, 1] (B, 3, H, W), text (C, D) -> mask logits (B, C, H/stride, W/stride), recovery loss."""
        g, image, r = self.encode(pixels)
        return self.decoder(text.to(g.dtype), g, image, r, recover=recover)

    supports_ensemble = True  # Segmenter(ensemble=BETA) / --ensemble: see logits()
    ensemble_scale = 50.0  # softmax temperature of the cosine branch (toy val: 50 over 25; FC-CLIP: CLIP's 100)

    @torch.no_grad()
    def logits(self, pixels: torch.Tensor, classifier: Classifier, calibration: float | None = None,
               ensemble: float = 0.0) -> torch.Tensor:
        """Sigmoid scores, the seen ones lowered by the calibration (the paper's inference). With
        ``ensemble`` beta > 0 (not in the paper): FC-CLIP's geometric ensemble (Yu et al., NeurIPS
        2023) of the head with the prompted tower's own patch features scored by cosine against the
        text (MaskCLIP's rule, free: they are the decoder's input I). Per pixel, the calibrated head
        scores normalised over classes, p_head, and softmax(scale * cos), p_clip, give
        log p_head^(1 - w) p_clip^w, w = beta for the classes the run was not trained on and 0 for its
        own (their head scores are the better ones). Why: the head, fitted to the seen text
        embeddings, maps an unseen class near its nearest seen one (tools/clip_rc_diagnostics.py);
        cosine keeps them apart. Returns log-probabilities then."""
        return self.scores(self.encode(pixels), classifier, calibration, ensemble)

    @torch.no_grad()
    def scores(self, encoded: tuple, classifier: Classifier, calibration: float | None = None,
               ensemble: float = 0.0) -> torch.Tensor:
        """:meth:`logits` from the tower's output ``encoded = self.encode(pixels)``, so one tower pass
        can serve several inference rules (tools/clip_rc_diagnostics.py)."""
        calibration = self.calibration if calibration is None else calibration
        g, image, r = encoded
        logits, _ = self.decoder(classifier.weights.to(g.dtype), g, image, r)
        with full_precision(g.device):
            seen = classifier.extra["seen"].float().view(1, -1, 1, 1)
            # inductive calibration: the seen classes' scores are lowered so unseen ones can win
            scores = logits.float().sigmoid() - calibration * seen
            if not ensemble:
                return scores
            head = scores.clamp_min(1e-4)
            head = head / head.sum(1, keepdim=True)
            cosine = torch.einsum("bdhw,cd->bchw", image.float(), classifier.weights.float())
            clip = (self.ensemble_scale * cosine).log_softmax(1)
            w = ensemble * (1 - seen)
            return (1 - w) * head.log() + w * clip


# ---------------------------------------------------------------------------- configuration
@dataclass
class ClipRcConfig(RunFields):
    """Everything a CLIP-RC run depends on (recorded in its method.json). Defaults: the toy recipe."""

    out: str
    setting: str = "inductive"
    init: str | None = None  # transductive: the inductive run to start from
    model: str = "toy"
    pretrained: str | None = "default"
    dataset: str = "synth"
    data_root: str | None = None
    train_split: str = "train"
    split_set: str | None = "synth_zs"
    templates: str = "maskclip85"
    # architecture
    n_prompts: int = 10
    deep_prompts: bool = True
    regions: int = 16  # M region tokens (0: no bridge; ZegCLIP-like)
    region_block: int | None = None  # the block region tokens join before (None: the class token's block)
    fuse: str = "both"  # which of the region and global tokens join the image tokens (Table 7)
    recovery_layers: int = 1  # 0: no recovery decoder
    patch_context: int = 0  # 3x3 conv layers over the decoder's image tokens (not the paper's: a toy diagnostic)
    decoder_layers: int = 3
    decoder_heads: int = 8
    decoder_ffn: int = 2048
    dropout: float = 0.1
    dense_rule: str = "raw"  # the last block's patch tokens: raw (official) or maskclip (value path)
    calibration: float | None = None  # subtracted from seen scores; None: 0.1 inductive, 0 otherwise
    # loss: the paper's per-class sigmoid focal + dice, or (a diagnostic) softmax cross-entropy over the
    # trained classes with unseen and ignored pixels ignored, the loss of the probes and of DeepLab
    loss: str = "focal_dice"
    focal_weight: float = 100.0
    dice_weight: float = 1.0
    recovery_weight: float = 2.0
    # schedule
    augment: str = "synth"
    crop: int = 96
    steps: int = 2000
    batch_size: int = 16
    lr: float = 2e-4
    weight_decay: float = 0.01
    warmup: int = 150
    min_lr: float = 1e-6
    poly_power: float = 0.9

    def __post_init__(self):
        checks = (("setting", SETTINGS), ("fuse", FUSE), ("dense_rule", DENSE_RULES), ("augment", tuple(AUGMENTS)),
                  ("loss", LOSSES))
        for name, allowed in checks:
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        if self.setting in ("inductive", "transductive") and not self.split_set:
            raise ValueError(f"the {self.setting} setting needs a zero-shot split: --split-set NAME (e.g. synth_zs)")
        if self.setting == "transductive" and not self.init:
            raise ValueError("the transductive setting starts from an inductive run: --init RUN "
                             "(train one with --setting inductive first)")
        if self.regions < 0 or math.isqrt(self.regions) ** 2 != self.regions:
            raise ValueError(f"regions must be a square number (1, 4, 16, ...) or 0, not {self.regions}")
        if self.calibration is None:
            self.calibration = 0.1 if self.setting == "inductive" else 0.0


AUGMENTS = {
    # the synthetic world: short side 96 x U(0.75, 1.5), 96 crops; no photometric distortion (colour
    # is a class cue here); cat_max_ratio 0.75 as the official pipeline
    "synth": AugmentConfig(crop=96, base_size=96, ratio_range=(0.75, 1.5), cat_max_ratio=0.75, flip=0.5,
                           photometric="none"),
    "mmseg": MMSEG_VOC_COCO,  # resize toward (2048, 512) x [0.5, 2], 512 crops, cat_max_ratio 0.75, photometric
}
# a toy diagnostic: the synth recipe without the random rescale (the toy CLIP was pretrained at one
# scale, and loses its alignment off it)
AUGMENTS["synth_noscale"] = replace(AUGMENTS["synth"], ratio_range=(1.0, 1.0))

# Presets: the papers' schedules (shared/specs/clip_rc.md, Sec. 3). AdamW at an effective 2e-4 (the
# official 2e-5 x10 on every trained tensor), wd 0.01, linear warm-up then poly 0.9 to 1e-6; batch 16.
_REAL = dict(model="ViT-B-16", pretrained="openai", augment="mmseg", crop=512, batch_size=16, lr=2e-4,
             weight_decay=0.01, warmup=1500, min_lr=1e-6, decoder_heads=8, decoder_ffn=2048, dense_rule="raw")
PRESETS: dict[str, dict] = {
    # the toy: 6-block tower, width 128 (decoder 4 heads, FFN 512); the value path for the patch
    # tokens, since the toy's raw last-block patch outputs were never trained (MaskCLIP 36.7 vs raw 11.6).
    # CPU-sized: 2000 steps (1.5 s a step on the 2-core CPU) and 1000 transductive ones. The inductive
    # stage trains at 1e-3, 5x the papers' rate, which is sized for 40k steps: over 2000 it undertrains
    # the head (3 seeds: val hIoU 36.0 +- 7.0 at 1e-3 against 26.8 +- 13.9 at 2e-4; README, CLIP-RC)
    "synth": dict(dataset="synth", split_set="synth_zs", setting="inductive", model="toy", crop=96, steps=2000,
                  batch_size=16, lr=1e-3, warmup=150, decoder_heads=4, decoder_ffn=512, dense_rule="maskclip"),
    "synth_trans": dict(dataset="synth", split_set="synth_zs", setting="transductive", model="toy", crop=96,
                        steps=1000, batch_size=16, lr=2e-4, warmup=150, decoder_heads=4, decoder_ffn=512,
                        dense_rule="maskclip"),
    # VOC 15/5 (20 classes, background ignored): K = 10, weights 100 / 1 / 2, 40k; transductive 20k
    "voc_zs3": dict(_REAL, dataset="voc20", train_split="trainaug", split_set="voc_zs3", templates="photo",
                    steps=40000),
    "voc_zs3_trans": dict(_REAL, dataset="voc20", train_split="trainaug", split_set="voc_zs3", templates="photo",
                          setting="transductive", steps=20000),
    # Pascal Context 50 / 10, background a seen class; K and the weights are VOC's (no official config)
    "context_zs3": dict(_REAL, dataset="context60", train_split="train", split_set="context_zs3",
                        templates="photo", steps=40000),
    "context_zs3_trans": dict(_REAL, dataset="context60", train_split="train", split_set="context_zs3",
                              templates="photo", setting="transductive", steps=20000),
    # COCO-Stuff 156 / 15: K = 100, weights 200 / 3 / 50, 80k; transductive 40k (the official 15
    # templates are not published outside a notebook: MaskCLIP's 85 stand in)
    "coco_stuff_zs3": dict(_REAL, dataset="coco_stuff171", train_split="train", split_set="coco_stuff_zs3",
                           n_prompts=100, focal_weight=200.0, dice_weight=3.0, recovery_weight=50.0, steps=80000),
    "coco_stuff_zs3_trans": dict(_REAL, dataset="coco_stuff171", train_split="train", split_set="coco_stuff_zs3",
                                 n_prompts=100, focal_weight=200.0, dice_weight=3.0, recovery_weight=50.0,
                                 setting="transductive", steps=40000),
}
# The official test: keep-ratio resize to short side 512, 512 windows every 426 px
_SLIDE = dict(mode="slide", short_side=512, window=512, stride=426)
PRESET_INFERENCE = {name: (dict(mode="whole", short_side=96) if name.startswith("synth") else _SLIDE)
                    for name in PRESETS}


def make_config(preset: str | None = None, **overrides) -> ClipRcConfig:
    """Defaults <- the preset's values <- ``overrides`` (None values in overrides are skipped)."""
    return config_from(ClipRcConfig, PRESETS, preset, overrides, "CLIP-RC")


# ---------------------------------------------------------------------------- the recipe
class ClipRcRecipe(SegDatasetRecipe):
    method = "clip-rc"

    def __init__(self, cfg: ClipRcConfig):
        self.cfg, self.device = cfg, torch.device(cfg.device)
        # data first: a wrong data root or split fails before any weights are loaded
        self.train_data = self._dataset(cfg.train_split)
        self.vocab = self.train_data.vocabulary
        self._zero_shot_split()
        # the classes the model is trained on: the seen ones (inductive), or all of them
        self.classes = self.seen.clone() if cfg.setting == "inductive" else self.seen | self.unseen
        self.init_info = None
        if cfg.init:
            self.init_path = find_run(cfg.init)
            if self.init_path is None:
                raise RunError(f"--init {cfg.init}: no run folder there (train one with --setting inductive)")
            self.init_info = read_run_info(self.init_path)
            if self.init_info.get("method") != self.method:
                raise RunError(f"--init {self.init_path} is a {self.init_info.get('method')} run, not a CLIP-RC run")
        pretrained = None if str(cfg.pretrained).lower() == "none" else cfg.pretrained
        if self.init_info is not None:  # the CLIP the inductive run was trained on
            from ..runs import _load_run_clip

            loaded = _load_run_clip(self.init_path, self.init_info, self.device, "default")
            self.clip_identity = self.init_info["clip"]
        else:
            if pretrained is None:  # random CLIP weights (tests): drawn from the run's seed, as loading redraws them
                torch.manual_seed(cfg.seed)
            loaded = load_clip(cfg.model, pretrained=pretrained, device=self.device)
            self.clip_identity = clip_identity(cfg.model, pretrained, loaded.pretrained, random_seed=cfg.seed)
        for p in loaded.model.parameters():
            p.requires_grad_(False)
        self.loaded = loaded
        self.clip = Segmenter(loaded.model, loaded.tokenizer, method="maskclip", templates=cfg.templates,
                              mean=loaded.mean, std=loaded.std, device=self.device, model_id=loaded.identity)
        stride = self.clip.backbone.stride
        if cfg.crop % stride:
            raise ValueError(f"--crop {cfg.crop} must be a multiple of the CLIP's patch size {stride}")
        self.class_names = [name for name, keep in zip(self.vocab.names, self.classes.tolist()) if keep]
        self.arch = {
            "crop": cfg.crop, "n_prompts": cfg.n_prompts, "deep_prompts": cfg.deep_prompts, "regions": cfg.regions,
            "region_block": cfg.region_block, "fuse": cfg.fuse, "recovery_layers": cfg.recovery_layers,
            "decoder_layers": cfg.decoder_layers, "decoder_heads": cfg.decoder_heads, "decoder_ffn": cfg.decoder_ffn,
            "dropout": cfg.dropout, "dense_rule": cfg.dense_rule, "calibration": cfg.calibration,
            "trained_classes": self.class_names}
        if cfg.patch_context:  # only when used, so runs from before the switch compare equal
            self.arch["patch_context"] = cfg.patch_context
        if self.init_info is not None:
            differ = [k for k in self.arch if k not in ("calibration", "trained_classes")
                      and self.init_info["model"].get(k) != self.arch[k]]
            if differ:
                raise RunError(f"--init {self.init_path} was built with other {', '.join(differ)}; use its values")

    # -- what the trainer asks for
    def build(self) -> nn.Module:
        model = ClipRcModel(self.loaded.model, self.loaded.mean, self.loaded.std, self.arch)
        text = model.classifier(Vocabulary.parse(self.class_names), self.clip.encode_text)
        self.text = text.weights.to(self.device)  # frozen, computed once
        if self.init_info is not None:
            from safetensors.torch import load_file

            model.load_state_dict(load_file(str(self.init_path / "weights.safetensors")))
        return model

    def dataset(self):
        cfg = self.cfg
        aug = {**asdict(AUGMENTS[cfg.augment]), "crop": cfg.crop}
        if cfg.augment.startswith("synth"):  # the scene is drawn at the crop's scale: --crop 192 is the 96 px world at 2x
            aug["base_size"] = cfg.crop
        augment = JointAugment(AugmentConfig(**aug))
        # ground truth -> training labels: class ids of the trained classes (inductive: remapped to
        # 0..C_S-1), -1 at unseen pixels to pseudo-label (transductive), 255 elsewhere
        lut = torch.full((256,), IGNORE_INDEX, dtype=torch.long)
        trained = self.classes.nonzero().flatten()
        lut[trained] = torch.arange(len(trained)) if cfg.setting == "inductive" else trained
        if cfg.setting == "transductive":
            lut[self.unseen.nonzero().flatten()] = UNLABELED

        def label_fn(gt):
            return lut[gt.clamp(0, 255)]

        return TrainStream(self.train_data, augment, label_fn, cfg.seed, read_labels=True)

    def training_step(self, module, batch, step):
        pixels, labels = batch
        cfg = self.cfg
        logits, recovery = module(pixels, self.text, recover=cfg.recovery_weight > 0)
        pseudo = labels == UNLABELED
        if cfg.setting == "transductive":  # the model's own argmax over the unseen classes, online
            labels = fill_pseudo_labels(labels, logits.detach(), self.unseen.to(labels.device))
        up = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
        if cfg.loss == "ce":
            ce = F.cross_entropy(up, labels, ignore_index=IGNORE_INDEX)
            loss, parts = ce, {"loss_ce": ce.item()}
        else:
            focal, dice = focal_dice_loss(up, labels)
            loss = cfg.focal_weight * focal + cfg.dice_weight * dice
            parts = {"loss_focal": focal.item(), "loss_dice": dice.item()}
        if recovery is not None:
            loss = loss + cfg.recovery_weight * recovery
            parts["loss_recovery"] = recovery.item()
        if cfg.setting == "transductive":
            parts["pseudo_share"] = pseudo.float().mean().item()
        return loss, parts

    def inference_options(self, data=None) -> dict:
        cfg = self.cfg
        options = dict(PRESET_INFERENCE.get(cfg.preset or "", {"mode": "whole", "short_side": cfg.crop}))
        if cfg.augment.startswith("synth"):  # test at the scale it was trained at
            options["short_side"] = cfg.crop
        return ({**data.protocol} if data is not None else {}) | options

    def export(self, module, out: Path, summary: dict) -> None:
        cfg = self.cfg
        info = {
            "method": self.method, "setting": cfg.setting, "clip": self.clip_identity, "model": self.arch,
            "classes": self.vocab.names, "dataset": cfg.dataset, "split_set": cfg.split_set,
            "templates": cfg.templates, "inference": self.inference_options(),
            "config": asdict(cfg), "command": cfg.command or vocaseg_command(),
            **training_record(summary),
        }
        if self.init_info is not None:
            info["init"] = {"path": str(Path(cfg.init)), "command": self.init_info.get("command")}
        write_run(out, info, unwrap(module).state_dict())
        print(f"run folder: {out} (load with --model {out}, or Segmenter.from_pretrained({str(out)!r}))")


def train_clip_rc(cfg: ClipRcConfig) -> dict:
    """Train (or resume) a CLIP-RC run into ``cfg.out``; returns the trainer's summary."""
    t0 = time.time()
    summary = train(ClipRcRecipe(cfg), poly_config(cfg, "adamw"), config_record=asdict(cfg))
    summary["wall_seconds"] = round(time.time() - t0, 1)
    return summary
