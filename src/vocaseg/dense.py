"""The one inference contract between a method and the :class:`~vocaseg.Segmenter`.

Every method, training-free or trained, is a :class:`DenseModel` that gives the Segmenter two things:

- ``classifier(vocabulary, encode_text)``: the text side of a vocabulary, computed once per
  vocabulary (``encode_text`` is the Segmenter's cached, template-averaged CLIP text encoder);
- ``logits(pixels, classifier)``: RGB pixels in [0, 1], (B, 3, H, W) -> class scores (B, C, h, w)
  on the model's output grid (H / stride).

Resizing, sliding windows, batching across images, multi-scale, postprocessing and labelling are
the Segmenter's, so ``predict``, ``segment``, ``eval``, ``score``, the bench and the app work
unchanged for every method and stay open-vocabulary through CLIP's text side.

The training-free rules (MaskCLIP, SCLIP, ClearCLIP, NACLIP, raw) are :class:`TrainingFreeModel`;
trained methods define their own model in ``vocaseg/methods``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import KEY_KINDS, RESNET_RULES, RULES, CLIPBackbone
from .vocabulary import Vocabulary

REFINE_TEMPERATURE = 100.0  # MaskCLIP's softmax(100 * cosine) for key smoothing / prompt denoising

TextEncoder = Callable[[Sequence[str]], torch.Tensor]  # names -> (N, D) normalised embeddings


@dataclass
class Classifier:
    """The text side of a vocabulary: one row of ``weights`` per name, ``owner`` = its class index."""

    weights: torch.Tensor  # (N, D)
    owner: torch.Tensor  # (N,) int64 class index of each name
    num_classes: int
    extra: dict = field(default_factory=dict)  # method-specific text-side tensors

    @classmethod
    def from_vocabulary(cls, vocab: Vocabulary, encode_text: TextEncoder, dim: int, device) -> "Classifier":
        names, owner = vocab.prompt_names()
        weights = encode_text(names) if names else torch.zeros(0, dim, device=device)
        return cls(weights, torch.tensor(owner, device=weights.device, dtype=torch.long), len(vocab))

    def class_embeddings(self) -> torch.Tensor:
        """(C, D) one embedding per class: the mean of its names' embeddings, renormalised."""
        summed = torch.zeros(self.num_classes, self.weights.shape[1], device=self.weights.device)
        return F.normalize(summed.index_add_(0, self.owner, self.weights.float()), dim=-1)


def trained_mask(vocab: Vocabulary, trained_classes, device=None) -> torch.Tensor:
    """(C,) bool: the classes of ``vocab`` with a name among ``trained_classes`` (a zero-shot run's seen
    classes, matched by normalised name, so that any vocabulary can be scored with the calibration)."""
    from .data.datasets import normalise_name

    trained = {normalise_name(n) for n in trained_classes}
    return torch.tensor([any(normalise_name(n) in trained for n in names) for names in vocab.classes],
                        dtype=torch.bool, device=device)


def class_logits(name_logits: torch.Tensor, classifier: Classifier) -> torch.Tensor:
    """(B, N, h, w) scores per name -> (B, C, h, w) per class, the max over each class's names."""
    b, _, h, w = name_logits.shape
    out = name_logits.new_full((b, classifier.num_classes, h, w), float("-inf"))
    if len(classifier.owner):
        index = classifier.owner.view(1, -1, 1, 1).expand_as(name_logits)
        out.scatter_reduce_(1, index, name_logits, "amax")
    return out


def full_precision(device: torch.device):
    """Classifier scores in float32 even inside the Segmenter's bf16/fp16 autocast."""
    return torch.autocast(device.type, enabled=False) if device.type in ("cuda", "cpu") else contextlib.nullcontext()


class DenseModel(nn.Module):
    """Base of every method's model (the inference contract; see the module docstring).

    Attributes a model sets: ``stride`` (input pixels per output cell; inputs are padded to a
    multiple of it), ``image_size`` (the native input size, the default sliding window),
    ``embed_dim`` (the text embedding width), and ``logit_scale``: ``None`` when the scores are
    cosines (the Segmenter's ``logit_scale`` option turns them into probabilities), or a fixed
    number when the model was trained to output logits (a student under cross-entropy: 1.0).
    ``pad_value``: the RGB colour padding should have (the mean colour the network normalises to 0).
    ``fine_tunes_text``: the method trains the CLIP's text tower (SegCLIP), so text embeddings cached
    for the CLIP's original weights do not hold for it.
    """

    stride: int = 1
    image_size: int = 224
    embed_dim: int = 0
    logit_scale: float | None = None
    pad_value: tuple[float, float, float] = (0.0, 0.0, 0.0)
    fine_tunes_text: bool = False

    def classifier(self, vocab: Vocabulary, encode_text: TextEncoder) -> Classifier:
        device = next(self.parameters()).device
        return Classifier.from_vocabulary(vocab, encode_text, self.embed_dim, device)

    def logits(self, pixels: torch.Tensor, classifier: Classifier) -> torch.Tensor:
        raise NotImplementedError


