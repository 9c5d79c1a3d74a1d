"""Training-free segmentation: the Segmenter API, whole / sliding-window / multi-scale inference.

Pipeline for a batch of images (all steps on ``device``):
1. keep-ratio resize so the short side is ``short_side`` (long side at most ``max_long_side``);
2. cut every image into windows (``slide``) or take it whole (padded to the patch stride); windows
   of *all* images go through the backbone together, ``batch_size`` at a time;
3. per window: cosine logits against the text classifier (max over a class's synonyms), optional
   key smoothing, bilinear upsampling to the window's pixels, averaging where windows overlap;
4. per image: multi-scale average, prompt denoising, area threshold, optional PAMR;
5. at the original size: ``softmax(logit_scale * logits)``, probability threshold -> background.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from functools import cached_property
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .backbone import KEY_KINDS, RULES, CLIPBackbone
from .dense import REFINE_TEMPERATURE, Classifier, DenseModel, TrainingFreeModel
from .images import ImageInput, read_image
from .vocabulary import TextEmbeddingCache, Vocabulary, resolve_templates, tokenize_prompts

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# Dropped classes (-inf) become this before any interpolation (inf - inf is NaN); far below any real
# score, cosine or trained logit, so it never wins an argmax against a class that was kept.
LOGIT_FLOOR = -1e4


@dataclass(frozen=True)
class InferenceConfig:
    """How images are fed to the model and how scores become labels.

    short_side: resize so the short side is this many pixels (None: keep the size; 0: 1.5x the
        model's input size, which is SCLIP's 336 for a 224 model).
    mode: ``slide`` (windows of ``window`` px every ``stride`` px) or ``whole`` (one pass per image).
    window / stride: None means the model's input size / half of it.
    scales: multi-scale factors applied to ``short_side``; logits are averaged.
    key_smoothing: MaskCLIP key smoothing where the max class probability is below this threshold
        (``True``: 1.0, i.e. everywhere, as MaskCLIP's code), or None for off.
    key_smoothing_mode: ``official`` (MaskCLIP's code: ViT keys through out_proj, normalised over
        positions) or ``paper`` (Eq. 5: per-token cosine of the keys).
    prompt_denoising: drop classes whose max probability is below this (``True``: 0.5), None for off.
    pamr: pixel-adaptive mask refinement on the probabilities, guided by the image.
    logit_scale: softmax temperature for cosine scores; a trained model that outputs logits
        (``DenseModel.logit_scale`` set) uses its own scale instead.
    calibration: zero-shot runs trained on seen classes only (CLIP-RC, CLIPTeacher): how much the
        scores of the classes the run was trained on are lowered against the others (equivalently,
        unseen ones raised), instead of the run's own value (CLIP-RC 0.1, CLIPTeacher 1.5). None: the
        run's own. Choose it on validation data, never on the test split.
    ensemble: CLIP-RC runs: beta of the geometric ensemble of the head with the cosine scores of its
        own prompted features for the classes the run was not trained on (FC-CLIP's rule, not in the
        CLIP-RC paper; ``ClipRcModel.logits``). 0 / None: the paper's inference.
    compile: run the model's forward through ``torch.compile`` (inductor). The first call of each new
        input shape compiles (tens of seconds); the same numbers within float rounding afterwards.
        On the CPU the weights are frozen into the compiled code (inductor's ``freezing``: constant
        folding, pre-packed matrix weights), so a model whose weights change afterwards needs a new
        Segmenter. Off by default: about 3 % faster end to end on a 2-core CPU, where the forward is
        already near the matrix-product limit; not yet measured on a GPU (README, Speed).
    """

    mode: str = "slide"
    short_side: int | None = 0
    max_long_side: int = 2048
    window: int | None = None
    stride: int | None = None
    scales: tuple[float, ...] = (1.0,)
    logit_scale: float = 40.0
    prob_threshold: float | None = None
    area_threshold: float | None = None
    key_smoothing: float | None = None
    key_smoothing_mode: str = "official"
    prompt_denoising: float | None = None
    pamr: bool = False
    batch_size: int | None = None  # windows per forward; None: 4 on a CPU, 128 on a GPU
    # auto: bf16 autocast on CUDA, float32 on CPU; or fp32 / bf16 / fp16; int8: the CPU's dynamic
    # int8 quantisation of the image tower's Linears (training-free methods, ViT towers; quantize.py)
    precision: str = "auto"
    calibration: float | None = None
    ensemble: float | None = None
    compile: bool = False

    def __post_init__(self):
        if self.mode not in ("slide", "whole"):
            raise ValueError(f"mode must be 'slide' or 'whole', not {self.mode!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.key_smoothing_mode not in KEY_KINDS:
            raise ValueError(f"key_smoothing_mode must be one of {KEY_KINDS}, not {self.key_smoothing_mode!r}")
        for name, default in (("key_smoothing", 1.0), ("prompt_denoising", 0.5)):  # True: on, default threshold
            value = getattr(self, name)
            if value is True:
                object.__setattr__(self, name, default)
            elif value is False:
                object.__setattr__(self, name, None)
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))
        if self.ensemble is not None and not 0 <= self.ensemble <= 1:
            raise ValueError(f"ensemble is a weight in [0, 1] (the cosine branch's share), not {self.ensemble}")


PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
CONFIG_FIELDS = {f.name for f in fields(InferenceConfig)}


@dataclass
class SegmentationResult:
    """Per-image output. ``labels``/``probs`` are computed at the input size on first access."""

    classes: list[str]
    size: tuple[int, int]  # (H, W) of the input image
    logits: torch.Tensor  # (C, h, w) cosine scores at the processing resolution
    logit_scale: float
    prob_threshold: float | None = None
    background_index: int | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    def _full_resolution(self, dtype: torch.dtype = torch.int64) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Labels (and probabilities, when wanted) at the input size, computed once; ``dtype``: the
        labels' type when they have to be computed now (a cached map keeps the type it was made in)."""
        if "labels" not in self._cache:
            labels, probs = upsample_and_label(self.logits, self.size, self.logit_scale, self.prob_threshold,
                                               self.background_index, keep_probs="probs_wanted" in self._cache,
                                               dtype=dtype)
            self._cache["labels"], self._cache["probs"] = labels, probs
        return self._cache["labels"], self._cache["probs"]

    def labels_tensor(self) -> torch.Tensor:
        """(H, W) int64 on the logits' device (for metrics that stay on the GPU)."""
        return self._full_resolution()[0].long()

    @cached_property
    def labels(self) -> np.ndarray:
        """(H, W) int64 indices into ``classes``."""
        return self.labels_tensor().cpu().numpy()

    @cached_property
    def labels_compact(self) -> np.ndarray:
        """The same indices as :attr:`labels` in the smallest integer type that keeps the label PNGs'
        ignore value 255 free (:func:`compact_label_dtype`; uint8 up to 255 classes): an eighth of the
        memory, for huge photos (``vocaseg segment`` writes from it). Ask for it first and ``labels``
        is never made at full size."""
        dtype = compact_label_dtype(len(self.classes))
        return self._full_resolution(dtype)[0].to(dtype).cpu().numpy()

    @cached_property
    def probs(self) -> np.ndarray:
        """(C, H, W) float32 softmax probabilities (C x H x W memory: ask only when needed)."""
        if self._cache.get("probs") is None:
            self._cache.pop("labels", None)
            self._cache["probs_wanted"] = True
        return self._full_resolution()[1].cpu().numpy()

    def fractions(self) -> dict[str, float]:
        """Share of the image's pixels given to each class."""
        from .visualize import label_counts

        labels = self.labels_compact
        counts = label_counts(labels, minlength=len(self.classes))
        return {name: float(c) / labels.size for name, c in zip(self.classes, counts)}


def compact_label_dtype(num_classes: int) -> torch.dtype:
    """uint8 for up to 255 classes (255 stays free: the ignore value of label PNGs), else int16 / int32."""
    if num_classes <= 255:
        return torch.uint8
    return torch.int16 if num_classes <= 32767 else torch.int32


def upsample_and_label(logits: torch.Tensor, size: tuple[int, int], logit_scale: float,
                       prob_threshold: float | None, background_index: int | None,
                       keep_probs: bool = False, max_elements: int = 1 << 22, dtype: torch.dtype = torch.int64):
    """Bilinear upsampling to ``size`` (== F.interpolate, align_corners=False), argmax (through the softmax
    when probabilities or a probability threshold are wanted).

    Works in horizontal strips through grid_sample so that memory stays bounded for huge images;
    ``dtype`` is the labels' (uint8 keeps a 48-megapixel map at 48 MB instead of 384).
    """
    c, h, w = logits.shape
    height, width = size
    rows_per_strip = max(1, max_elements // max(1, c * width))
    xs = (torch.arange(width, device=logits.device, dtype=torch.float32) + 0.5) * (w / width) - 0.5
    xs = (2 * xs.clamp(min=0) + 1) / w - 1
    labels = torch.empty((height, width), dtype=dtype, device=logits.device)
    probs = torch.empty((c, height, width), dtype=torch.float32, device=logits.device) if keep_probs else None
    source = logits.float().unsqueeze(0)
    for r0 in range(0, height, rows_per_strip):
        r1 = min(height, r0 + rows_per_strip)
        ys = (torch.arange(r0, r1, device=logits.device, dtype=torch.float32) + 0.5) * (h / height) - 0.5
        ys = (2 * ys.clamp(min=0) + 1) / h - 1
        grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij")[::-1], dim=-1).unsqueeze(0)
        strip = F.grid_sample(source, grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
        thresholded = prob_threshold is not None and background_index is not None
        if not (thresholded or probs is not None):  # the argmax needs no softmax
            labels[r0:r1] = strip.argmax(0)
            continue
        p = torch.softmax(logit_scale * strip, dim=0)
        conf, lab = p.max(0)
        if thresholded:
            lab = lab.masked_fill(conf < prob_threshold, background_index)
        labels[r0:r1] = lab
        if probs is not None:
            probs[:, r0:r1] = p
    return labels, probs


def label_batch(logits: torch.Tensor, size: tuple[int, int], logit_scale: float, prob_threshold: float | None,
                background_index: int | None, max_elements: int = 1 << 26) -> torch.Tensor | None:
    """Labels of same-size images at once: (N, C, h, w) -> (N, H, W) int64, as :func:`upsample_and_label`
    gives one by one (argmax of the upsampled scores; the softmax only when a probability threshold
    needs it). None when the upsampled scores would exceed ``max_elements`` (huge images keep the
    lazy, strip-wise path)."""
    n, c = logits.shape[:2]
    per_image = c * size[0] * size[1]
    if per_image > max_elements:
        return None
    out = []
    step = max(1, max_elements // per_image)
    for s in range(0, n, step):
        part = logits[s:s + step].float()
        if not part.is_cuda:  # class-innermost memory: the CPU's reduction over classes is 7x faster
            part = part.contiguous(memory_format=torch.channels_last)
        up = F.interpolate(part, size=size, mode="bilinear", align_corners=False)
        if prob_threshold is not None and background_index is not None:
            conf, lab = torch.softmax(logit_scale * up, dim=1).max(1)
            lab = lab.masked_fill(conf < prob_threshold, background_index)
        else:
            lab = up.argmax(1)
        out.append(lab)
    return torch.cat(out)


def resize_short_side(h: int, w: int, short: int | None, max_long: int) -> tuple[int, int]:
    """Keep-ratio size with the short side ``short`` (None: unchanged); the long side never exceeds
    ``max_long``, so memory stays bounded for huge inputs."""
    scale = min(short / min(h, w) if short else 1.0, max_long / max(h, w))
    if scale == 1.0:
        return h, w
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Window offsets along one axis (mmsegmentation's slide rule: last window flush with the edge)."""
    n = max(length - window + stride - 1, 0) // stride + 1
    return sorted({max(min(i * stride, length - window), 0) for i in range(n)})


def prompt_denoising(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """MaskCLIP PD on one image: logits (C,h,w); classes whose max prob is below t are dropped."""
    p = torch.softmax(REFINE_TEMPERATURE * logits, dim=0)
    keep = p.flatten(1).max(1).values >= threshold
    if not keep.any():
        keep[p.flatten(1).max(1).values.argmax()] = True
    return logits.masked_fill(~keep[:, None, None], float("-inf"))


def pamr(image: torch.Tensor, probs: torch.Tensor, iterations: int = 10,
         dilations: Sequence[int] = (1, 2, 4, 8, 12, 24)) -> torch.Tensor:
    """Pixel-adaptive mask refinement (Araslanov & Roth, 2020): propagate probabilities to
    neighbours of similar colour. image (3,h,w) float, probs (C,h,w) -> refined (C,h,w)."""

    def neighbours(x: torch.Tensor) -> torch.Tensor:  # (K,h,w) -> (K, 8*len(dilations), h, w)
        out = []
        for d in dilations:
            padded = F.pad(x[None], (d, d, d, d), mode="replicate")[0]
            h, w = x.shape[-2:]
            for dy in (-d, 0, d):
                for dx in (-d, 0, d):
                    if dy or dx:
                        out.append(padded[:, d + dy:d + dy + h, d + dx:d + dx + w])
        return torch.stack(out, dim=1)

    img = image.float()
    diff = (neighbours(img) - img[:, None]).abs()  # (3, K, h, w)
    std = neighbours(img).std(dim=1, keepdim=True) + 1e-8
    affinity = torch.softmax(-(diff / (0.1 * std)).mean(0), dim=0)  # (K, h, w)
    for _ in range(iterations):
        probs = (neighbours(probs) * affinity[None]).sum(1)
    return probs


class Segmenter:
    """Open-vocabulary segmentation with CLIP: name the classes, get a label map.

    The method is a :class:`~vocaseg.dense.DenseModel` (the inference contract): a training-free
    rule over a frozen CLIP, or a trained method loaded from a run folder. Either way the text side
    is this CLIP's, so any class names work.

    >>> seg = Segmenter.from_pretrained("toy")                 # doctest: +SKIP
    >>> res = seg.predict("street.jpg", classes=["car", "road", "tree, bush"])  # doctest: +SKIP
    >>> res.labels.shape, res.probs.shape                      # doctest: +SKIP
    """

    def __init__(self, clip_model: torch.nn.Module, tokenizer, method: str | None = None,
                 templates: Sequence[str] | str | None = None, *, mean: Sequence[float] = OPENAI_MEAN,
                 std: Sequence[float] = OPENAI_STD, device: str | torch.device | None = None,
                 model_id: str | None = None, cache_dir: str | None = None, model: DenseModel | None = None,
                 **config):
        unknown = set(config) - CONFIG_FIELDS
        if unknown:
            raise TypeError(f"unknown option(s) {sorted(unknown)}; options are {sorted(CONFIG_FIELDS)}")
        if device is None:
            device = next(clip_model.parameters()).device
        self.device = torch.device(device)
        self.backbone = CLIPBackbone(clip_model.to(self.device).eval())
        self.tokenizer = tokenizer
        self.templates = resolve_templates(templates)
        self.config = InferenceConfig(**config)
        self.mean = torch.tensor(mean, device=self.device).view(3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(3, 1, 1)
        # text embeddings go to disk only when the weights have a stable identity (tag or file)
        self.model_id = model_id
        self.text_cache = TextEmbeddingCache(cache_dir, enabled=model_id is not None)
        self.trained = model.to(self.device).eval() if model is not None else None  # a trained method, if any
        self._models: dict = {}  # training-free models by (rule, key smoothing), shared by with_options views
        self._classifiers: dict = {}  # their text sides by vocabulary, shared likewise
        self.method = method or (model.name if model is not None else "maskclip")
        self.model  # noqa: B018 - fail now on an unknown method or a rule the tower cannot run

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, name: str, pretrained: str | None = "default", method: str | None = None,
                        device: str | torch.device = "cpu", templates: Sequence[str] | str | None = None,
                        cache_dir: str | None = None, quick_gelu: bool | None = None, **config) -> "Segmenter":
        """Load a model by name: an open_clip architecture with ``pretrained`` weights (a tag or a file),
        ``"toy"`` (the small CLIP shipped with vocaseg), a run folder written by ``vocaseg train``, or
        a shipped run's name (``toy-maskclip-plus`` ...). ``method`` defaults to ``maskclip`` for a CLIP
        and to the trained method for a run; a run can also be asked for a training-free rule."""
        from .loading import load_clip
        from .runs import find_run, load_run

        run = find_run(name)
        if run is not None:
            return load_run(run, device=device, method=method, templates=templates, cache_dir=cache_dir,
                            pretrained=pretrained, **config)
        method = method or "maskclip"
        if method not in RULES:  # fail before loading any weights
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(RULES)} "
                             "(trained methods load from a run folder: --model runs/NAME)")
        loaded = load_clip(name, pretrained=pretrained, device=device, quick_gelu=quick_gelu)
        return cls(loaded.model, loaded.tokenizer, method=method, templates=templates, mean=loaded.mean,
                   std=loaded.std, device=device, model_id=loaded.identity, cache_dir=cache_dir, **config)

    def with_options(self, method: str | None = None, **config) -> "Segmenter":
        """A view of this segmenter with other inference options (shares the models and text cache)."""
        other = object.__new__(Segmenter)
        other.__dict__.update(self.__dict__)
        other.config = replace(self.config, **config)
        if method is not None:
            other.method = method
            other.model  # noqa: B018 - validate now
        return other

    def with_model(self, model: DenseModel, **config) -> "Segmenter":
        """A view of this segmenter running ``model`` (a trained method on this CLIP's text side)."""
        other = self.with_options(**config)
        other.trained, other.method = model.to(self.device).eval(), model.name
        return other

    @property
    def methods(self) -> list[str]:
        """The methods this segmenter can run: the training-free rules its tower supports, and its trained one."""
        rules = [r for r in RULES if self.backbone.kind == "vit" or r in ("maskclip", "raw")]
        return rules + ([self.trained.name] if self.trained is not None else [])

    @property
    def model(self) -> DenseModel:
        """The :class:`~vocaseg.dense.DenseModel` that ``method`` names."""
        int8 = self.config.precision == "int8"
        if self.trained is not None and self.method == self.trained.name:
            if int8:
                raise ValueError("precision int8 quantises the CLIP image tower of the training-free methods; "
                                 f"run the trained {self.trained.name} in fp32 (or bf16/fp16 on a GPU)")
            if self.config.ensemble and not getattr(self.trained, "supports_ensemble", False):
                raise ValueError(f"ensemble applies to CLIP-RC runs; this is a {self.trained.name} run "
                                 "(drop --ensemble)")
            return self.trained
        if self.config.ensemble:
            raise ValueError(f"ensemble applies to trained CLIP-RC runs, not the training-free {self.method} "
                             "(drop --ensemble, or load a run with --model RUN)")
        if self.method not in RULES:
            raise ValueError(f"unknown method {self.method!r}; this segmenter runs {', '.join(self.methods)}")
        cfg = self.config
        key = (self.method, cfg.key_smoothing, cfg.key_smoothing_mode, int8)
        if key not in self._models:
            self._models[key] = TrainingFreeModel(self._int8_backbone() if int8 else self.backbone, self.method,
                                                  self.mean.flatten().tolist(), self.std.flatten().tolist(),
                                                  cfg.key_smoothing, cfg.key_smoothing_mode).to(self.device)
        return self._models[key]

    def _int8_backbone(self) -> CLIPBackbone:
        """The backbone over an int8 copy of the image tower, made once and shared by every view."""
        if self.device.type != "cpu":
            raise ValueError(f"precision int8 runs on the CPU (torch's dynamic quantisation); on {self.device} use "
                             "bf16 or fp16")
        if "int8-backbone" not in self._models:
            from .quantize import quantize_image_tower

            self._models["int8-backbone"] = CLIPBackbone(self.backbone.clip, quantize_image_tower(self.backbone.visual))
        return self._models["int8-backbone"]

    @property
    def logit_scale(self) -> float:
        """The softmax temperature in use: the model's own when it outputs logits, else the option's."""
        return self.model.logit_scale if self.model.logit_scale is not None else self.config.logit_scale

    # ------------------------------------------------------------------ encoders
    @torch.no_grad()
    def encode_text(self, names: Sequence[str]) -> torch.Tensor:
        """(len(names), D) float32, L2-normalised, averaged over the templates (each name as given)."""
        out = [None] * len(names)
        missing = []
        for i, name in enumerate(names):
            key = TextEmbeddingCache.key(self.model_id or f"unsaved-{id(self.backbone)}", self.templates, name)
            hit = self.text_cache.get(key)
            if hit is None:
                missing.append((i, name, key))
            else:
                out[i] = hit.to(self.device)
        if missing:
            tokens = tokenize_prompts(self.tokenizer, self.templates, [name for _, name, _ in missing])
            chunk = 2048 if self.device.type == "cuda" else 256
            feats = []
            for start in range(0, len(tokens), chunk):
                feats.append(self.backbone.encode_text(tokens[start:start + chunk].to(self.device, non_blocking=True)))
            feats = torch.cat(feats).view(len(missing), len(self.templates), -1)
            emb = F.normalize(feats.mean(1), dim=-1)
            for (i, _, key), e in zip(missing, emb):
                self.text_cache.put(key, e)
                out[i] = e
        return torch.stack(out).float()

    def _autocast(self):
        prec = self.config.precision
        if self.device.type == "cuda" and prec != "fp32":
            dtype = torch.float16 if prec == "fp16" else torch.bfloat16
            return torch.autocast("cuda", dtype=dtype)
        if prec in ("bf16",) and self.device.type == "cpu":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1], (..., 3, H, W) -> the CLIP's input (its mean/std), as ``encode_dense`` expects."""
        return (pixels.to(self.device) - self.mean) / self.std

    @torch.no_grad()
    def encode_dense(self, pixels: torch.Tensor) -> torch.Tensor:
        """CLIP dense features under a training-free rule (``method``, or ``maskclip`` for a trained
        segmenter): pixels (B,3,H,W), normalised with ``normalize`` -> (B, D, H/p, W/p), L2-normalised."""
        rule = self.method if self.method in RULES else "maskclip"
        with self._autocast():
            return self.backbone.dense(pixels.to(self.device), rule).features.float()

    # ------------------------------------------------------------------ prediction
    def vocabulary(self, classes: Sequence[str] | str | Vocabulary,
                   background: bool | Sequence[str] | None = None) -> Vocabulary:
        vocab = classes if isinstance(classes, Vocabulary) else Vocabulary.parse(classes)
        if background:
            vocab = vocab.with_background(("background",) if background is True else tuple(background))
        elif self.config.prob_threshold is not None and "background" not in vocab.names:
            vocab = vocab.with_background(())  # a class that only the probability threshold assigns
        return vocab

    def predict(self, image: ImageInput, classes: Sequence[str] | str | Vocabulary,
                background: bool | Sequence[str] | None = None) -> SegmentationResult:
        """Segment one image (path, PIL image or HxWx3 uint8 array) into ``classes``."""
        return self.predict_batch([image], classes, background)[0]

    @torch.no_grad()
    def predict_batch(self, images: Sequence[ImageInput], classes: Sequence[str] | str | Vocabulary,
                      background: bool | Sequence[str] | None = None) -> list[SegmentationResult]:
        """Segment many images at once; all their windows share forward passes."""
        vocab = self.vocabulary(classes, background)
        arrays = [read_image(im) for im in images]
        return self.segment_arrays(arrays, vocab)

    def classifier(self, vocab: Vocabulary) -> Classifier:
        """The model's text side for ``vocab`` (text embeddings come from the cache when they can).

        A frozen CLIP's is kept per vocabulary (a few), so a stream of batches builds it once; a
        trained model's is rebuilt every call, since training may change it."""
        model = self.model
        if not isinstance(model, TrainingFreeModel):
            return model.classifier(vocab, self.encode_text)
        key = (id(model), self.templates, vocab)
        cache = self._classifiers
        if key not in cache:
            if len(cache) >= 8:
                cache.clear()
            cache[key] = model.classifier(vocab, self.encode_text)
        return cache[key]

    def _batch_size(self) -> int:
        """Windows per forward: the option, or 4 on a CPU (1 to 16 run within 10 % of each other
        there; 4 holds the least memory of the fastest) and 128 on a GPU (large batches are what
        keep its matrix units busy: 1113 images/s against 843 at 64 on an H200; README: Speed)."""
        if self.config.batch_size:
            return self.config.batch_size
        return 128 if self.device.type == "cuda" else 4

    def _grid_logits(self, pixels: torch.Tensor, classifier: Classifier) -> torch.Tensor:
        """(B,3,H,W) RGB windows in [0, 1] -> (B, C, H/stride, W/stride) float32 scores on the model's grid."""
        inside = {}  # options the model applies itself
        if self.config.ensemble:  # the ensemble takes calibrated scores: the calibration goes in too
            inside["ensemble"] = self.config.ensemble
            if self.config.calibration is not None:
                inside["calibration"] = self.config.calibration
        with self._autocast():
            logits = self._forward()(pixels, classifier, **inside)
        logits = logits.float()
        seen = classifier.extra.get("seen") if classifier.extra else None
        if self.config.calibration is not None and seen is not None and "calibration" not in inside:
            # replaces the run's own calibration
            shift = getattr(self.model, "calibration", 0.0) - self.config.calibration
            logits = logits + shift * seen.to(logits.device).float().view(1, -1, 1, 1)
        return logits.clamp_min(LOGIT_FLOOR)

    def _forward(self):
        """The model's ``logits``, compiled once per model and shared by every view when ``compile`` is on."""
        model = self.model
        if not self.config.compile:
            return model.logits
        key = ("compiled", id(model), self.config.precision)
        if key not in self._models:
            options = {"freezing": True} if self.device.type == "cpu" else None
            # static shapes: a graph specialised to each input size; whole images of many sizes compile each,
            # up to dynamo's recompile limit (8), after which that call runs eager with a warning
            self._models[key] = torch.compile(model.logits, dynamic=False, options=options)
        return self._models[key]

    def _window_logits(self, pixels: torch.Tensor, classifier: Classifier) -> torch.Tensor:
        """(B,3,H,W) RGB windows in [0, 1] -> (B, C, H, W) scores, upsampled to the window's pixels."""
        return F.interpolate(self._grid_logits(pixels, classifier), size=pixels.shape[-2:], mode="bilinear",
                             align_corners=False)

    def _prepare(self, array: np.ndarray, short_side: int | None) -> torch.Tensor:
        return self._resize(self._upload([array]), short_side)[0]

    def _upload(self, arrays: Sequence[np.ndarray]) -> torch.Tensor:
        """Same-size (H, W, 3) uint8 arrays -> (N, 3, H, W) uint8 on the device (one copy); :meth:`_resize`
        makes them float RGB in [0, 1]."""
        if self.device.type == "cuda":  # stacked straight into pinned memory: one copy, then an async upload
            stacked = torch.empty((len(arrays),) + arrays[0].shape, dtype=torch.uint8, pin_memory=True)
            np.stack(arrays, out=stacked.numpy())
        else:
            stacked = torch.from_numpy(np.stack(arrays) if len(arrays) > 1 else np.require(arrays[0], requirements="W")[None])
        return stacked.to(self.device, non_blocking=True).permute(0, 3, 1, 2)

    def _resize(self, images: torch.Tensor, short_side: int | None) -> torch.Tensor:
        h, w = images.shape[-2:]
        nh, nw = resize_short_side(h, w, short_side, self.config.max_long_side)
        if (nh, nw) == (h, w):
            return images.float().div_(255)
        if images.shape[1] > 1 and images.numel() > 3 << 22:  # a huge photo: one colour channel at a time in float (the same arithmetic)
            return torch.cat([self._resize(images[:, c:c + 1], short_side) for c in range(images.shape[1])], dim=1)
        images = images.float().div_(255)
        return F.interpolate(images, size=(nh, nw), mode="bilinear", align_corners=False, antialias=nh < h).clamp_(0, 1)

    def _geometry(self) -> tuple[int | None, int, int]:
        """The options as sizes: (short side at scale 1, sliding window, window stride)."""
        cfg, native = self.config, self.model.image_size
        window = cfg.window or native
        return int(round(1.5 * native)) if cfg.short_side == 0 else cfg.short_side, window, cfg.stride or max(1, window // 2)

    def _windows_per_image(self, size: tuple[int, int]) -> int:
        """The windows an (H, W) image is cut into at scale 1 (one for whole-image inference)."""
        if self.config.mode == "whole":
            return 1
        base_short, window, stride = self._geometry()
        h, w = resize_short_side(*size, base_short, self.config.max_long_side)
        return len(window_starts(h, window, stride)) * len(window_starts(w, window, stride))

    @torch.no_grad()
    def segment_arrays(self, arrays: list[np.ndarray], vocab: Vocabulary) -> list[SegmentationResult]:
        """Segment decoded (H, W, 3) uint8 arrays with a parsed vocabulary (what predict_batch calls).

        Images go in chunks of about one forward's worth of windows (so memory stays bounded however
        many images come); inside a chunk, images of the same size are resized, cut into windows and
        accumulated as one tensor (a Python loop over window *positions*, never over windows), and
        the windows of all its images share the forwards."""
        window = self._geometry()[1]
        if self.config.mode == "slide" and window % self.model.stride:
            raise ValueError(f"window {window} must be a multiple of the model's stride {self.model.stride}")
        classifier = self.classifier(vocab)
        batch = self._batch_size()
        results: list[SegmentationResult | None] = [None] * len(arrays)
        chunk, windows = [], 0
        for i, array in enumerate(arrays):
            chunk.append(i)
            windows += self._windows_per_image(array.shape[:2])
            if windows >= batch or i == len(arrays) - 1:
                self._segment_chunk(arrays, chunk, classifier, vocab, results)
                chunk, windows = [], 0
        return results

    def _segment_chunk(self, arrays, indices, classifier, vocab, results):
        """Segment ``arrays[indices]`` (one chunk) into ``results`` at those indices."""
        cfg, model, batch = self.config, self.model, self._batch_size()
        base_short, window, stride = self._geometry()
        background = 0 if vocab.names and vocab.names[0] == "background" else None
        step = model.stride
        pad = torch.tensor(model.pad_value, dtype=torch.float32).view(1, 3, 1, 1).to(self.device, non_blocking=True)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i in indices:
            by_size.setdefault(tuple(arrays[i].shape[:2]), []).append(i)
        groups = []  # per size: image indices, base-scale images (N,3,h,w), summed logits over scales
        for size, members in by_size.items():
            pixels = self._upload([arrays[i] for i in members])
            groups.append({"members": members, "pixels": pixels, "base": self._resize(pixels, base_short),
                           "logits": None})
        for scale in cfg.scales:
            short = None if base_short is None else max(step, int(round(base_short * scale)))
            # every group's windows, position-major: window p*N + n is position p of image n
            jobs: dict[tuple[int, int], list] = {}
            for g in groups:
                images = g["base"] if scale == 1.0 else self._resize(g["pixels"], short)
                n, _, h, w = images.shape
                if cfg.mode == "whole":
                    ph, pw = math.ceil(h / step) * step, math.ceil(w / step) * step
                    positions, shape = [(0, 0)], (ph, pw)
                else:
                    positions = [(y, x) for y in window_starts(h, window, stride) for x in window_starts(w, window, stride)]
                    ph, pw = max(h, window), max(w, window)
                    shape = (window, window)
                if (ph, pw) != (h, w):  # padding takes the colour the network normalises to zero
                    padded = pad.expand(n, 3, ph, pw).clone()
                    padded[:, :, :h, :w] = images
                    images = padded
                crops = torch.cat([images[:, :, y:y + shape[0], x:x + shape[1]] for y, x in positions])
                g["scale"] = {"size": (h, w), "positions": positions, "shape": shape}
                jobs.setdefault(shape, []).append((g, crops))
            for shape, members in jobs.items():
                crops = torch.cat([c for _, c in members]) if len(members) > 1 else members[0][1]
                grid = torch.cat([self._grid_logits(crops[s:s + batch], classifier) for s in range(0, len(crops), batch)])
                offset = 0
                for g, c in members:
                    self._accumulate(g, grid[offset:offset + len(c)], shape)
                    offset += len(c)
        per_image_steps = cfg.prompt_denoising is not None or cfg.area_threshold is not None or cfg.pamr
        for g in groups:
            logits = g["logits"] / len(cfg.scales) if len(cfg.scales) > 1 else g["logits"]
            if not per_image_steps:
                logits = logits.clamp_min(LOGIT_FLOOR)
            else:
                logits = torch.stack([self._postprocess(lg, im, background) for lg, im in zip(logits, g["base"])])
            size = tuple(arrays[g["members"][0]].shape[:2])
            labels = label_batch(logits, size, self.logit_scale, cfg.prob_threshold, background)
            for k, i in enumerate(g["members"]):
                res = SegmentationResult(classes=vocab.names, size=size, logits=logits[k], logit_scale=self.logit_scale,
                                         prob_threshold=cfg.prob_threshold, background_index=background)
                if labels is not None:
                    res._cache["labels"], res._cache["probs"] = labels[k], None
                results[i] = res

    def _accumulate(self, group: dict, grid: torch.Tensor, shape: tuple[int, int]) -> None:
        """Upsample one scale's window scores (position-major) and average them into the group's logits."""
        info = group["scale"]
        h, w = info["size"]
        n = group["base"].shape[0]
        if len(info["positions"]) == 1:  # whole image, or one window: nothing to average (the same numbers)
            if not grid.is_cuda:  # class-innermost, as label_batch wants it on the CPU: saves a copy at full size
                grid = grid.contiguous(memory_format=torch.channels_last)
            up = F.interpolate(grid, size=shape, mode="bilinear", align_corners=False)
            logits = up[:, :, :h, :w]
        else:
            canvas = grid.new_zeros((n, grid.shape[1], h, w))
            count = grid.new_zeros((1, 1, h, w))
            for p, (y, x) in enumerate(info["positions"]):
                up = F.interpolate(grid[p * n:(p + 1) * n], size=shape, mode="bilinear", align_corners=False)
                ch, cw = min(shape[0], h - y), min(shape[1], w - x)
                canvas[:, :, y:y + ch, x:x + cw] += up[:, :, :ch, :cw]
                count[:, :, y:y + ch, x:x + cw] += 1
            logits = canvas / count
        target = group["base"].shape[-2:]
        if logits.shape[-2:] != target:
            logits = F.interpolate(logits, size=target, mode="bilinear", align_corners=False)
        group["logits"] = logits if group["logits"] is None else group["logits"] + logits

    def _postprocess(self, logits: torch.Tensor, image: torch.Tensor, background: int | None) -> torch.Tensor:
        cfg = self.config
        if cfg.prompt_denoising is not None:
            logits = prompt_denoising(logits, cfg.prompt_denoising)
        if cfg.area_threshold is not None:
            # SCLIP: a class predicted on less than this share of the image is removed
            pred = logits.argmax(0)
            share = torch.bincount(pred.flatten(), minlength=logits.shape[0]).float() / pred.numel()
            small = share < cfg.area_threshold
            if background is not None:
                small[background] = False
            if not small.all():
                logits = logits.masked_fill(small[:, None, None], float("-inf"))
        if cfg.pamr:
            probs = torch.softmax(self.logit_scale * logits, dim=0)
            probs = pamr(image, probs)
            logits = torch.log(probs.clamp_min(1e-8)) / self.logit_scale
        return logits.clamp_min(LOGIT_FLOOR)
