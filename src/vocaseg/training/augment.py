"""Joint image + mask training augmentation (mmsegmentation's train pipeline on torchvision v2).

Every trained method uses the same pipeline, in mmsegmentation's order:

1. keep-ratio rescale by the base scale times a random ratio (``RandomResize``): the image
   bilinearly (antialiased when shrinking), the mask with nearest-neighbour only;
2. random crop, retried while one class dominates the crop (``RandomCrop`` with ``cat_max_ratio``);
   where the image is smaller than the crop, the crop is the whole extent;
3. horizontal flip (``RandomFlip``);
4. photometric distortion of the image only (``PhotoMetricDistortion``);
5. pad at the bottom/right to the crop size: image with 0, mask with ``ignore_index``.

The geometry and colour operations are torchvision.transforms.v2 functionals applied to
``tv_tensors.Image`` / ``tv_tensors.Mask``. v2's random transforms draw from the global torch RNG,
so this module draws every random parameter itself from a ``torch.Generator`` and calls the
functionals with them: the same generator state gives the same output, and the global RNG is
neither used nor changed.

Label conventions (``vocaseg.data.datasets``): masks are int64 class indices, ``IGNORE_INDEX``
(255) is ignored by the loss and -1 marks pixels left for the method to pseudo-label. Masks stay
int64 throughout (uint8 cannot hold -1) and are only ever resized nearest-neighbour, so neither value
is blended into anything else and no new class id appears.

Where this differs from mmsegmentation (on purpose):

* The image is resized with antialiasing when shrinking (mmseg: cv2 bilinear without it).
* The mask is resized with ``NEAREST_EXACT`` (each output pixel takes the label under its centre,
  the same pixel-centre convention as the bilinear image resize). mmseg's cv2 ``INTER_NEAREST``
  (like torchvision's ``NEAREST``) takes ``floor(i * in / out)``, which shifts labels up to half an
  input pixel toward the top-left relative to the image. Both copy labels, never blend them.
* Contrast and saturation use ``adjust_contrast`` / ``adjust_saturation``, which blend toward the
  grey image (mean grey for contrast, per-pixel grey for saturation); mmseg scales the pixel values
  (contrast) or the HSV S channel (saturation) plainly. Same ranges, same probabilities.
* Everything after the resize is float in [0, 1] (mmseg rounds to uint8 after each photometric
  step); values are clamped to [0, 1] after each step.
* The image is padded with 0 (black) before any normalisation; mmseg pads after normalising, so its
  padded pixels are the mean colour. The padded pixels are ignored by the loss either way.
* ``cat_max_ratio`` ignores -1 ("unlabeled") as well as ``ignore_index`` when counting classes, and
  the retry loop is skipped when the whole mask has fewer than two labelled classes (every retry
  would fail, so the result has the same distribution as mmseg's: a uniform random crop).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode

F = v2.functional

UNLABELED = -1  # "to be pseudo-labelled by the method" (vocaseg.data.datasets convention)

# mmseg PhotoMetricDistortion defaults (mmseg/datasets/transforms/transforms.py).
BRIGHTNESS_DELTA = 32 / 255  # additive, on [0, 1] pixels
CONTRAST_RANGE = (0.5, 1.5)
SATURATION_RANGE = (0.5, 1.5)
# mmseg's hue_delta=18 is in OpenCV uint8 HSV units, where hue runs over [0, 180): +-18 units is
# +-36 degrees, i.e. +-0.1 of the hue circle (torchvision's hue_factor is a fraction of the circle).
HUE_DELTA = 18 / 180
CAT_MAX_RETRIES = 10  # mmseg RandomCrop retries

PHOTOMETRIC_MODES = ("full", "brightness_contrast", "none")


def _pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)):
        value = (int(value), int(value))
    value = tuple(int(v) for v in value)
    if len(value) != 2 or min(value) <= 0:
        raise ValueError(f"{name} must be a positive int or a (h, w) pair of positive ints, got {value}")
    return value


@dataclass(frozen=True)
class AugmentConfig:
    """What :class:`JointAugment` does; the field names follow mmsegmentation's train pipeline.

    crop: output size (h, w), or one int for a square (mmseg ``RandomCrop.crop_size``).
    base_size: mmseg's keep-ratio ``scale``/``img_scale``. An int S: rescale so the SHORT side is
        S. A pair (long, short) such as (2048, 512): rescale keep-ratio so the image fits in it,
        scale factor = min(long / max(h, w), short / min(h, w)) (mmcv ``rescale_size``; the order
        of the pair does not matter). None: keep the input size.
    ratio_range: a factor drawn uniformly from this range multiplies the base scale
        (mmseg ``RandomResize.ratio_range``); (1, 1) disables the random rescale.
    cat_max_ratio: retry up to 10 crops until no single class (excluding ``ignore_index`` and -1)
        covers >= this share of the crop's labelled pixels (mmseg ``RandomCrop``); 1.0 disables.
    flip: probability of a horizontal flip.
    photometric: "full" (mmseg ``PhotoMetricDistortion``-like: brightness, contrast, saturation,
        hue, each with p=0.5), "brightness_contrast" (only those two) or "none".
    ignore_index: the loss's ignore label; what the mask is padded with.
    """

    crop: int | tuple[int, int]
    base_size: int | tuple[int, int] | None
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip: float = 0.5
    photometric: str = "full"
    ignore_index: int = 255

    def __post_init__(self):
        _pair(self.crop, "crop")
        if self.base_size is not None:
            _pair(self.base_size, "base_size")
        lo, hi = self.ratio_range
        if not 0 < lo <= hi:
            raise ValueError(f"ratio_range must satisfy 0 < low <= high, got {self.ratio_range}")
        if not 0 < self.cat_max_ratio <= 1:
            raise ValueError(f"cat_max_ratio must be in (0, 1], got {self.cat_max_ratio}")
        if not 0 <= self.flip <= 1:
            raise ValueError(f"flip is a probability in [0, 1], got {self.flip}")
        if self.photometric not in PHOTOMETRIC_MODES:
            raise ValueError(f"photometric must be one of {PHOTOMETRIC_MODES}, got {self.photometric!r}")
        if self.ignore_index == UNLABELED:
            raise ValueError("ignore_index cannot be -1: -1 means 'unlabeled, to be pseudo-labelled'")

    @property
    def crop_size(self) -> tuple[int, int]:
        return _pair(self.crop, "crop")


# mmsegmentation configs/_base_/datasets/pascal_voc12.py, coco-stuff164k.py (and ade20k.py):
# RandomResize(scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True),
# RandomCrop(crop_size=(512, 512), cat_max_ratio=0.75), RandomFlip(prob=0.5), PhotoMetricDistortion.
MMSEG_VOC_COCO = AugmentConfig(crop=512, base_size=(2048, 512), ratio_range=(0.5, 2.0),
                               cat_max_ratio=0.75, flip=0.5, photometric="full")

# mmsegmentation configs/_base_/datasets/pascal_context.py / pascal_context_59.py: img_scale=(520, 520)
# with keep_ratio=True (so the LONG side becomes 520 x ratio), crop_size=(480, 480), otherwise as above.
MMSEG_CONTEXT = AugmentConfig(crop=480, base_size=(520, 520), ratio_range=(0.5, 2.0),
                              cat_max_ratio=0.75, flip=0.5, photometric="full")

# vocaseg's own choice for the synthetic world (vocaseg.data.synth), not an mmseg config: 96 px
# crops with the short side first rescaled to 96, a milder random rescale, no cat_max_ratio (scenes
# hold few classes), and no hue/saturation jitter because colour identifies thing classes there.
SYNTH_TOY = AugmentConfig(crop=96, base_size=96, ratio_range=(0.75, 1.5), cat_max_ratio=1.0,
                          flip=0.5, photometric="brightness_contrast")


def _as_image(image) -> torch.Tensor:
    """(H, W, 3) numpy or (3, H, W) tensor, uint8 (or float in [0, 1]) -> contiguous (3, H, W) tensor."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"numpy image must be (H, W, 3), got shape {image.shape}")
        image = torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1)  # PIL's arrays are read-only
    elif isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"tensor image must be (3, H, W), got shape {tuple(image.shape)}")
        image = image.detach().cpu().as_subclass(torch.Tensor)
    else:
        raise TypeError(f"image must be a numpy array or a torch tensor, got {type(image).__name__}")
    if image.dtype != torch.uint8 and not image.is_floating_point():
        raise TypeError(f"image must be uint8 (or float in [0, 1]), got {image.dtype}")
    if image.shape[1] == 0 or image.shape[2] == 0:
        raise ValueError(f"image has no pixels: shape {tuple(image.shape)}")
    return image.contiguous()


