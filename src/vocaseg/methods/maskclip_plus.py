"""MaskCLIP+ (Zhou, Loy & Dai, "Extract Free Dense Labels from CLIP", ECCV 2022, Sec. 3.4).

A segmentation network (the *student*, DeepLab) learns from labels that a frozen MaskCLIP
*teacher* computes on the fly for every augmented training crop. The student's last layer is the
frozen CLIP text embeddings of the class names (no bias, no temperature, features not normalised),
so it stays open-vocabulary: at inference any class names work, through CLIP's text side.

Training, step by step (``MaskClipPlusRecipe.training_step``):

1. the crop's label map holds class ids where labels are known, 255 where the loss ignores the
   pixel, and -1 where the method must supply a *pseudo label* (which pixels, by setting below);
2. *guided learning* (steps before ``self_training_from``): the teacher (MaskCLIP's value-path
   features of the same crop, cosine against the text embeddings) scores the candidate classes,
   bilinearly upsampled to the crop; the hard argmax is written into the -1 pixels;
3. *self-training* (from ``self_training_from`` on): the same, with the student's own detached
   scores from this very forward pass instead of the teacher's (online, as the official code and
   Appendix F: no EMA, no second pass, no threshold);
4. cross-entropy of the student's logits, upsampled to the crop, ignoring 255, averaged over *all*
   pixels with ignored ones counting 0 (mmseg 0.20.2, which produced the paper's numbers).

Settings (``setting``):

- ``annotation-free``: every pixel is -1, candidates are all classes, guided learning throughout.
  No ground truth is read (the loader yields images only). ``void_from_gt`` ignores the dataset's
  void pixels as the official runs do; it reads the label files, so it is off by default.
- ``transductive`` (zero-shot, with ``split_set``): seen-class pixels keep their ground truth and the
  rest are pseudo-labelled. ``unlabeled="unseen-gt"`` (the official rule, default for benchmark
  parity): exactly the pixels whose ground truth is an unseen class are -1, and their candidates are
  the unseen classes, so the ground truth tells the teacher *where* unseen objects are and it only
  chooses *which*. ``unlabeled="strict"`` reads no unseen ground truth: every pixel without a seen
  label is -1 and all classes are candidates. The paper switches to self-training at 1/10 of the
  schedule.
- ``supervised`` (a baseline, no teacher): ground truth only; with ``split_set`` the unseen pixels
  are ignored (the "seen-only supervised" row of the paper's Table 3), without it every class is
  labelled (the fully supervised upper bound).

Where vocaseg departs from the official code (github.com/chongzhou96/MaskCLIP @245d31f), and why:
the teacher normalises pixels with CLIP's own mean/std (the official feeds it ImageNet-normalised
pixels); the step counter counts optimizer steps only (the official one also counts test forwards);
guided and self-training phases never overlap (the official code crashes if they do); the ViT
annotation-free student defaults to R101 as the paper says (the official config builds an R50:
``--student deeplabv2-r50`` reproduces that); the official distillation variant, whose loss is
computed on detached features and trains nothing, is not reproduced.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data.datasets import IGNORE_INDEX
from ..dense import Classifier, DenseModel, TrainingFreeModel, class_logits, full_precision
from ..inference import Segmenter, prompt_denoising
from ..loading import load_clip
from ..runs import clip_identity, training_record, vocaseg_command, write_run
from ..students import IMAGENET_MEAN, build_student
from ..training.augment import MMSEG_CONTEXT, MMSEG_VOC_COCO, SYNTH_TOY, AugmentConfig, JointAugment
from ..training.loop import SegDatasetRecipe, RunFields, sgd_poly_config, train, unwrap
from ..training.stream import TrainStream
from ..vocabulary import Vocabulary
from . import config_from, register_method

UNLABELED = -1
SETTINGS = ("annotation-free", "transductive", "supervised")
UNLABELED_RULES = ("unseen-gt", "strict")
AUGMENTS = {"synth": SYNTH_TOY, "voc_coco": MMSEG_VOC_COCO, "context": MMSEG_CONTEXT}


# ---------------------------------------------------------------------------- the trained model
@register_method("maskclip-plus", "DeepLab student trained on MaskCLIP pseudo-labels, then self-training "
                                  "(annotation-free / transductive zero-shot)")
class MaskClipPlusModel(DenseModel):
    """The student and, optionally, a learned background embedding; the classifier is CLIP's text side."""

    logit_scale = 1.0  # trained as logits under cross-entropy, not as cosines

    def __init__(self, student: nn.Module, embed_dim: int, crop: int, learned_background: bool = False):
        super().__init__()
        self.student = student
        self.embed_dim, self.image_size, self.stride = embed_dim, crop, student.stride
        self.pad_value = IMAGENET_MEAN  # the student normalises with ImageNet statistics
        self.background = nn.Parameter(torch.randn(embed_dim) * embed_dim ** -0.5) if learned_background else None

    @classmethod
    def from_run(cls, info: dict, loaded) -> "MaskClipPlusModel":
        arch = info["model"]
        student = build_student(arch["student"], arch["embed_dim"], weights=None)
        return cls(student, arch["embed_dim"], arch["crop"], arch.get("learned_background", False))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """RGB [0, 1] (B,3,H,W) -> features (B, D, H/stride, W/stride)."""
        return self.student(pixels)

    def text_weights(self, text: torch.Tensor, has_background: bool) -> torch.Tensor:
        """Text embeddings, with the learned background (normalised when used) as class 0 if wanted."""
        if self.background is None or not has_background:
            return text
        return torch.cat([F.normalize(self.background, dim=0)[None], text[1:]])

    def classifier(self, vocab: Vocabulary, encode_text) -> Classifier:
        clf = super().classifier(vocab, encode_text)
        if self.background is not None and vocab.names[0] == "background":
            names, owner = clf.weights[clf.owner != 0], clf.owner[clf.owner != 0]
            bg = F.normalize(self.background.detach().float(), dim=0)[None].to(names.device)
            clf = Classifier(torch.cat([bg, names]), torch.cat([owner.new_zeros(1), owner]), clf.num_classes)
        return clf

    @torch.no_grad()
    def logits(self, pixels: torch.Tensor, classifier: Classifier) -> torch.Tensor:
        features = self(pixels)
        with full_precision(pixels.device):
            return class_logits(torch.einsum("bdhw,nd->bnhw", features.float(), classifier.weights.float()), classifier)


