"""Reading images the way people have them: any mode, EXIF rotation, 16-bit, palettes, bad files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


class ImageReadError(ValueError):
    """An input that is not a readable image; the message names the file and what to do."""


def _to_rgb_uint8(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit greyscale: scale the actual range to 8 bit
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = ((arr - lo) / (hi - lo or 1.0) * 255 + 0.5).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))  # transparent -> white
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    return _rgb_pixels(img)


BAND_PIXELS = 1 << 22  # pixels per band when copying a decoded photo out of PIL


def _rgb_pixels(img: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 of an image in any per-pixel mode, copied out of PIL in bands of rows: the
    whole-image route (``tobytes``) holds two full copies besides PIL's own, 290 MB at 48 megapixels."""
    width, height = img.size
    if width * height <= BAND_PIXELS:
        return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
    out = np.empty((height, width, 3), np.uint8)
    rows = max(1, BAND_PIXELS // width)
    for r in range(0, height, rows):
        band = img.crop((0, r, width, min(height, r + rows)))
        out[r:r + rows] = np.asarray(band if band.mode == "RGB" else band.convert("RGB"))
    return out


def read_image(image: ImageInput) -> np.ndarray:
    """Return an (H, W, 3) uint8 RGB array; EXIF orientation applied; raises ImageReadError."""
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
            raise ImageReadError(f"array of shape {arr.shape} is not an image; expected HxW, HxWx3 or HxWx4")
        if arr.shape[2] == 1:
            arr = np.repeat(arr, 3, axis=2)
        if arr.shape[2] == 4:
            arr = arr[..., :3]
        if arr.dtype != np.uint8:
            if np.issubdtype(arr.dtype, np.floating) and arr.max() <= 1.0:
                arr = arr * 255.0
            arr = np.clip(arr, 0, 255).astype(np.uint8)
        if arr.shape[0] == 0 or arr.shape[1] == 0:
            raise ImageReadError(f"array of shape {arr.shape} has no pixels")
        return np.ascontiguousarray(arr)
    if isinstance(image, Image.Image):
        return _to_rgb_uint8(ImageOps.exif_transpose(image))
    path = Path(image)
    if not path.exists():
        raise ImageReadError(f"{path}: file not found")
    if path.is_dir():
        raise ImageReadError(f"{path}: is a folder, not an image")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: empty file (0 bytes); re-export or remove it")
    try:
        with Image.open(path) as img:
            img.load()  # decode now, so truncated files fail here and not later
            ImageOps.exif_transpose(img, in_place=True)  # our own image: no copy of a huge photo
            return _to_rgb_uint8(img)
    except UnidentifiedImageError as err:
        raise ImageReadError(f"{path}: not an image PIL can read (is it really a picture?)") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(f"{path}: unreadable or truncated image ({err}); re-download or re-export it") from err


def expand_inputs(inputs: Iterable[str]) -> list[Path]:
    """Files, folders (their images, sorted) and glob patterns -> a list of paths, in order, unique."""
    import glob

    out: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            out.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        elif any(ch in item for ch in "*?["):
            out.extend(sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file()))
        else:
            out.append(path)  # missing files are reported per file later, not here
    seen, unique = set(), []
    for p in out:
        if p not in seen:
            seen.add(p)
            unique.append(p)
    return unique