def _to_float(image: torch.Tensor) -> torch.Tensor:
    if image.dtype == torch.uint8:
        return image.float().div_(255)
    return image.to(torch.float32, copy=True)  # never hand back (an alias of) the caller's tensor


def _as_mask(mask, h: int, w: int) -> torch.Tensor:
    if mask is None:
        return torch.full((h, w), UNLABELED, dtype=torch.int64)
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(np.ascontiguousarray(mask))
    elif isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().as_subclass(torch.Tensor)
    else:
        raise TypeError(f"mask must be a numpy array, a torch tensor or None, got {type(mask).__name__}")
    if mask.is_floating_point() or mask.is_complex() or mask.dtype == torch.bool:
        raise TypeError(f"mask must hold integer class ids, got {mask.dtype}")
    if tuple(mask.shape) != (h, w):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the image's (H, W) = {(h, w)}")
    return mask.to(torch.int64, copy=True).contiguous()  # never alias the caller's mask


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=g, dtype=torch.float64).item()


def _coin(g: torch.Generator, p: float) -> bool:
    return torch.rand((), generator=g, dtype=torch.float64).item() < p


def _randint(g: torch.Generator, high_inclusive: int) -> int:
    return int(torch.randint(0, high_inclusive + 1, (), generator=g).item())


