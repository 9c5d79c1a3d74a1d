"""Pictures people look at: palette label PNGs, overlays with a legend, side-by-side panels."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

IGNORE_INDEX = 255
BAND_PIXELS = 1 << 20  # pixels per band when tinting or counting: ~50 MB of float temporaries a band


def palette(n: int = 256) -> np.ndarray:
    """(n, 3) uint8: PASCAL VOC's bit-interleaved colour map (0 = black), 255 = white (ignore)."""
    out = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out[i] = (r, g, b)
    if n > IGNORE_INDEX:
        out[IGNORE_INDEX] = (255, 255, 255)
    return out


def label_counts(labels: np.ndarray, minlength: int = 0) -> np.ndarray:
    """Pixels per label value, as ``np.bincount(labels.ravel(), minlength)``, counted in bands of rows:
    bincount first copies its input to int64, which for a uint8 map of 48 megapixels is 384 MB."""
    flat = labels.reshape(-1)
    counts = np.zeros(max(minlength, int(flat.max(initial=0)) + 1), np.int64)
    for s in range(0, flat.size, BAND_PIXELS):
        part = np.bincount(flat[s:s + BAND_PIXELS])
        counts[:len(part)] += part
    return counts


def _class_colours(num_classes: int) -> np.ndarray:
    # VOC's map starts with black for class 0; shift by one so every class gets a visible colour
    return palette(num_classes + 1)[1:]


def save_label_png(labels: np.ndarray, path: str | Path) -> None:
    """Class indices as a palette PNG: the pixel values are the indices, the colours only help viewing."""
    if labels.max(initial=0) > 255:
        raise ValueError("more than 255 classes do not fit an 8-bit label PNG")
    img = Image.fromarray(labels.astype(np.uint8, copy=False))  # "L"; putpalette turns it into "P"
    pal = np.zeros((256, 3), np.uint8)
    pal[: IGNORE_INDEX] = _class_colours(IGNORE_INDEX)
    pal[IGNORE_INDEX] = (255, 255, 255)
    img.putpalette(pal.flatten().tolist())
    img.save(path)


def colourise(labels: np.ndarray, num_classes: int) -> np.ndarray:
    colours = np.zeros((256, 3), np.uint8)
    colours[:num_classes] = _class_colours(num_classes)[:num_classes]
    colours[IGNORE_INDEX] = (255, 255, 255)
    return colours[np.clip(labels, 0, 255)]


def text_font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def class_colour(index: int, num_classes: int) -> tuple[int, int, int]:
    """The colour of class ``index`` in overlays, legends and label PNGs."""
    return tuple(int(c) for c in _class_colours(num_classes)[index])


def tint(image: np.ndarray, labels: np.ndarray, num_classes: int, alpha: float = 0.5) -> np.ndarray:
    """(H, W, 3) uint8: the image blended with class colours; ignore pixels (255) keep the image."""
    blend = np.empty_like(image)
    for r, band in _tinted_bands(image, labels, num_classes, alpha):
        blend[r:r + len(band)] = band
    return blend


def _tinted_bands(image: np.ndarray, labels: np.ndarray, num_classes: int, alpha: float):
    """:func:`tint` in bands of rows (start row, band), so a 48-megapixel photo needs no full-size float copy."""
    rows = max(1, BAND_PIXELS // max(1, image.shape[1]))
    for r in range(0, image.shape[0], rows):
        part, lab = image[r:r + rows], labels[r:r + rows]
        band = (part.astype(np.float32) * (1 - alpha) + colourise(lab, num_classes).astype(np.float32) * alpha)
        band = band.astype(np.uint8)
        keep = lab == IGNORE_INDEX
        band[keep] = part[keep]
        yield r, band


def picture(image: np.ndarray, title: str | None = None) -> Image.Image:
    """The image alone, laid out as an :func:`overlay` panel (title row, empty legend column)."""
    return overlay(image, np.full(image.shape[:2], IGNORE_INDEX), [], title=title)


def overlay(image: np.ndarray, labels: np.ndarray, classes: Sequence[str], alpha: float = 0.5,
            title: str | None = None) -> Image.Image:
    """The image tinted with class colours, and a legend of the classes present (largest first)."""
    counts = label_counts(labels, minlength=max(len(classes), IGNORE_INDEX + 1))
    counts[IGNORE_INDEX] = 0
    counts = counts[:len(classes)]
    present = [i for i in np.argsort(-counts) if counts[i] > 0]
    h, w = labels.shape
    fsize = max(11, min(18, h // 20))
    font = text_font(fsize)
    row = fsize + 6
    legend_w = max(140, int(fsize * 0.62 * max([len(classes[i]) for i in present] + [8])) + 70)
    top = row if title else 0
    canvas = Image.new("RGB", (w + legend_w, max(h + top, top + row * (len(present) + 1))), "white")
    for r, band in _tinted_bands(image, labels, len(classes), alpha):  # pasted band by band: bounded memory
        canvas.paste(Image.fromarray(band), (0, top + r))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 2), title, fill="black", font=font)
    total = max(1, counts.sum())
    for k, i in enumerate(present):
        y = top + 4 + k * row
        draw.rectangle([w + 8, y, w + 8 + fsize, y + fsize], fill=class_colour(i, len(classes)), outline="black")
        draw.text((w + 14 + fsize, y - 1), f"{classes[i]} {100 * counts[i] / total:.0f}%", fill="black", font=font)
    return canvas


def shrink(image: np.ndarray, label_maps: Sequence[np.ndarray], max_side: int | None):
    """Downscale an image (bilinear) and label maps of its size (nearest) so the long side is at most
    ``max_side``; returns (image, [label maps]) unchanged when they already fit."""
    h, w = image.shape[:2]
    if not max_side or max(h, w) <= max_side:
        return image, list(label_maps)
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    maps = [np.asarray(Image.fromarray(m.astype(np.int32)).resize(size, Image.NEAREST)).astype(np.int64)
            for m in label_maps]
    return small, maps


def side_by_side(panels: Sequence[Image.Image], gap: int = 6) -> Image.Image:
    width = sum(p.width for p in panels) + gap * (len(panels) - 1)
    height = max(p.height for p in panels)
    canvas = Image.new("RGB", (width, height), "white")
    x = 0
    for p in panels:
        canvas.paste(p, (x, 0))
        x += p.width + gap
    return canvas
