"""Benchmarks in mmsegmentation's documented on-disk layouts, a generic folder dataset, and synth.

Each dataset carries its class names (with the synonyms the training-free papers prompt with), its
ignore index, how raw label values map to class indices, and its default inference protocol.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from ..images import ImageReadError, read_image
from ..vocabulary import VOC_BACKGROUND_WORDS, Vocabulary

CLASS_DIR = Path(__file__).parent / "classes"
IGNORE_INDEX = 255


class DatasetError(ValueError):
    """Missing or inconsistent data; the message names the file or folder and the fix."""


def class_file(name: str) -> Vocabulary:
    return Vocabulary.from_file(CLASS_DIR / f"{name}.txt")


# The SCLIP protocol (what SCLIP / ClearCLIP / NACLIP report): keep-ratio resize to a short side,
# 224 windows every 112 px, logits averaged, softmax(logit_scale * cosine).
def _sclip(short_side: int, logit_scale: float = 40.0, prob_threshold=None, area_threshold=None) -> dict:
    return dict(mode="slide", short_side=short_side, window=224, stride=112, logit_scale=logit_scale,
                prob_threshold=prob_threshold, area_threshold=area_threshold)


@dataclass
class Sample:
    id: str
    image: np.ndarray  # (H, W, 3) uint8
    label: np.ndarray  # (H, W) int64 class indices, IGNORE_INDEX = ignore


@dataclass
class SegDataset:
    """A list of (image, label) files plus what is needed to score predictions on them."""

    name: str
    vocabulary: Vocabulary  # the classes to prompt with (index = class id)
    pairs: list[tuple[str, Path, Path]]  # (id, image path, label path)
    protocol: dict = field(default_factory=dict)  # InferenceConfig overrides
    background: tuple[str, ...] | None = None  # words scored as class 0 "background", if any
    label_map: Callable[[np.ndarray], np.ndarray] | None = None  # raw label values -> class ids
    templates: str = "imagenet80"

    @property
    def classes(self) -> list[str]:
        return self.vocabulary.names

    def __len__(self) -> int:
        return len(self.pairs)

    def read_label(self, path: Path) -> np.ndarray:
        try:
            with Image.open(path) as img:
                raw = np.asarray(img)
        except FileNotFoundError:
            raise DatasetError(f"{path}: label file missing") from None
        except OSError as err:
            raise DatasetError(f"{path}: unreadable label image ({err})") from err
        if raw.ndim != 2:
            raise DatasetError(f"{path}: label image has shape {raw.shape}; expected one channel of class ids")
        label = raw.astype(np.int64)
        if self.label_map is not None:
            label = self.label_map(label)
        bad = (label != IGNORE_INDEX) & ((label < 0) | (label >= len(self.classes)))
        if bad.any():
            values = sorted(set(np.unique(label[bad]).tolist()))[:8]
            raise DatasetError(f"{path}: label values {values} are outside the {len(self.classes)} classes of "
                               f"{self.name} (ignore = {IGNORE_INDEX}); is this the right dataset/converter?")
        return label

    def image(self, index: int) -> np.ndarray:
        """The image alone: what annotation-free training reads (it never opens a label file)."""
        image_path = self.pairs[index][1]
        if not Path(image_path).exists():
            raise DatasetError(f"{image_path}: image file missing")
        try:
            return read_image(image_path)
        except ImageReadError as err:
            raise DatasetError(str(err)) from err

    def __getitem__(self, index: int) -> Sample:
        sid, image_path, label_path = self.pairs[index]
        image = self.image(index)
        label = self.read_label(label_path)
        if label.shape != image.shape[:2]:
            raise DatasetError(f"{label_path}: label size {label.shape[1]}x{label.shape[0]} differs from image "
                               f"{image_path} size {image.shape[1]}x{image.shape[0]}")
        return Sample(sid, image, label)


# ---------------------------------------------------------------------------- label maps
def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """0 -> ignore, k -> k - 1 (ADE20K, VOC20, Context59: the first raw value is 'other/background')."""
    out = label - 1
    out[label == 0] = IGNORE_INDEX
    out[label == IGNORE_INDEX] = IGNORE_INDEX
    return out


def _map_to_ignore(label: np.ndarray, value: int) -> np.ndarray:
    """A dataset's own 'void' value -> the ignore index (a module-level function: picklable for workers)."""
    out = label.copy()
    out[label == value] = IGNORE_INDEX
    return out