def rescale_size(h: int, w: int, base_size: int | tuple[int, int] | None, ratio: float = 1.0) -> tuple[int, int]:
    """mmseg ``RandomResize`` + keep-ratio ``Resize`` output size (h, w) for base scale x ratio.

    As in mmseg the scaled target is truncated to ints (``int(long * ratio), int(short * ratio)``)
    and the new size rounded half up (mmcv ``_scale_size``).
    """
    if base_size is None:
        factor = ratio
    elif isinstance(base_size, (int, np.integer)):
        factor = int(base_size * ratio) / min(h, w)
    else:
        long_edge, short_edge = int(max(base_size) * ratio), int(min(base_size) * ratio)
        factor = min(long_edge / max(h, w), short_edge / min(h, w))
    return max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5))


def _dominated(mask: torch.Tensor, cat_max_ratio: float, ignore_index: int) -> bool:
    """mmseg's retry condition: fewer than two labelled classes, or one covers >= cat_max_ratio."""
    labelled = mask[(mask >= 0) & (mask != ignore_index)]
    if labelled.numel() == 0:
        return True
    counts = torch.bincount(labelled)
    counts = counts[counts > 0]
    return counts.numel() < 2 or counts.max().item() / labelled.numel() >= cat_max_ratio


class JointAugment:
    """mmseg-style joint training augmentation of an image and its label mask (see module doc)."""

    def __init__(self, config: AugmentConfig):
        self.config = config

    def __repr__(self) -> str:
        return f"JointAugment({self.config})"

    def __call__(self, image, mask=None, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """image: (H,W,3) uint8 numpy or (3,H,W) uint8 tensor (float in [0, 1] is accepted too);
        mask: (H,W) integer numpy/tensor, or None (= every pixel unlabeled, i.e. -1).

        Returns pixels (3, ch, cw) float32 RGB in [0, 1] (not normalised: each network normalises
        its own way) and mask (ch, cw) int64 with ``ignore_index`` on the padding.

        All randomness comes from ``generator``: the same generator state gives the same output, and
        the global torch RNG is neither used nor changed. Without one, a fresh generator seeded from
        OS entropy is used (not reproducible).
        """
        cfg = self.config
        if generator is None:
            generator = torch.Generator()
            generator.seed()
        g = generator
        img = _as_image(image)
        h, w = img.shape[-2:]
        lab = _as_mask(mask, h, w)
        img = tv_tensors.Image(img)
        lab = tv_tensors.Mask(lab)

        # 1. keep-ratio rescale
        nh, nw = rescale_size(h, w, cfg.base_size, _uniform(g, *cfg.ratio_range))
        if (nh, nw) != (h, w):
            img = F.resize(img, [nh, nw], interpolation=InterpolationMode.BILINEAR, antialias=nh < h or nw < w)
            lab = F.resize(lab, [nh, nw], interpolation=InterpolationMode.NEAREST_EXACT)

        # 2. random crop with cat_max_ratio (the whole extent where the image is smaller)
        ch, cw = cfg.crop_size
        th, tw = min(ch, nh), min(cw, nw)
        top, left = self._crop_offset(lab, th, tw, g)
        if (th, tw) != (nh, nw):
            img = F.crop(img, top, left, th, tw)
            lab = F.crop(lab, top, left, th, tw)

        # 3. horizontal flip
        if _coin(g, cfg.flip):
            img = F.horizontal_flip(img)
            lab = F.horizontal_flip(lab)

        # 4. photometric distortion (image only), in float [0, 1]
        img = tv_tensors.Image(_to_float(img.as_subclass(torch.Tensor)))
        img = self._photometric(img, g)

        # 5. pad bottom/right to the crop size
        if (th, tw) != (ch, cw):
            padding = [0, 0, cw - tw, ch - th]  # left, top, right, bottom
            img = F.pad(img, padding, fill=0)
            lab = F.pad(lab, padding, fill=cfg.ignore_index)
        return img.as_subclass(torch.Tensor).contiguous(), lab.as_subclass(torch.Tensor).contiguous()

    def _crop_offset(self, lab: torch.Tensor, th: int, tw: int, g: torch.Generator) -> tuple[int, int]:
        cfg = self.config
        lab = lab.as_subclass(torch.Tensor)  # plain tensor: no tv_tensor dispatch in the retry loop
        nh, nw = lab.shape[-2:]

        def draw() -> tuple[int, int]:
            return _randint(g, nh - th), _randint(g, nw - tw)

        top, left = draw()
        # mmseg: check the crop, redraw while dominated, at most 10 times (the 10th redraw is kept
        # unchecked). If the whole mask is dominated-by-construction (< 2 labelled classes), every
        # check fails and the result is just a uniform crop: skip the loop.
        if cfg.cat_max_ratio < 1.0 and not _no_two_classes(lab, cfg.ignore_index):
            for _ in range(CAT_MAX_RETRIES):
                window = lab[top:top + th, left:left + tw]
                if not _dominated(window, cfg.cat_max_ratio, cfg.ignore_index):
                    break
                top, left = draw()
        return top, left

    def _photometric(self, img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """mmseg PhotoMetricDistortion order: brightness; contrast either first or last (random
        mode) around saturation and hue; each step with p=0.5; values clamped to [0, 1]."""
        mode = self.config.photometric
        if mode == "none":
            return img

        def contrast(x):
            if _coin(g, 0.5):
                # torchvision blends toward the mean grey level; mmseg multiplies pixel values.
                x = F.adjust_contrast(x, _uniform(g, *CONTRAST_RANGE))
            return x

        if _coin(g, 0.5):  # additive brightness (F.adjust_brightness is multiplicative)
            img = tv_tensors.wrap(img.as_subclass(torch.Tensor).add(_uniform(g, -BRIGHTNESS_DELTA, BRIGHTNESS_DELTA))
                                  .clamp_(0, 1), like=img)
        if mode == "brightness_contrast":
            return contrast(img)
        contrast_first = _coin(g, 0.5)
        if contrast_first:
            img = contrast(img)
        if _coin(g, 0.5):
            # torchvision blends toward the per-pixel grey; mmseg scales the HSV S channel.
            img = F.adjust_saturation(img, _uniform(g, *SATURATION_RANGE))
        if _coin(g, 0.5):
            img = F.adjust_hue(img, _uniform(g, -HUE_DELTA, HUE_DELTA))
        if not contrast_first:
            img = contrast(img)
        return img


def _no_two_classes(lab: torch.Tensor, ignore_index: int) -> bool:
    labelled = lab[(lab >= 0) & (lab != ignore_index)]
    return labelled.numel() == 0 or bool((labelled == labelled[0]).all())


def random_resized_crop(image, mask, size: int, scale: tuple[float, float] = (0.5, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3), generator: torch.Generator | None = None,
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """torchvision's ``RandomResizedCrop`` for an image and an optional label map, every draw from
    ``generator``: a box of ``scale`` x the area and an aspect ratio log-uniform in ``ratio`` (10 tries,
    then the centre crop with the ratio clamped), resized to ``size`` x ``size``: the image bicubic
    (antialiased, clamped to [0, 1]) as CLIP's image-text training does, the map nearest-neighbour.

    image: (H, W, 3) uint8 numpy or (3, H, W) tensor; mask: (H, W) integer map or None.
    Returns pixels (3, size, size) float32 RGB in [0, 1] and the map (size, size) int64 (or None)."""
    g = generator
    if g is None:  # not reproducible, as JointAugment without a generator
        g = torch.Generator()
        g.seed()
    img = _to_float(_as_image(image))
    h, w = img.shape[-2:]
    lab = _as_mask(mask, h, w) if mask is not None else None
    area, log_ratio = h * w, (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(g, *scale)
        aspect = math.exp(_uniform(g, *log_ratio))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = _randint(g, h - ch), _randint(g, w - cw)
            break
    else:  # torchvision's fallback: the centre crop, its aspect ratio clamped into the range
        if w / h < ratio[0]:
            cw, ch = w, int(round(w / ratio[0]))
        elif w / h > ratio[1]:
            ch, cw = h, int(round(h * ratio[1]))
        else:
            cw, ch = w, h
        top, left = (h - ch) // 2, (w - cw) // 2
    out = F.resized_crop(tv_tensors.Image(img), top, left, ch, cw, [size, size],
                         interpolation=InterpolationMode.BICUBIC, antialias=True)
    pixels = out.as_subclass(torch.Tensor).clamp_(0, 1).contiguous()
    if lab is None:
        return pixels, None
    lab = F.resized_crop(tv_tensors.Mask(lab), top, left, ch, cw, [size, size],
                         interpolation=InterpolationMode.NEAREST_EXACT)
    return pixels, lab.as_subclass(torch.Tensor).contiguous()


def eval_resize(image, short_side: int | None, max_long: int = 2048) -> torch.Tensor:
    """Keep-ratio resize so the short side is ``short_side`` (None: keep the size), the long side at
    most ``max_long``; returns float32 (3, H, W) RGB in [0, 1], bilinear, antialiased when shrinking.

    Same size rule and interpolation as ``vocaseg.inference`` uses to prepare images.
    """
    img = _to_float(_as_image(image))
    h, w = img.shape[-2:]
    scale = min(short_side / min(h, w) if short_side else 1.0, max_long / max(h, w))
    if scale == 1.0:
        return img
    nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    if (nh, nw) == (h, w):
        return img
    out = F.resize(tv_tensors.Image(img), [nh, nw], interpolation=InterpolationMode.BILINEAR, antialias=nh < h)
    return out.as_subclass(torch.Tensor).clamp_(0, 1)


__all__ = ["AugmentConfig", "JointAugment", "MMSEG_VOC_COCO", "MMSEG_CONTEXT", "SYNTH_TOY", "eval_resize",
           "random_resized_crop", "rescale_size", "UNLABELED"]