class TrainingFreeModel(DenseModel):
    """A frozen CLIP under one of the last-block rules (backbone.py), text embeddings as a 1x1 classifier.

    key_smoothing: MaskCLIP's key smoothing below this confidence (None: off). ``key_smoothing_mode``
    ``"official"`` (default) is what MaskCLIP's released code computes and its tables measure: ViT keys
    through ``out_proj``, each key channel L2-normalised over the window's positions; ``"paper"`` is
    Eq. 5, the cosine between per-token normalised keys.
    """

    def __init__(self, backbone: CLIPBackbone, rule: str = "maskclip", mean: Sequence[float] = (0.0, 0.0, 0.0),
                 std: Sequence[float] = (1.0, 1.0, 1.0), key_smoothing: float | None = None,
                 key_smoothing_mode: str = "official"):
        super().__init__()
        if rule not in RULES:
            raise ValueError(f"unknown method {rule!r}; choose one of {', '.join(RULES)}")
        if backbone.kind == "resnet" and rule not in RESNET_RULES:
            raise NotImplementedError(f"method {rule!r} needs a ViT image tower; ResNets support "
                                      f"{' and '.join(RESNET_RULES)}")
        if key_smoothing_mode not in KEY_KINDS:
            raise ValueError(f"key_smoothing_mode must be one of {KEY_KINDS}, not {key_smoothing_mode!r}")
        self.backbone, self.rule = backbone, rule
        self.key_smoothing, self.key_smoothing_mode = key_smoothing, key_smoothing_mode
        self.stride, self.image_size, self.embed_dim = backbone.stride, backbone.image_size, backbone.embed_dim
        self.pad_value = tuple(float(m) for m in mean)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def logits(self, pixels: torch.Tensor, classifier: Classifier) -> torch.Tensor:
        ks = self.key_smoothing is not None
        out = self.backbone.dense((pixels - self.mean) / self.std, self.rule,
                                  keys=self.key_smoothing_mode if ks else None)
        with full_precision(pixels.device):
            scores = class_logits(torch.einsum("bdhw,nd->bnhw", out.features.float(), classifier.weights.float()),
                                  classifier)
            if ks:
                scores = key_smoothing(scores.clamp_min(-1.0), out.keys.float(), self.key_smoothing,
                                       self.key_smoothing_mode)
        return scores


def key_smoothing(logits: torch.Tensor, keys: torch.Tensor, threshold: float, mode: str = "official") -> torch.Tensor:
    """MaskCLIP key smoothing on one batch of windows: logits (B,C,h,w), keys (B,h*w,K) -> logits.

    With p = softmax(100 * logits), where max_c p is below ``threshold`` (1.0: everywhere), p_i
    becomes sum_j w_ij p_j, with w = k k^T of the keys normalised per token (``mode="paper"``,
    Eq. 5: cosine similarity) or per channel over the positions (``mode="official"``: MaskCLIP's
    code normalises its (N, hw, C) keys along dim 1). Returned as log(p / sum p) / 100, so the
    Segmenter's logit scale keeps its meaning; the smoothed scores are floored at 1e-8 first
    (w can be negative), which leaves the argmax unchanged wherever a class scores above it.
    """
    if mode not in KEY_KINDS:
        raise ValueError(f"key smoothing mode must be one of {KEY_KINDS}, not {mode!r}")
    b, c, h, w = logits.shape
    k = F.normalize(keys.float(), dim=-1 if mode == "paper" else 1)
    p = torch.softmax(REFINE_TEMPERATURE * logits.flatten(2), dim=1)  # (B, C, N)
    smoothed = torch.einsum("bnk,bmk,bcm->bcn", k, k, p).clamp_min(1e-8)
    smoothed = torch.log(smoothed / smoothed.sum(1, keepdim=True)) / REFINE_TEMPERATURE
    low = p.max(1, keepdim=True).values < threshold
    return torch.where(low, smoothed, logits.flatten(2)).reshape(b, c, h, w)