# ---------------------------------------------------------------------------- layouts
def _find_root(root: Path, candidates: list[str], must_have: str) -> Path:
    for rel in candidates:
        path = root / rel if rel else root
        if (path / must_have).exists():
            return path
    tried = ", ".join(str(root / c / must_have) if c else str(root / must_have) for c in candidates)
    raise DatasetError(f"no dataset found under {root}: looked for {tried}")


def _split_file_pairs(base: Path, split_file: Path, image_dir: str, label_dir: str, image_suffix: str = ".jpg"):
    if not split_file.is_file():
        raise DatasetError(f"split list missing: {split_file}")
    ids = [ln.strip() for ln in split_file.read_text().splitlines() if ln.strip()]
    return [(i, base / image_dir / f"{i}{image_suffix}", base / label_dir / f"{i}.png") for i in ids]


def _voc(root: Path, split: str, with_background: bool) -> SegDataset:
    base = _find_root(root, ["", "VOC2012", "VOCdevkit/VOC2012"], "JPEGImages")
    label_dir = "SegmentationClass"
    if split == "aug" or split == "trainaug":
        label_dir, split = "SegmentationClassAug", "trainaug"
    pairs = _split_file_pairs(base, base / "ImageSets" / "Segmentation" / f"{split}.txt", "JPEGImages", label_dir)
    voc20 = class_file("voc20")
    if with_background:
        return SegDataset("voc21", voc20.with_background(VOC_BACKGROUND_WORDS), pairs,
                          _sclip(336, 65.0, prob_threshold=0.1, area_threshold=0.1), background=VOC_BACKGROUND_WORDS)
    return SegDataset("voc20", voc20, pairs, _sclip(336), label_map=reduce_zero_label)


def _context(root: Path, split: str, with_background: bool) -> SegDataset:
    base = _find_root(root, ["", "VOC2010", "VOCdevkit/VOC2010"], "SegmentationClassContext")
    pairs = _split_file_pairs(base, base / "ImageSets" / "SegmentationContext" / f"{split}.txt",
                              "JPEGImages", "SegmentationClassContext")
    ctx = class_file("context59")
    if with_background:
        return SegDataset("context60", ctx.with_background(("background",)), pairs,
                          _sclip(336, 50.0, prob_threshold=0.1), background=("background",))
    return SegDataset("context59", ctx, pairs, _sclip(336), label_map=reduce_zero_label)


def _folder_pairs(image_dir: Path, label_dir: Path, image_glob: str = "*", label_suffix: str = ".png",
                  strip: str = "", label_replace: tuple[str, str] | None = None):
    if not image_dir.is_dir():
        raise DatasetError(f"image folder missing: {image_dir}")
    if not label_dir.is_dir():
        raise DatasetError(f"label folder missing: {label_dir}")
    pairs = []
    for img in sorted(image_dir.rglob(image_glob)):
        if not img.is_file() or img.suffix.lower() not in {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}:
            continue
        rel = img.relative_to(image_dir)
        stem = rel.with_suffix("").as_posix()
        if label_replace:
            label_rel = stem.replace(*label_replace) + label_suffix
        else:
            label_rel = (stem[: -len(strip)] if strip and stem.endswith(strip) else stem) + label_suffix
        pairs.append((Path(stem).name, img, label_dir / label_rel))
    return pairs


def _coco_stuff(root: Path, split: str) -> SegDataset:
    base = _find_root(root, ["", "coco_stuff164k"], "images")
    sub = {"val": "val2017", "train": "train2017"}.get(split, split)
    pairs = _folder_pairs(base / "images" / sub, base / "annotations" / sub, "*.jpg", "_labelTrainIds.png")
    return SegDataset("coco_stuff171", class_file("coco_stuff171"), pairs, _sclip(448))


def _coco_object(root: Path, split: str) -> SegDataset:
    base = _find_root(root, ["", "coco_stuff164k", "coco"], "images")
    sub = {"val": "val2017", "train": "train2017"}.get(split, split)
    pairs = _folder_pairs(base / "images" / sub, base / "annotations" / sub, "*.jpg", "_instanceTrainIds.png")
    vocab = class_file("coco_object80").with_background(("background",))
    return SegDataset("coco_object", vocab, pairs, _sclip(336, 50.0, prob_threshold=0.1), background=("background",))


def _ade(root: Path, split: str) -> SegDataset:
    base = _find_root(root, ["", "ADEChallengeData2016", "ade/ADEChallengeData2016"], "images")
    sub = {"val": "validation", "train": "training"}.get(split, split)
    pairs = _folder_pairs(base / "images" / sub, base / "annotations" / sub, "*.jpg", ".png")
    return SegDataset("ade150", class_file("ade150"), pairs, _sclip(336), label_map=reduce_zero_label)


