"""CLIPTeacher (Li et al., "CLIP Is Also a Good Teacher: A New Learning Framework for Inductive Zero-shot
Semantic Segmentation", arXiv 2310.02296 v1; renamed CLIP-ZSS in v2).

Any per-pixel segmentation network (the *student*) learns inductive zero-shot segmentation from the
seen classes' masks, with a frozen CLIP ViT as a training-only teacher. The student emits D-channel
features R (D: CLIP's embedding width); its classifier is the frozen text embeddings of the class
names. Read top to bottom:

1. **Teacher** (no gradient): for the student's own augmented crop, CLIP's image embedding S (the
   class token) and its dense patch tokens D (rule ``raw``: the unmodified tower; configurable).
2. **Global learning module (GLM)**, no parameters: S is an attention query over the student's
   features, ``w = softmax_l(S . R_l / sqrt(D))``, ``s_hat = sum_l w_l R_l``; InfoNCE (tau 0.07) pulls
   ``s_hat`` to its own image's S against the other images' S: the rest of the batch and a
   first-in-first-out **bank** of the last 24 steps' S (:class:`ClsBank`). The pooling can also be
   the mean or max over positions (the paper's Table 4); the toy recipe (preset ``synth``) pools by
   the mean, which named the unseen classes far better there (README, "CLIPTeacher"): attention lets
   the student align a few dozen of its 576 positions with S and leave the rest out of CLIP's space.
3. **Pixel learning module (PLM)**: in the *ignored* area (unseen and void pixels), CLIP's dense tokens
   are clustered per image by cosine k-means whose centres start from the token means of 3x3 and 7x7
   blocks of the grid (:func:`multiscale_kmeans`); similar centres are merged (:func:`fuse_centres`,
   lambda 0.8) into "potential object" regions. Each seen class and each region gets a prototype,
   the mean student feature over its pixels; the **vision-language adapter** (VLA, a transformer
   decoder: prototypes as queries, the batch's CLIP class tokens as keys and values) turns them into
   classifier weights. The seen ones are pulled to their text embeddings (the "generate" MSE loss);
   the regions' weights join the seen text embeddings as extra classes, so the ignored pixels
   inside regions are supervised too.
4. **Pixel loss**: cross-entropy + sigmoid focal + dice (ZegCLIP's) on the student's logits over
   [seen text embeddings; region weights]. Total: global + pixel + generate.
5. **Inference**: student features against every class's text embedding; gamma (1.5) is added to the
   classes the run was not trained on (equivalently taken from the seen ones: :mod:`vocaseg.inference`
   applies it, ``--calibration`` overrides it).

No official code has been published (checked: shared/specs/clipteacher.md), so where the paper is
silent or inconsistent vocaseg chooses, and says so at the place (``CHOICE:``). In short: InfoNCE with
the -log and a batch mean (Eq. 3 prints neither); GLM attention on the raw (unnormalised) S and R with
the printed 1/sqrt(D), unit vectors elsewhere; centres are masked means of 3x3 and 7x7 blocks of the
grid (the literal reading of Eq. 4-5: 9 + 49 centres at any resolution), all refined together by one
k-means over the image's ignored tokens, so the masks partition them; a token is ignored when more
than half its pixels are; fusion is NMS-like so every centre joins exactly one region (Algorithm 1
taken literally can put one centre in several); regions are per image; VLA: 2 pre-norm layers, width
D, FFN 4D, dropout 0.1, a final linear and L2 normalisation; loss weights 1 : 1 : 1 (Eq. 11-12);
gradients flow through the region weights into the VLA and the prototypes. Under torchrun each
process computes the InfoNCE over its own share of the batch (the CLS tokens are not gathered) and
the bank follows rank 0's (DDP broadcasts buffers).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import CLIPBackbone
from ..data.datasets import IGNORE_INDEX
from ..dense import Classifier, DenseModel, class_logits, full_precision, trained_mask
from ..inference import Segmenter
from ..loading import load_clip
from ..runs import clip_identity, training_record, vocaseg_command, write_run
from ..students import IMAGENET_MEAN, build_student, student_param_groups
from ..training.augment import MMSEG_CONTEXT, MMSEG_VOC_COCO, SYNTH_TOY, AugmentConfig, JointAugment
from ..training.loop import SegDatasetRecipe, RunFields, poly_config, train, unwrap
from ..training.stream import TrainStream
from ..vocabulary import Vocabulary
from . import config_from, register_method
from .clip_rc import focal_dice_loss

SETTINGS = ("inductive", "supervised")
GLM_POOLING = ("attention", "mean", "max", "none")
ADAPTERS = ("decoder", "mlp", "none")
LOSS_IGNORE = -100  # ignored in the pixel losses (255 could be a region's class id: COCO has 156 seen classes)
AUGMENTS = {"synth": SYNTH_TOY, "voc_coco": MMSEG_VOC_COCO, "context": MMSEG_CONTEXT}


# ---------------------------------------------------------------------------- global learning module
def glm_attention(features: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """The GLM's attention weights (B, h*w): CLIP's image embedding ``query`` (B, D) over the student's
    features (B, D, h, w), ``softmax_l(S . R_l / sqrt(D))`` (Eq. 1)."""
    r = features.flatten(2)
    # CHOICE: raw S and R with the printed 1/sqrt(D): unit vectors would make the weights near uniform
    return torch.softmax(torch.einsum("bd,bdl->bl", query.to(r.dtype), r) / math.sqrt(r.shape[1]), dim=-1)


def glm_pool(features: torch.Tensor, query: torch.Tensor, pooling: str = "attention") -> torch.Tensor:
    """The student's image vector (B, D) from its features (B, D, h, w): attention with CLIP's image
    embedding ``query`` (B, D) as the query and the features as keys and values (Eq. 1-2), or the
    mean / max over positions (the paper's Table 4 ablations)."""
    r = features.flatten(2)  # (B, D, L)
    if pooling == "mean":
        return r.mean(-1)
    if pooling == "max":
        return r.amax(-1)
    return torch.einsum("bl,bdl->bd", glm_attention(features, query), r)


def info_nce(anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor | None,
             tau: float = 0.07) -> torch.Tensor:
    """-mean_i log(e^{a_i.p_i/tau} / (sum_j e^{a_i.p_j/tau} + sum_k e^{a_i.n_k/tau})) on unit vectors:
    each anchor's positive is its own image's CLIP embedding; the batch's others and ``negatives``
    (the bank) are its negatives. CHOICE: Eq. 3 as printed lacks the -log and the mean."""
    a, p = F.normalize(anchors.float(), dim=-1), F.normalize(positives.float(), dim=-1)
    keys = p if negatives is None or not len(negatives) else torch.cat([p, F.normalize(negatives.float(), dim=-1)])
    logits = a @ keys.T / tau
    return F.cross_entropy(logits, torch.arange(len(a), device=a.device))


class ClsBank(nn.Module):
    """First-in-first-out bank of the CLIP image embeddings of the last ``size`` steps (negatives for
    the InfoNCE). CLIP is frozen, so entries never go stale: no momentum encoder. A buffer, so that
    checkpoints carry it and a resumed run continues exactly."""

    def __init__(self, size: int, batch: int, dim: int):
        super().__init__()
        self.register_buffer("slots", torch.zeros(size, batch, dim))
        self.register_buffer("filled", torch.zeros(size, batch, dtype=torch.bool))

    def negatives(self) -> torch.Tensor:
        return self.slots[self.filled]

    @torch.no_grad()
    def push(self, embeddings: torch.Tensor) -> None:
        """The oldest step leaves, ``embeddings`` (B, D) enter (a smaller batch, e.g. one process's share
        under DDP, fills part of its slot)."""
        if not len(self.slots):
            return
        b = min(len(embeddings), self.slots.shape[1])
        entry, valid = torch.zeros_like(self.slots[0]), torch.zeros_like(self.filled[0])
        entry[:b], valid[:b] = F.normalize(embeddings[:b].float(), dim=-1), True
        self.slots.copy_(torch.cat([self.slots[1:], entry[None]]))
        self.filled.copy_(torch.cat([self.filled[1:], valid[None]]))


# ---------------------------------------------------------------------------- pixel learning module
def ignored_tokens(labels: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) bool: tokens more than half of whose pixels are ignored (255). CHOICE: the paper
    does not say how pixel-level ignore maps to CLIP's tokens."""
    ignored = (labels == IGNORE_INDEX).float()[:, None]
    return F.adaptive_avg_pool2d(ignored, grid)[:, 0] > 0.5


def block_centres(tokens: torch.Tensor, mask: torch.Tensor, windows=(3, 7)) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial centres for a batch: tokens (B, D, h, w), ignored mask (B, h, w). For each scale s, the
    mean of the ignored tokens in each of the s x s blocks of the grid (Eq. 4-5, literal reading: 9 + 49
    centres at any resolution). Returns (centres (B, K, D) unit vectors, valid (B, K)): a block holding
    no ignored token gives no centre (valid False, its row zero)."""
    m = mask.float()[:, None]
    centres, valid = [], []
    for s in windows:
        size = (min(s, m.shape[-2]), min(s, m.shape[-1]))
        count = F.adaptive_avg_pool2d(m, size).flatten(2)  # (B, 1, S): share of ignored tokens per block
        summed = F.adaptive_avg_pool2d(tokens * m, size).flatten(2)  # (B, D, S), divided by the block size
        keep = count[:, 0] > 0
        centres.append(torch.where(keep[:, None], summed / count.clamp_min(1e-12), 0).transpose(1, 2))
        valid.append(keep)
    return F.normalize(torch.cat(centres, 1), dim=-1), torch.cat(valid, 1)


def initial_centres(tokens: torch.Tensor, mask: torch.Tensor, windows=(3, 7)) -> torch.Tensor:
    """One image's initial centres (K, D) from tokens (D, h, w) and ignored mask (h, w)."""
    centres, valid = block_centres(tokens[None].float(), mask[None], windows)
    return centres[0, valid[0]]


def batched_kmeans(tokens: torch.Tensor, mask: torch.Tensor, windows=(3, 7), iters: int = 10
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cosine k-means on each image's ignored tokens only, all images at once (no host syncs).
    tokens (B, D, h, w) unit vectors, mask (B, h, w) bool. Returns (centres (B, K, D), used (B, K): the
    centres that won at least one token, assignment (B, h, w) int64: the rank of its centre among the
    image's used centres, -1 on tokens that are not ignored)."""
    b, d = tokens.shape[:2]
    x = F.normalize(tokens.float().flatten(2).transpose(1, 2), dim=-1)  # (B, N, D)
    weight = mask.flatten(1).float()  # only ignored tokens move the centres
    centres, valid = block_centres(tokens.float(), mask, windows)
    k = centres.shape[1]

    def nearest(c):
        return (x @ c.transpose(1, 2)).masked_fill(~valid[:, None], float("-inf")).argmax(-1)  # (B, N)

    for _ in range(iters):
        assign = nearest(centres)
        sums = torch.zeros_like(centres).scatter_add_(1, assign[..., None].expand(-1, -1, d), x * weight[..., None])
        counts = torch.zeros(b, k, device=x.device).scatter_add_(1, assign, weight)
        centres = torch.where(counts[..., None] > 0, F.normalize(sums, dim=-1), centres)  # empty: kept
    assign = nearest(centres)
    counts = torch.zeros(b, k, device=x.device).scatter_add_(1, assign, weight)
    used = valid & (counts > 0)
    rank = used.long().cumsum(1) - 1  # drop the centres that ended up empty, renumber the rest
    assign = torch.where(mask.flatten(1), rank.gather(1, assign), -1)
    return centres, used, assign.view(mask.shape)


def multiscale_kmeans(tokens: torch.Tensor, mask: torch.Tensor, windows=(3, 7), iters: int = 10
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """One image: tokens (D, h, w), mask (h, w) -> (centres (K, D) of the non-empty clusters, assignment
    (h, w) with -1 on tokens that are not ignored)."""
    centres, used, assign = batched_kmeans(tokens[None], mask[None], windows, iters)
    return centres[0, used[0]], assign[0]


def fuse_similar(sim: torch.Tensor, threshold: float = 0.8) -> torch.Tensor:
    """Group centres whose cosine similarity ``sim`` (K, K) exceeds ``threshold`` (Algorithm 1, lambda
    0.8); returns the group of each centre (K,), groups numbered 0..G-1.

    CHOICE (the algorithm taken literally always picks the diagonal and can put one centre in several
    groups): NMS-like. While the most similar pair of free centres is above the threshold, its first
    centre and every free centre above the threshold to it form a group and are used up; each
    leftover centre is a group of its own. Sequential and tiny (K <= 58): run on the host."""
    k = len(sim)
    group = torch.full((k,), -1, dtype=torch.long)
    sim = sim.float().cpu().clone()
    sim.fill_diagonal_(float("-inf"))
    free = torch.ones(k, dtype=torch.bool)
    g = 0
    while free.sum() > 1:
        pair = sim.masked_fill(~(free[:, None] & free[None, :]), float("-inf"))
        if pair.max() <= threshold:
            break
        i = int(pair.argmax()) // k
        members = free & (sim[i] > threshold)
        members[i] = True
        group[members] = g
        free &= ~members
        g += 1
    for i in free.nonzero().flatten().tolist():
        group[i] = g
        g += 1
    return group


def fuse_centres(centres: torch.Tensor, threshold: float = 0.8) -> torch.Tensor:
    """:func:`fuse_similar` on centres (K, D); the groups on the centres' device."""
    unit = F.normalize(centres.float(), dim=-1)
    return fuse_similar(unit @ unit.T, threshold).to(centres.device)


def potential_regions(tokens: torch.Tensor, labels: torch.Tensor, windows=(3, 7), iters: int = 10,
                      threshold: float = 0.8) -> torch.Tensor:
    """The batch's potential-object regions on CLIP's grid: tokens (B, D, h, w) unit vectors, labels
    (B, H, W) with 255 where ignored -> (B, h, w) int64 region ids numbered across the batch (regions
    are per image), -1 outside the ignored area. One host round trip per batch: the clustering is
    batched on the device, only the fusion (sequential, on <= 58 centres per image) runs on the host."""
    b, _, h, w = tokens.shape
    mask = ignored_tokens(labels, (h, w))
    centres, used, assign = batched_kmeans(tokens, mask, windows, iters)
    unit = F.normalize(centres, dim=-1)
    sim, used_host = (unit @ unit.transpose(1, 2)).cpu(), used.cpu()
    table = torch.full(used.shape, -1, dtype=torch.long)  # (B, K): rank of a used centre -> region id
    offset = 0
    for i in range(b):
        keep = used_host[i]
        if not keep.any():
            continue
        group = fuse_similar(sim[i][keep][:, keep], threshold)
        table[i, :len(group)] = group + offset
        offset += int(group.max()) + 1
    table = table.to(tokens.device)
    region = table.gather(1, assign.flatten(1).clamp_min(0)).view_as(assign)
    return torch.where(assign >= 0, region, -1)


class VisionLanguageAdapter(nn.Module):
    """Prototypes -> classifier weights (unit vectors). ``decoder``: a pre-norm transformer decoder, the
    prototypes as queries (with self-attention among them), the batch's CLIP image embeddings as keys
    and values, then a linear layer (CHOICE: 2 layers, width D, FFN 4D, dropout 0.1; the paper gives no
    sizes). ``mlp`` and ``none`` (the prototypes themselves): the paper's Table 5 ablations."""

    def __init__(self, dim: int, kind: str = "decoder", layers: int = 2, heads: int = 8, dropout: float = 0.1):
        super().__init__()
        self.kind = kind
        if kind == "decoder":
            layer = nn.TransformerDecoderLayer(dim, heads, 4 * dim, dropout, batch_first=True, norm_first=True)
            self.decoder = nn.TransformerDecoder(layer, layers, norm=nn.LayerNorm(dim))
            self.out = nn.Linear(dim, dim)
        elif kind == "mlp":
            self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, prototypes: torch.Tensor, image_embeddings: torch.Tensor) -> torch.Tensor:
        if self.kind == "decoder":
            x = self.decoder(prototypes[None], image_embeddings[None].to(prototypes.dtype))[0]
            x = self.out(x)
        elif self.kind == "mlp":
            x = self.mlp(prototypes)
        else:
            x = prototypes
        return F.normalize(x.float(), dim=-1)


def prototypes(features: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean feature (N, D) of each label in ``ids`` over the batch: features (B, D, h, w), labels
    (B, h, w) on the same grid (Eq. 6-7)."""
    onehot = (labels[:, None] == ids.view(1, -1, 1, 1)).to(features.dtype)  # (B, N, h, w)
    summed = torch.einsum("bnhw,bdhw->nd", onehot, features)
    return summed / onehot.sum((0, 2, 3)).clamp_min(1)[:, None]


# ---------------------------------------------------------------------------- the trained model
@register_method("clipteacher", "CLIPTeacher: any segmentation network learns inductive zero-shot segmentation "
                                "from seen-class labels with a frozen CLIP teacher (GLM + PLM)")
class ClipTeacherModel(DenseModel):
    """The student; its classifier is CLIP's text side. What inference needs and nothing else."""

    logit_scale = 1.0  # logits, trained under cross-entropy

    def __init__(self, student: nn.Module, embed_dim: int, arch: dict):
        super().__init__()
        self.student = student
        self.arch = dict(arch)
        self.embed_dim, self.image_size, self.stride = embed_dim, arch["crop"], student.stride
        self.pad_value = tuple(float(v) for v in getattr(student, "mean", torch.tensor(IMAGENET_MEAN)).flatten())
        self.trained_classes = list(arch["trained_classes"])
        self.calibration = float(arch["calibration"])  # gamma, applied by the Segmenter (inference.py)

    @classmethod
    def from_run(cls, info: dict, loaded) -> "ClipTeacherModel":
        arch = info["model"]
        return cls(build_student(arch["student"], arch["embed_dim"], weights=None), arch["embed_dim"], arch)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """RGB [0, 1] (B, 3, H, W) -> features R (B, D, H/stride, W/stride), not normalised."""
        return self.student(pixels)

    def classifier(self, vocab: Vocabulary, encode_text) -> Classifier:
        clf = super().classifier(vocab, encode_text)
        return Classifier(clf.weights, clf.owner, clf.num_classes,
                          extra={"seen": trained_mask(vocab, self.trained_classes, clf.weights.device)})

    @torch.no_grad()
    def logits(self, pixels: torch.Tensor, classifier: Classifier) -> torch.Tensor:
        features = self(pixels)
        with full_precision(pixels.device):
            scores = class_logits(torch.einsum("bdhw,nd->bnhw", features.float(), classifier.weights.float()),
                                  classifier)
            # calibrated inference: gamma added to the classes not trained on (= taken from the seen ones)
            return scores - self.calibration * classifier.extra["seen"].float().view(1, -1, 1, 1)


class ClipTeacherTraining(nn.Module):
    """Everything trained or checkpointed: the model (exported), the VLA and the bank (training only)."""

    def __init__(self, model: ClipTeacherModel, cfg: "ClipTeacherConfig", dim: int):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.adapter = VisionLanguageAdapter(dim, cfg.adapter, cfg.adapter_layers, cfg.adapter_heads) \
            if cfg.plm else None
        self.bank = ClsBank(cfg.bank_size if cfg.glm != "none" else 0, cfg.batch_size, dim)

    def forward(self, pixels, labels, image_embeddings, regions, seen_text):
        """pixels (B, 3, H, W); labels (B, H, W): seen ids 0..S-1, 255 ignored; image_embeddings (B, D)
        CLIP's S (raw); regions (B, h, w) the teacher's region ids or None; seen_text (S, D).
        Returns the total loss and its parts."""
        cfg = self.cfg
        features = self.model(pixels)
        parts = {}
        total = features.new_zeros((), dtype=torch.float32)
        if cfg.glm != "none":
            pooled = glm_pool(features.float(), image_embeddings, cfg.glm)
            parts["global"] = info_nce(pooled, image_embeddings, self.bank.negatives(), cfg.tau)
            total = total + cfg.global_weight * parts["global"]
            self.bank.push(image_embeddings)
        weights = seen_text
        targets = torch.where(labels == IGNORE_INDEX, torch.full_like(labels, LOSS_IGNORE), labels)
        if self.adapter is not None:
            weights, targets, parts["generate"] = self._pixel_learning(features, labels, image_embeddings,
                                                                       regions, seen_text)
            total = total + cfg.generate_weight * parts["generate"]
        if cfg.loss_stride > 1:  # every k-th label (the toy recipe: the focal map is B x (S + regions) x H x W)
            k = cfg.loss_stride
            targets = targets[:, k // 2::k, k // 2::k]
        logits = torch.einsum("bdhw,nd->bnhw", features.float(), weights.float())
        logits = F.interpolate(logits, size=targets.shape[-2:], mode="bilinear", align_corners=False)
        parts["ce"] = F.cross_entropy(logits, targets, ignore_index=LOSS_IGNORE) if (targets != LOSS_IGNORE).any() \
            else logits.sum() * 0
        parts["focal"], parts["dice"] = focal_dice_loss(logits, targets)
        total = total + cfg.ce_weight * parts["ce"] + cfg.focal_weight * parts["focal"] + cfg.dice_weight * parts["dice"]
        return total, parts

    def _pixel_learning(self, features, labels, image_embeddings, regions, seen_text):
        """Prototypes of the present seen classes and regions -> the VLA -> the classifier weights
        [seen text; region weights], the targets (seen ids, regions as S, S+1, ..., ``LOSS_IGNORE``
        elsewhere) and L_generate."""
        n_seen = len(seen_text)
        grid = features.shape[-2:]

        def to_grid(t):  # nearest, as the labels are resized to the student's grid (CHOICE)
            return F.interpolate(t[:, None].float(), size=grid, mode="nearest")[:, 0].long()

        region_pix = torch.full_like(labels, -1)
        if regions is not None:  # an ignored pixel inside a region takes the region
            up = F.interpolate(regions[:, None].float(), size=labels.shape[-2:], mode="nearest")[:, 0].long()
            region_pix = torch.where(labels == IGNORE_INDEX, up, region_pix)
        seen_small, region_small = to_grid(labels), to_grid(region_pix)
        seen_ids = torch.unique(seen_small[seen_small != IGNORE_INDEX])
        region_ids = torch.unique(region_small[region_small >= 0])  # a region too small for the grid: dropped
        protos = torch.cat([prototypes(features.float(), seen_small, seen_ids),
                            prototypes(features.float(), region_small, region_ids)])
        generated = self.adapter(protos, F.normalize(image_embeddings.float(), dim=-1))
        g_seen, g_regions = generated[:len(seen_ids)], generated[len(seen_ids):]
        # CHOICE: unit vectors, mean over the present seen classes (Eq. 8 sums)
        generate = ((g_seen - seen_text[seen_ids].float()) ** 2).sum(-1).mean() if len(seen_ids) \
            else generated.sum() * 0
        rank = torch.full((int(region_pix.max().clamp_min(0)) + 1,), LOSS_IGNORE, dtype=torch.long,
                          device=labels.device)
        rank[region_ids] = n_seen + torch.arange(len(region_ids), device=labels.device)
        targets = torch.where(labels == IGNORE_INDEX, torch.full_like(labels, LOSS_IGNORE), labels)
        targets = torch.where(region_pix >= 0, rank[region_pix.clamp_min(0)], targets)
        return torch.cat([seen_text.float(), g_regions]), targets, generate


# ---------------------------------------------------------------------------- configuration
@dataclass
class ClipTeacherConfig(RunFields):
    """Everything a CLIPTeacher run depends on (recorded in its method.json). Defaults: the toy recipe."""

    out: str
    setting: str = "inductive"
    model: str = "toy"  # the CLIP teacher (a ViT) and text side
    pretrained: str | None = "default"
    dataset: str = "synth"
    data_root: str | None = None
    train_split: str = "train"
    split_set: str | None = "synth_zs"
    templates: str = "maskclip85"
    student: str = "fpn-toy"
    student_weights: str | None = "default"
    # global learning module
    glm: str = "attention"  # attention | mean | max | none
    tau: float = 0.07
    bank_size: int = 24
    # pixel learning module
    plm: bool = True
    teacher_dense_rule: str = "raw"  # CLIP's dense tokens for the k-means (the paper: CLIP unaltered)
    kmeans_windows: tuple[int, ...] = (3, 7)
    kmeans_iters: int = 10
    fusion_threshold: float = 0.8
    adapter: str = "decoder"  # decoder | mlp | none
    adapter_layers: int = 2
    adapter_heads: int = 8
    # losses (Eq. 11-12 weight them equally)
    global_weight: float = 1.0
    generate_weight: float = 1.0
    ce_weight: float = 1.0
    focal_weight: float = 1.0
    dice_weight: float = 1.0
    loss_stride: int = 1  # pixel losses on every k-th label pixel (1: the full label map, as mmseg)
    calibration: float = 1.5  # gamma
    # schedule (AdamW, linear warm-up, poly decay; the head lr x head_lr_mult)
    augment: str = "synth"
    crop: int = 96
    steps: int = 1500
    batch_size: int = 16
    lr: float = 2e-3
    head_lr_mult: float = 1.0
    weight_decay: float = 0.01
    warmup: int = 100
    min_lr: float = 0.0
    poly_power: float = 1.0

    def __post_init__(self):
        checks = (("setting", SETTINGS), ("glm", GLM_POOLING), ("adapter", ADAPTERS), ("augment", tuple(AUGMENTS)))
        for name, allowed in checks:
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        if self.setting == "inductive" and not self.split_set:
            raise ValueError("the inductive setting needs a zero-shot split: --split-set NAME (e.g. synth_zs)")
        self.kmeans_windows = tuple(int(w) for w in self.kmeans_windows)
        if not self.kmeans_windows or min(self.kmeans_windows) < 1:
            raise ValueError(f"kmeans_windows must be positive block counts, e.g. 3,7; not {self.kmeans_windows}")
        if self.bank_size < 0:
            raise ValueError("bank_size must be 0 or more")


# Presets: the paper's schedules (shared/specs/clipteacher.md, Sec. 4): batch 16, 512 crops, CLIP
# ViT-B/16 on the same crop; AdamW 6e-5, head x10, wd 0.01, 1,500 warm-up steps, poly (power 1) to 0.
# The paper's headline student is SegFormer-B4 (not in timm); vocaseg's real presets use a Swin-B with
# SegFormer's all-MLP head (the paper's Swin-B row; its head is not stated), ImageNet weights from timm.
_REAL = dict(model="ViT-B-16", pretrained="openai", student="mlp-swin-base", augment="voc_coco", crop=512,
             batch_size=16, lr=6e-5, head_lr_mult=10.0, weight_decay=0.01, warmup=1500, min_lr=0.0,
             poly_power=1.0, adapter_heads=8, templates="maskclip85")
PRESETS: dict[str, dict] = {
    # the toy (shared/specs/clipteacher.md, Sec. 7): toy CLIP, a student from random weights, CPU-sized
    # student: fpn-toy, the spec prototype's (stride 4, FPN-lite); deeplabv2-toy (stride 8) names far fewer
    # hexagons (README, "CLIPTeacher")
    # GLM by mean pooling, chosen on val among the paper's three poolings (seed 0 val hIoU: mean 65.8,
    # max 60.2, attention 54.5; the paper's Context ablation ranks attention first, so the real presets keep it)
    "synth": dict(dataset="synth", split_set="synth_zs", model="toy", student="fpn-toy", augment="synth",
                  crop=96, steps=1500, batch_size=16, lr=2e-3, head_lr_mult=1.0, warmup=100, adapter_heads=4,
                  loss_stride=2, glm="mean"),
    # VOC 15/5, background ignored in training and test (it receives regions), 20k
    "voc_zs3": dict(_REAL, dataset="voc20", train_split="trainaug", split_set="voc_zs3", steps=20000),
    # Pascal Context 49/10 over the 59 classes (CLIPTeacher's split, no background), 40k
    "context_zs3": dict(_REAL, dataset="context59", train_split="train", split_set="context59_zs3",
                        augment="context", crop=480, steps=40000),
    # COCO-Stuff 156/15, 80k
    "coco_stuff_zs3": dict(_REAL, dataset="coco_stuff171", train_split="train", split_set="coco_stuff_zs3",
                           steps=80000),
}
# ZegCLIP's test: short side 512, 512 windows every 426 px (the paper does not say; spec Sec. 5)
PRESET_INFERENCE = {"synth": dict(mode="whole", short_side=96)} | {
    name: dict(mode="slide", short_side=512, window=512, stride=426) for name in PRESETS if name != "synth"}


def make_config(preset: str | None = None, **overrides) -> ClipTeacherConfig:
    """Defaults <- the preset's values <- ``overrides`` (None values in overrides are skipped)."""
    return config_from(ClipTeacherConfig, PRESETS, preset, overrides, "CLIPTeacher")


# ---------------------------------------------------------------------------- the recipe
class ClipTeacherRecipe(SegDatasetRecipe):
    method = "clipteacher"

    def __init__(self, cfg: ClipTeacherConfig):
        self.cfg, self.device = cfg, torch.device(cfg.device)
        # data first: a wrong data root or split fails before any weights are loaded
        self.train_data = self._dataset(cfg.train_split)
        self.vocab = self.train_data.vocabulary
        self._zero_shot_split()
        if cfg.setting == "supervised":  # the upper bound: every class of the split labelled
            self.seen = self.seen | self.unseen
        pretrained = None if str(cfg.pretrained).lower() == "none" else cfg.pretrained
        if pretrained is None:  # random CLIP weights (tests): drawn from the run's seed, as loading redraws them
            torch.manual_seed(cfg.seed)
        loaded = load_clip(cfg.model, pretrained=pretrained, device=self.device)
        self.clip_identity = clip_identity(cfg.model, pretrained, loaded.pretrained, random_seed=cfg.seed)
        for p in loaded.model.parameters():
            p.requires_grad_(False)
        self.clip = Segmenter(loaded.model, loaded.tokenizer, method="maskclip", templates=cfg.templates,
                              mean=loaded.mean, std=loaded.std, device=self.device, model_id=loaded.identity)
        self.teacher = CLIPBackbone(loaded.model)
        if self.teacher.kind != "vit":
            raise ValueError("CLIPTeacher's teacher needs a ViT CLIP (its class token and patch tokens); "
                             f"{cfg.model} has a ResNet image tower")
        if cfg.crop % self.teacher.stride:
            raise ValueError(f"--crop {cfg.crop} must be a multiple of the CLIP's patch size {self.teacher.stride} "
                             "(the teacher sees the student's crop)")
        self.mean = torch.tensor(loaded.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(loaded.std, device=self.device).view(1, 3, 1, 1)
        self.embed_dim = self.teacher.embed_dim
        # inductive: the unseen names are never encoded in training
        self.class_names = [name for name, keep in zip(self.vocab.names, self.seen.tolist()) if keep]
        self.arch = {"student": cfg.student, "embed_dim": self.embed_dim, "crop": cfg.crop,
                     "calibration": cfg.calibration if cfg.setting == "inductive" else 0.0,
                     "trained_classes": self.class_names}

    # -- what the trainer asks for
    def build(self) -> nn.Module:
        cfg = self.cfg
        student = build_student(cfg.student, self.embed_dim, weights=cfg.student_weights)
        model = ClipTeacherModel(student, self.embed_dim, self.arch)
        text = self.clip.classifier(Vocabulary.parse(self.class_names))
        # one embedding per seen class (synonyms averaged, renormalised): the seen classifier in training
        self.seen_text = text.class_embeddings().to(self.device)
        return ClipTeacherTraining(model, cfg, self.embed_dim)

    def param_groups(self, module):
        module = unwrap(module)
        groups = student_param_groups(module.model.student)
        head = groups["head"] + (list(module.adapter.parameters()) if module.adapter is not None else [])
        return [{"params": groups["backbone"]}, {"params": head, "lr_mult": self.cfg.head_lr_mult}]

    def dataset(self):
        cfg = self.cfg
        augment = JointAugment(AugmentConfig(**{**asdict(AUGMENTS[cfg.augment]), "crop": cfg.crop}))
        # ground truth -> training labels: seen classes 0..S-1, everything else (unseen, void) 255
        lut = torch.full((256,), IGNORE_INDEX, dtype=torch.long)
        seen = self.seen.nonzero().flatten()
        lut[seen] = torch.arange(len(seen))

        def label_fn(gt):
            return lut[gt.clamp(0, 255)]

        return TrainStream(self.train_data, augment, label_fn, cfg.seed, read_labels=True)

    @torch.no_grad()
    def teacher_outputs(self, pixels: torch.Tensor, labels: torch.Tensor):
        """CLIP's image embedding S (B, D) and, with the PLM, the regions (B, h, w) of the ignored area."""
        cfg = self.cfg
        image, tokens = self.teacher.global_and_dense((pixels - self.mean) / self.std, cfg.teacher_dense_rule)
        regions = potential_regions(tokens, labels, cfg.kmeans_windows, cfg.kmeans_iters, cfg.fusion_threshold) \
            if cfg.plm else None
        return image.float(), regions

    def training_step(self, module, batch, step):
        pixels, labels = batch
        image, regions = self.teacher_outputs(pixels, labels)
        loss, parts = module(pixels, labels, image, regions, self.seen_text)
        logged = {f"loss_{k}": v.item() for k, v in parts.items()}
        if regions is not None:
            logged["regions"] = float(regions.max().item() + 1)
        return loss, logged

    def inference_options(self, data=None) -> dict:
        options = PRESET_INFERENCE.get(self.cfg.preset or "", {"mode": "whole", "short_side": self.cfg.crop})
        return ({**data.protocol} if data is not None else {}) | options

    def eval_model(self, module):
        return unwrap(module).model  # the student alone, as a run folder loads it

    def export(self, module, out: Path, summary: dict) -> None:
        cfg = self.cfg
        info = {
            "method": self.method, "setting": cfg.setting, "clip": self.clip_identity, "model": self.arch,
            "classes": self.vocab.names, "dataset": cfg.dataset, "split_set": cfg.split_set,
            "templates": cfg.templates, "inference": self.inference_options(),
            "config": asdict(cfg), "command": cfg.command or vocaseg_command(),
            **training_record(summary),
        }
        write_run(out, info, unwrap(module).model.state_dict())
        print(f"run folder: {out} (load with --model {out}, or Segmenter.from_pretrained({str(out)!r}))")


def train_clipteacher(cfg: ClipTeacherConfig, recipe: ClipTeacherRecipe | None = None) -> dict:
    """Train (or resume) a CLIPTeacher run into ``cfg.out``; returns the trainer's summary."""
    t0 = time.time()
    summary = train(recipe or ClipTeacherRecipe(cfg), poly_config(cfg, "adamw"), config_record=asdict(cfg))
    summary["wall_seconds"] = round(time.time() - t0, 1)
    return summary