# ---------------------------------------------------------------------------- pseudo labels
def fill_pseudo_labels(labels: torch.Tensor, scores: torch.Tensor, candidates: torch.Tensor,
                       confidence: float = 0.0) -> torch.Tensor:
    """Write the argmax over ``candidates`` of ``scores`` into the -1 pixels of ``labels``.

    labels (B, H, W) int64; scores (B, C, h, w) on any grid, upsampled bilinearly to (H, W);
    candidates (C,) bool. With ``confidence`` > 0, pixels whose winning softmax probability
    (over the candidates, of ``scores`` as given) is below it are ignored instead. Every other
    pixel keeps its label.
    """
    todo = labels == UNLABELED
    if not todo.any():
        return labels
    scores = F.interpolate(scores.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
    scores = scores.masked_fill(~candidates.view(1, -1, 1, 1), float("-inf"))
    best, pseudo = scores.max(1)
    if confidence > 0:
        prob = torch.exp(best - torch.logsumexp(scores, dim=1))
        pseudo = torch.where(prob < confidence, torch.full_like(pseudo, IGNORE_INDEX), pseudo)
    return torch.where(todo, pseudo, labels)


def mean_over_all_pixels_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy ignoring 255, averaged over every pixel (ignored ones count as 0), as mmseg 0.20.2."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
    return loss.sum() / labels.numel()


# ---------------------------------------------------------------------------- configuration
@dataclass
class MaskClipPlusConfig(RunFields):
    """Everything a MaskCLIP+ run depends on (recorded in its method.json). Defaults: the toy recipe."""

    out: str
    model: str = "toy"  # the CLIP: teacher and text side
    pretrained: str | None = "default"
    dataset: str = "synth"
    data_root: str | None = None
    train_split: str = "train"
    setting: str = "annotation-free"
    split_set: str | None = None
    unlabeled: str = "unseen-gt"
    void_from_gt: bool = False
    student: str = "deeplabv2-toy"
    student_weights: str | None = "default"
    augment: str = "synth"  # synth | voc_coco | context (training/augment.py)
    crop: int = 96
    steps: int = 4000
    batch_size: int = 16
    lr: float = 0.01
    weight_decay: float = 5e-4
    momentum: float = 0.9
    min_lr: float = 1e-4
    poly_power: float = 0.9
    self_training_from: int | None = None  # first step of self-training; None: guided learning throughout
    teacher_key_smoothing: float | None = None
    teacher_key_smoothing_mode: str = "official"
    teacher_prompt_denoising: float | None = None
    confidence: float = 0.0  # ignore pseudo-labelled pixels less probable than this (0: off, as the paper)
    learned_background: bool = False
    templates: str = "maskclip85"

    def __post_init__(self):
        if self.setting not in SETTINGS:
            raise ValueError(f"setting must be one of {', '.join(SETTINGS)}, not {self.setting!r}")
        if self.unlabeled not in UNLABELED_RULES:
            raise ValueError(f"unlabeled must be one of {', '.join(UNLABELED_RULES)}, not {self.unlabeled!r}")
        if self.setting == "transductive" and not self.split_set:
            raise ValueError("the transductive setting needs a zero-shot split: --split-set NAME (e.g. synth_zs)")
        if self.augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {', '.join(AUGMENTS)}, not {self.augment!r}")
        if self.self_training_from is not None and self.self_training_from < 1:
            self.self_training_from = 1


# The papers' schedules (spec: shared/specs/maskclip_plus.md, Sec. 3) and the toy recipes.
PRESETS: dict[str, dict] = {
    # synthetic world, toy CLIP (what the shipped toy runs were trained with)
    # (lr 0.05: the student starts from random weights; README, "MaskCLIP+")
    "synth": dict(dataset="synth", setting="annotation-free", student="deeplabv2-toy", augment="synth", crop=96,
                  steps=4000, batch_size=16, lr=0.05),
    # guided steps 1-2000, then self-training: a student from random weights needs half the schedule to
    # tell the unseen things apart before its own labels can be trusted (switching at 400 locks in its
    # confusion of hexagon and crescent; README, "MaskCLIP+")
    "synth_zs3": dict(dataset="synth", setting="transductive", split_set="synth_zs", student="deeplabv2-toy",
                      augment="synth", crop=96, steps=4000, batch_size=16, lr=0.05, self_training_from=2001),
    # annotation-free, ViT-B/16 teacher (Table 1: 31.1 / 18.0)
    "context59": dict(dataset="context59", setting="annotation-free", model="ViT-B-16", pretrained="openai",
                      student="deeplabv2-r101", augment="context", crop=480, steps=4000, batch_size=16, lr=0.01,
                      train_split="train"),
    "coco_stuff171": dict(dataset="coco_stuff171", setting="annotation-free", model="ViT-B-16", pretrained="openai",
                          student="deeplabv2-r101", augment="voc_coco", crop=512, steps=8000, batch_size=16,
                          lr=0.01, train_split="train"),
    "voc20": dict(dataset="voc20", setting="annotation-free", model="ViT-B-16", pretrained="openai",
                  student="deeplabv2-r101", augment="voc_coco", crop=512, steps=2000, batch_size=16, lr=0.01,
                  train_split="trainaug"),
    # transductive zero-shot, RN50 teacher (Tables 2 and 6)
    "voc_zs3": dict(dataset="voc20", setting="transductive", split_set="voc_zs3", model="RN50", pretrained="openai",
                    student="deeplabv2-r101", augment="voc_coco", crop=512, steps=20000, batch_size=16, lr=0.01,
                    self_training_from=2000, train_split="trainaug"),
    "context_zs3": dict(dataset="context60", setting="transductive", split_set="context_zs3", model="RN50",
                        pretrained="openai", student="deeplabv3plus-r101", augment="context", crop=480, steps=40000,
                        batch_size=16, lr=0.004, weight_decay=1e-4, self_training_from=4000,
                        learned_background=True, train_split="train"),
    "coco_stuff_zs3": dict(dataset="coco_stuff171", setting="transductive", split_set="coco_stuff_zs3", model="RN50",
                           pretrained="openai", student="deeplabv2-r101", augment="voc_coco", crop=512, steps=80000,
                           batch_size=16, lr=0.01, self_training_from=8000, train_split="train"),
}
# How each preset's result is evaluated (the paper's protocol: whole image, keep-ratio resize).
PRESET_INFERENCE = {
    "synth": dict(mode="whole", short_side=96), "synth_zs3": dict(mode="whole", short_side=96),
    "context59": dict(mode="whole", short_side=390),  # the official long side 520, for Context's 4:3 images
    "context_zs3": dict(mode="whole", short_side=390),
    "coco_stuff171": dict(mode="whole", short_side=512), "coco_stuff_zs3": dict(mode="whole", short_side=512),
    "voc20": dict(mode="whole", short_side=512), "voc_zs3": dict(mode="whole", short_side=512),
}


def make_config(preset: str | None = None, **overrides) -> MaskClipPlusConfig:
    """Defaults <- the preset's values <- ``overrides`` (None values in overrides are skipped)."""
    return config_from(MaskClipPlusConfig, PRESETS, preset, overrides, "MaskCLIP+")


# ---------------------------------------------------------------------------- training data
def label_function(setting: str, unlabeled: str, seen: torch.Tensor, void_from_gt: bool):
    """The map from a ground-truth label (H, W) to the training label map (-1 / 255 / class id)."""
    seen_ids = seen.nonzero().flatten()

    def annotation_free_void(gt):  # official parity: dataset void stays ignored, all else to pseudo-label
        return torch.where(gt == IGNORE_INDEX, gt, torch.full_like(gt, UNLABELED))

    def transductive(gt):
        is_seen = torch.isin(gt, seen_ids)
        if unlabeled == "unseen-gt":  # exactly the unseen-class pixels are pseudo-labelled
            return torch.where(is_seen | (gt == IGNORE_INDEX), gt, torch.full_like(gt, UNLABELED))
        return torch.where(is_seen, gt, torch.full_like(gt, UNLABELED))  # strict: all but seen labels

    def supervised(gt):  # with a split: unseen pixels ignored; without one every class is seen
        return torch.where(torch.isin(gt, seen_ids), gt, torch.full_like(gt, IGNORE_INDEX))

    if setting == "annotation-free":
        return annotation_free_void if void_from_gt else None
    return transductive if setting == "transductive" else supervised


# ---------------------------------------------------------------------------- the recipe
class MaskClipPlusRecipe(SegDatasetRecipe):
    method = "maskclip-plus"

    def __init__(self, cfg: MaskClipPlusConfig):
        self.cfg = cfg
        device = torch.device(cfg.device)
        # data first: a wrong data root or split fails before any weights are loaded
        self.train_data = self._dataset(cfg.train_split)
        self.vocab = self.train_data.vocabulary
        self._zero_shot_split()
        n = len(self.vocab)
        if cfg.setting == "transductive":
            self.candidates = self.unseen.clone() if cfg.unlabeled == "unseen-gt" else torch.ones(n, dtype=torch.bool)
        else:
            self.candidates = torch.ones(n, dtype=torch.bool)
        self.has_background = self.vocab.names[0] == "background"
        if cfg.learned_background and not self.has_background:
            raise ValueError("--learned-background needs a dataset whose class 0 is 'background' (context60)")

        pretrained = None if str(cfg.pretrained).lower() == "none" else cfg.pretrained
        if pretrained is None:  # random CLIP weights (tests, speed runs): drawn from the run's seed, so
            torch.manual_seed(cfg.seed)  # that loading the run draws the same ones again
        loaded = load_clip(cfg.model, pretrained=pretrained, device=device)
        self.clip_identity = clip_identity(cfg.model, pretrained, loaded.pretrained, random_seed=cfg.seed)
        # the Segmenter gives the cached, template-averaged text encoder and the frozen MaskCLIP teacher
        self.clip = Segmenter(loaded.model, loaded.tokenizer, method="maskclip", templates=cfg.templates,
                              mean=loaded.mean, std=loaded.std, device=device, model_id=loaded.identity,
                              key_smoothing=cfg.teacher_key_smoothing,
                              key_smoothing_mode=cfg.teacher_key_smoothing_mode)
        for p in loaded.model.parameters():
            p.requires_grad_(False)
        self.teacher: TrainingFreeModel = self.clip.model
        if cfg.crop % self.teacher.stride:
            raise ValueError(f"--crop {cfg.crop} must be a multiple of the CLIP's patch size / stride "
                             f"{self.teacher.stride} (the teacher sees the student's crop)")
        self.text_classifier = self.clip.classifier(self.vocab)  # frozen: computed once, never trained
        self.embed_dim = self.clip.backbone.embed_dim
        self._eval_seg = None

    # -- what the trainer asks for
    def build(self) -> nn.Module:
        student = build_student(self.cfg.student, self.embed_dim, weights=self.cfg.student_weights)
        return MaskClipPlusModel(student, self.embed_dim, self.cfg.crop, self.cfg.learned_background)

    def param_groups(self, module):
        # one lr for every parameter, as the official schedule; the learned background decays too
        return [{"params": [p for p in module.parameters() if p.requires_grad]}]

    def dataset(self):
        cfg = self.cfg
        augment = JointAugment(AugmentConfig(**{**asdict(AUGMENTS[cfg.augment]), "crop": cfg.crop}))
        label_fn = label_function(cfg.setting, cfg.unlabeled, self.seen, cfg.void_from_gt)
        return TrainStream(self.train_data, augment, label_fn, cfg.seed, read_labels=label_fn is not None)

    def phase(self, step: int) -> str:
        """``guided`` before ``self_training_from``, ``self-training`` from it on (1-based steps)."""
        if self.cfg.setting == "supervised":
            return "supervised"
        start = self.cfg.self_training_from
        return "self-training" if start is not None and step >= start else "guided"

    def training_step(self, module, batch, step):
        pixels, labels = batch
        features = module(pixels)
        text = self.text_classifier
        weights = unwrap(module).text_weights(text.weights.to(features.dtype), self.has_background)
        logits = class_logits(torch.einsum("bdhw,nd->bnhw", features, weights), text)
        phase = self.phase(step)
        candidates = self.candidates.to(labels.device)
        with torch.no_grad():
            if phase == "guided":
                scores = self.teacher_scores(pixels)
                labels = fill_pseudo_labels(labels, scores, candidates, self.cfg.confidence)
            elif phase == "self-training":
                labels = fill_pseudo_labels(labels, logits.detach(), candidates)
        loss = mean_over_all_pixels_ce(logits, labels)
        pseudo = (batch[1] == UNLABELED).float().mean()
        return loss, {"pseudo_share": pseudo.item(), "self_training": float(phase == "self-training")}

    @torch.no_grad()
    def teacher_scores(self, pixels: torch.Tensor) -> torch.Tensor:
        """The frozen MaskCLIP's cosine scores (B, C, h, w) on the student's crop (with KS / PD if asked)."""
        scores = self.teacher.logits(pixels, self.text_classifier)
        if self.cfg.teacher_prompt_denoising is not None:
            scores = torch.stack([prompt_denoising(s, self.cfg.teacher_prompt_denoising) for s in scores])
        return scores

    def inference_options(self, data=None) -> dict:
        """The run's inference defaults; with ``data``, how the held-out evaluation runs (the dataset's
        protocol under the preset's)."""
        cfg = self.cfg
        if data is None:
            return PRESET_INFERENCE.get(cfg.preset or "", {"mode": "whole", "short_side": cfg.crop})
        return {**data.protocol, **PRESET_INFERENCE.get(cfg.preset or "", {})}

    def export(self, module, out: Path, summary: dict) -> None:
        cfg = self.cfg
        info = {
            "method": self.method, "setting": cfg.setting, "clip": self.clip_identity,
            "model": {"student": cfg.student, "embed_dim": self.embed_dim, "crop": cfg.crop,
                      "learned_background": cfg.learned_background},
            "classes": self.vocab.names, "dataset": cfg.dataset, "split_set": cfg.split_set,
            "templates": cfg.templates,
            "inference": self.inference_options(),
            "config": asdict(cfg), "command": cfg.command or vocaseg_command(),
            **training_record(summary),
        }
        write_run(out, info, module.state_dict())
        print(f"run folder: {out} (load with --model {out}, or Segmenter.from_pretrained({str(out)!r}))")



def train_maskclip_plus(cfg: MaskClipPlusConfig) -> dict:
    """Train (or resume) a MaskCLIP+ run into ``cfg.out``; returns the trainer's summary."""
    t0 = time.time()
    summary = train(MaskClipPlusRecipe(cfg), sgd_poly_config(cfg), config_record=asdict(cfg))
    summary["wall_seconds"] = round(time.time() - t0, 1)
    return summary