def _cityscapes(root: Path, split: str) -> SegDataset:
    base = _find_root(root, ["", "cityscapes"], "leftImg8bit")
    pairs = _folder_pairs(base / "leftImg8bit" / split, base / "gtFine" / split, "*_leftImg8bit.png",
                          "_gtFine_labelTrainIds.png", label_replace=("_leftImg8bit", ""))
    return SegDataset("cityscapes19", class_file("cityscapes19"), pairs, _sclip(560))


def folder_dataset(root: str | Path, image_dir: str = "images", label_dir: str = "labels",
                   classes_file: str | None = None, ignore_index: int | None = None,
                   name: str = "folder") -> SegDataset:
    """Any dataset: ``root/images/*`` + ``root/labels/<same name>.png`` + a class file
    (``root/classes.txt``: one class per line, synonyms after commas; line k = label value k).
    ``ignore_index``: a label value to ignore besides 255 (e.g. CamVid's 11 = void)."""
    root = Path(root)
    cls_path = Path(classes_file) if classes_file else root / "classes.txt"
    if not cls_path.is_file():
        raise DatasetError(f"class file missing: {cls_path} (one class per line; pass --classes-file)")
    vocab = Vocabulary.from_file(cls_path)
    label_map = None
    if ignore_index is not None and ignore_index != IGNORE_INDEX:
        label_map = functools.partial(_map_to_ignore, value=ignore_index)
    pairs = _folder_pairs(root / image_dir, root / label_dir)
    return SegDataset(name, vocab, pairs, dict(mode="slide", short_side=0), label_map=label_map,
                      templates="maskclip85")


class SynthDataset(SegDataset):
    """The synthetic world as a benchmark: generated on the fly, exact ground truth, no files."""

    def __init__(self, split: str = "val", length: int | None = None, seed: int = 0, size: int = 128):
        from .synth import CLASSES, SYNONYMS, SynthScenes

        self.scenes = SynthScenes(split, seed=seed, size=size, length=length)
        vocab = Vocabulary.parse([", ".join(SYNONYMS.get(c, (c,))) for c in CLASSES])
        # scenes are drawn at the toy CLIP's training scale when resized to 96 px
        super().__init__("synth", vocab, [], dict(mode="whole", short_side=96), templates="maskclip85")

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> Sample:
        scene = self.scenes[index]
        return Sample(f"{self.scenes.split}_{index:06d}", scene.image, scene.mask)

    def image(self, index: int) -> np.ndarray:
        return self.scenes[index].image


DATASETS = {
    "voc21": lambda root, split: _voc(root, split, True),
    "voc20": lambda root, split: _voc(root, split, False),
    "context60": lambda root, split: _context(root, split, True),
    "context59": lambda root, split: _context(root, split, False),
    "coco_stuff171": _coco_stuff,
    "coco_object": _coco_object,
    "ade150": _ade,
    "cityscapes19": _cityscapes,
}
DATASET_NAMES = tuple(DATASETS) + ("folder", "synth")


def build_dataset(name: str, data_root: str | Path | None = None, split: str = "val", **folder_options) -> SegDataset:
    """A dataset by name (see DATASET_NAMES). Raises DatasetError when the files are not there or the
    split is empty."""
    if name == "synth":
        if split not in ("val", "test", "train"):
            raise DatasetError(f"synth has the splits train, val and test, not {split!r}")
        ds = SynthDataset(split, length=folder_options.get("length"), seed=folder_options.get("seed") or 0)
    elif name == "folder":
        if data_root is None:
            raise DatasetError("--data-root is required for the folder dataset")
        options = {k: v for k, v in folder_options.items() if k not in ("length", "seed") and v is not None}
        ds = folder_dataset(data_root, **options)
    elif name in DATASETS:
        if data_root is None:
            raise DatasetError(f"--data-root is required for {name}")
        root = Path(data_root)
        if not root.is_dir():
            raise DatasetError(f"data root {root} does not exist")
        ds = DATASETS[name](root, split)
    else:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    if folder_options.get("length") and name != "synth":
        ds.pairs = ds.pairs[: folder_options["length"]]
    if len(ds) == 0:
        raise DatasetError(f"the {split!r} split of {name} under {data_root} has no images; check --data-root/--split")
    return ds


def normalise_name(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())
