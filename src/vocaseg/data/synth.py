"""The synthetic world: small procedural scenes with pixel masks and captions.

Each scene is one to three "thing" objects (shapes with a colour, a size and a class-specific
surface marking) over one to three "stuff" regions (procedural textures). It gives, with no files and no download:
image-text pairs for CLIP pretraining, unlabeled images for pseudo-label methods, seen/unseen
splits for zero-shot methods, and a benchmark with exact ground truth for every method.

Determinism: scene ``i`` of a split depends only on ``(seed, split, i, size)``; it is drawn
from numpy's PCG64 generator and built with elementwise float32 arithmetic, so the same
arguments give the same pixels on any machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

STUFF_CLASSES = ("sky", "grass", "water", "sand", "brick wall", "wood")
THING_CLASSES = (
    "circle", "square", "triangle", "star", "cross",
    "ring", "heart", "diamond", "hexagon", "crescent",
)
CLASSES = STUFF_CLASSES + THING_CLASSES  # label id = index in this tuple
# Extra names a person might use; used as synonyms in the evaluation vocabulary.
SYNONYMS = {"brick wall": ("brick wall", "bricks"), "wood": ("wood", "wooden planks")}

# A named zero-shot split (seen classes train, unseen are only named at test time).
ZERO_SHOT_UNSEEN = ("hexagon", "crescent", "wood")

SPLITS = {"train": (0, 1_000_000), "val": (1, 500), "test": (2, 500)}  # split -> (id, length)

COLOURS = {
    "red": (0.85, 0.12, 0.12), "green": (0.15, 0.7, 0.2), "blue": (0.15, 0.25, 0.85),
    "yellow": (0.95, 0.85, 0.1), "orange": (0.95, 0.5, 0.05), "purple": (0.55, 0.15, 0.7),
    "white": (0.95, 0.95, 0.95), "black": (0.08, 0.08, 0.08), "pink": (0.95, 0.5, 0.7),
    "cyan": (0.1, 0.8, 0.85),
}
# Each thing class comes in two of the colours and each colour belongs to two classes, as real
# classes have typical colours: colour narrows a class down to two, shape and marking decide.
COLOUR_FAMILIES = {
    "circle": ("red", "cyan"), "square": ("blue", "yellow"), "triangle": ("green", "orange"),
    "star": ("yellow", "white"), "cross": ("purple", "red"), "ring": ("orange", "pink"),
    "heart": ("pink", "purple"), "diamond": ("cyan", "black"), "hexagon": ("white", "green"),
    "crescent": ("black", "blue"),
}
CLOSEUP_FRACTION = 0.3  # of train scenes: one large thing over one stuff
SIZES = {"small": (0.09, 0.12), "medium": (0.13, 0.17), "large": (0.18, 0.24)}  # radius / side

CAPTION_TEMPLATES = (
    "{things} on {stuff}", "a photo of {things} on {stuff}", "{stuff} with {things}",
    "{things} in front of {stuff}", "an image showing {things} and {stuff}",
    "there is {things} over {stuff}", "{things}, {stuff} in the background",
    "a picture of {stuff} behind {things}",
)


@dataclass
class Scene:
    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) int64, indices into CLASSES
    caption: str


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _texture(name: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """(H, W, 3) float32 texture in [0, 1] for a stuff class; scale follows the scene size."""
    yy, xx = _grid(size)
    s = size / 128.0
    phase = np.float32(rng.uniform(0, 2 * math.pi))
    noise = rng.random((size, size), dtype=np.float32)
    if name == "sky":
        t = yy / size
        top, bottom = np.array([0.25, 0.5, 0.9], np.float32), np.array([0.7, 0.85, 1.0], np.float32)
        img = top * (1 - t[..., None]) + bottom * t[..., None]
        return img + 0.03 * (noise[..., None] - 0.5)
    if name == "grass":
        rows = max(1, size // max(1, int(round(4 * s))))
        streaks = rng.random((rows, size), dtype=np.float32)
        streaks = np.repeat(streaks, int(math.ceil(size / rows)), axis=0)[:size]
        shade = 0.55 + 0.45 * streaks + 0.1 * (noise - 0.5)
        return np.array([0.2, 0.6, 0.15], np.float32) * shade[..., None]
    if name == "water":
        wave = np.sin(2 * math.pi * (yy / (7 * s) + 0.35 * np.sin(xx / (11 * s) + phase)))
        img = np.array([0.1, 0.35, 0.7], np.float32) + 0.18 * np.clip(wave, 0, 1)[..., None]
        return img + 0.03 * (noise[..., None] - 0.5)
    if name == "sand":
        speck = (noise > 0.9).astype(np.float32) * 0.25
        base = np.array([0.88, 0.76, 0.5], np.float32)
        return base * (1 - speck[..., None]) + 0.04 * (noise[..., None] - 0.5)
    if name == "brick wall":
        bh, bw = max(3, int(round(7 * s))), max(6, int(round(14 * s)))
        off = rng.integers(0, bw)
        row = (yy // bh).astype(np.int64)
        xs = xx + off + (row % 2) * (bw // 2)
        col = (xs // bw).astype(np.int64)
        mortar = ((yy % bh) < 1) | ((xs % bw) < 1)
        brick_shade = 0.8 + 0.3 * ((row * 7 + col * 13) % 5) / 5.0
        img = np.array([0.65, 0.25, 0.18], np.float32) * brick_shade[..., None].astype(np.float32)
        return np.where(mortar[..., None], np.float32(0.75), img)
    if name == "wood":
        grain = 0.5 + 0.5 * np.sin(xx / (2.5 * s) + 2.5 * np.sin(yy / (19 * s) + phase))
        return np.array([0.55, 0.34, 0.16], np.float32) * (0.7 + 0.35 * grain)[..., None]
    raise KeyError(name)


def _stuff_layout(rng: np.random.Generator, size: int, k: int) -> np.ndarray:
    """(H, W) int region index in [0, k): bands with wavy borders, or warped Voronoi cells."""
    yy, xx = _grid(size)
    if k == 1:
        return np.zeros((size, size), np.int64)
    if rng.random() < 0.5:  # bands
        vertical = rng.random() < 0.3
        a, b = (xx, yy) if vertical else (yy, xx)
        cuts = np.sort(rng.uniform(0.25, 0.75, size=k - 1)) * size
        if k == 3:
            cuts = np.array([rng.uniform(0.2, 0.45), rng.uniform(0.55, 0.8)]) * size
        amp = rng.uniform(0, 0.06) * size
        freq = rng.uniform(1, 4) * 2 * math.pi / size
        ph = rng.uniform(0, 2 * math.pi)
        border = (amp * np.sin(freq * b + ph)).astype(np.float32)
        region = np.zeros((size, size), np.int64)
        for c in cuts:
            region += (a > c + border).astype(np.int64)
        return region
    seeds = rng.uniform(0, size, size=(k, 2)).astype(np.float32)
    ph = np.float32(rng.uniform(0, 2 * math.pi))
    wy = yy + 0.05 * size * np.sin(xx * (6.0 / size) + ph)
    wx = xx + 0.05 * size * np.sin(yy * (6.0 / size) + ph)
    d = np.stack([(wy - sy) ** 2 + (wx - sx) ** 2 for sy, sx in seeds])
    return d.argmin(0).astype(np.int64)


def _shape_mask(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test in the unit frame of the shape (radius 1, v pointing up)."""
    rho = np.sqrt(u * u + v * v)
    if name == "circle":
        return rho <= 1
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if name == "triangle":
        return (v >= -0.5) & (v <= 1 - 1.732 * np.abs(u))
    if name == "star":
        theta = np.arctan2(u, v)
        tri = np.abs(((theta * 5 / (2 * math.pi)) % 1.0) - 0.5) * 2  # 1 at the tips, 0 between
        return rho <= 0.42 + 0.58 * tri
    if name == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))
    if name == "ring":
        return (rho <= 1) & (rho >= 0.55)
    if name == "heart":
        x, y = u * 1.25, v * 1.25 + 0.25
        return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0
    if name == "diamond":
        return np.abs(u) / 0.7 + np.abs(v) <= 1
    if name == "hexagon":
        au, av = np.abs(u), np.abs(v)
        return np.maximum(av, au * 0.866 + av * 0.5) <= 0.87
    if name == "crescent":
        return (rho <= 1) & ((u - 0.45) ** 2 + (v - 0.2) ** 2 > 0.85 ** 2)
    raise KeyError(name)


def _surface(name: str, x: np.ndarray, y: np.ndarray, period: float) -> np.ndarray:
    """Class-specific surface marking in [0, 1] (1 = full colour), like the fur or metal of a real class.

    ``x, y`` are pixel offsets in the object's rotated frame; the period is in pixels, so a marking
    looks the same on a small and a large object and a single patch can see it (what this and the
    other world changes did to the toy CLIP: README, "The toy CLIP").
    """
    fx, fy = np.floor(x / period), np.floor(y / period)
    if name == "circle":  # dark polka dots
        dx, dy = x / period - fx - 0.5, y / period - fy - 0.5
        return np.where(dx * dx + dy * dy < 0.09, 0.0, 1.0)
    if name == "square":  # checkerboard
        return ((fx + fy) % 2).astype(np.float32)
    if name == "triangle":  # horizontal stripes
        return (fy % 2).astype(np.float32)
    if name == "star":  # plain
        return np.ones_like(x)
    if name == "cross":  # vertical stripes
        return (fx % 2).astype(np.float32)
    if name == "ring":  # diagonal stripes
        return (np.floor((x + y) / (1.4 * period)) % 2).astype(np.float32)
    if name == "heart":  # concentric bands around the centre
        return (np.floor(np.sqrt(x * x + y * y) / period) % 2).astype(np.float32)
    if name == "diamond":  # thin grid lines
        return np.where(((x / period) % 1.0 < 0.3) | ((y / period) % 1.0 < 0.3), 0.0, 1.0)
    if name == "hexagon":  # light dots on a dark surface
        dx, dy = x / period - fx - 0.5, y / period - fy - 0.5
        return np.where(dx * dx + dy * dy < 0.09, 1.0, 0.0)
    if name == "crescent":  # wavy stripes
        return (np.sin(2 * math.pi * y / (1.5 * period) + 2.0 * np.sin(x / period)) > 0).astype(np.float32)
    raise KeyError(name)


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def make_scene(index: int, split: str = "train", seed: int = 0, size: int = 128, twin: int = 0) -> Scene:
    """Scene ``index`` of ``split``: identical for identical arguments, on any machine.

    ``twin=1`` gives the same scene (layout, colours, sizes, stuff, wording) with every shape
    replaced by another one: a hard negative that only the shape words can tell apart.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown synth split {split!r}; choose one of {sorted(SPLITS)}")
    rng = np.random.default_rng([seed, SPLITS[split][0], index, size])
    # Like web photos, some training pictures are close-ups of a single thing, so a thing's patches
    # are also seen with no stuff around them (README, "The toy CLIP"). Train-only variations draw
    # from their own stream, so the benchmark scenes do not depend on them.
    closeup = split == "train" and np.random.default_rng([seed, 99, index, size]).random() < CLOSEUP_FRACTION
    yy, xx = _grid(size)

    k = 1 if closeup else int(rng.choice([1, 2, 3], p=[0.25, 0.5, 0.25]))
    stuff_ids = rng.choice(len(STUFF_CLASSES), size=k, replace=False)
    region = _stuff_layout(rng, size, k)
    image = np.zeros((size, size, 3), np.float32)
    mask = np.zeros((size, size), np.int64)
    for r, sid in enumerate(stuff_ids):
        inside = region == r
        image[inside] = _texture(STUFF_CLASSES[sid], rng, size)[inside]
        mask[inside] = sid

    stuff_image = image.copy()  # colour choices look at the stuff only, so twins draw identically

    things = []  # (class id, colour name, size name, instance mask)
    instance = np.full((size, size), -1, np.int64)
    for n in range(1 if closeup else int(rng.integers(1, 4))):
        cid = drawn = int(rng.integers(len(THING_CLASSES)))
        if twin:  # a fixed derangement: every shape becomes a different one
            cid = (cid + 1 + (index + n) % (len(THING_CLASSES) - 1)) % len(THING_CLASSES)
        size_name = str(rng.choice(list(SIZES)))
        radius = rng.uniform(*SIZES[size_name]) * size
        if closeup:  # fills most of the picture; its size is not worth a word
            size_name, radius = "medium", rng.uniform(0.3, 0.42) * size
        cy, cx = rng.uniform(radius, size - radius, size=2)
        # small tilts only: a square turned 45 degrees would be a diamond
        angle = rng.uniform(-0.4, 0.4)
        ca, sa = np.float32(math.cos(angle)), np.float32(math.sin(angle))
        dx, dy = (xx - np.float32(cx)) / np.float32(radius), (np.float32(cy) - yy) / np.float32(radius)
        u, v = ca * dx + sa * dy, -sa * dx + ca * dy
        inside = _shape_mask(THING_CLASSES[cid], u, v)
        # of the class's two colours, one that stands out from the stuff under the object's centre;
        # a twin keeps the colour of the shape it replaces, so only shape and marking tell them apart
        under = stuff_image[int(cy), int(cx)]
        family = [COLOUR_FAMILIES[THING_CLASSES[drawn]][j] for j in rng.permutation(2)]
        contrast = [np.abs(np.array(COLOURS[c], np.float32) - under).sum() > 0.45 for c in family]
        colour = family[1] if contrast[1] and not contrast[0] else family[0]
        rgb = np.array(COLOURS[colour], np.float32) * np.float32(rng.uniform(0.9, 1.05))
        marking = _surface(THING_CLASSES[cid], u * np.float32(radius), v * np.float32(radius), 5.0 * size / 128)
        shade = ((0.9 + 0.1 * v.clip(-1, 1)) * (0.55 + 0.45 * marking))[..., None]  # light from above
        image = np.where(inside[..., None], np.clip(rgb * shade, 0, 1), image)
        mask[inside] = len(STUFF_CLASSES) + cid
        instance[inside] = n
        things.append((cid, colour, size_name, int(inside.sum())))

    # Name only what is really visible: things at least 30% unoccluded, stuff >= 5% of the image.
    # All random draws happen before the visibility filter, so twins get the same wording.
    word_draws = rng.random((len(things), 2))
    thing_order = rng.permutation(len(things))
    stuff_order = rng.permutation(len(stuff_ids))
    template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
    descs = []
    for n in thing_order:
        cid, colour, size_name, area = things[n]
        if area == 0 or (instance == n).sum() < 0.3 * area:
            continue
        words = []
        if size_name != "medium" and word_draws[n, 0] < 0.5:
            words.append(size_name)
        # colour named only sometimes: were it always there, captions would match on colour words
        # and the class words would never need a meaning (measured: README, "The toy CLIP")
        if word_draws[n, 1] < 0.3:
            words.append(colour)
        words.append(THING_CLASSES[cid])
        descs.append(("an " if words[0][0] in "aeiou" else "a ") + " ".join(words))
    stuff_names = [STUFF_CLASSES[stuff_ids[k]] for k in stuff_order if (mask == stuff_ids[k]).mean() >= 0.05]
    if not descs:
        caption = _join(stuff_names)
    else:
        caption = template.format(things=_join(descs), stuff=_join(stuff_names or ["a plain background"]))

    pixels = np.clip(image, 0, 1) * 255 + 0.5
    return Scene(image=pixels.astype(np.uint8), mask=mask, caption=caption)


class SynthScenes:
    """Indexable view of one split: ``scenes[i]`` -> :class:`Scene`. No files are stored."""

    classes = CLASSES

    def __init__(self, split: str = "val", seed: int = 0, size: int = 128, length: int | None = None):
        if split not in SPLITS:
            raise ValueError(f"unknown synth split {split!r}; choose one of {sorted(SPLITS)}")
        self.split, self.seed, self.size = split, seed, size
        self.length = SPLITS[split][1] if length is None else length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Scene:
        if not 0 <= index < self.length:
            raise IndexError(index)
        return make_scene(index, self.split, self.seed, self.size)


def export_folder(out: str, split: str = "val", count: int = 100, seed: int = 0, size: int = 128) -> None:
    """Write scenes in the generic folder layout: images/*.png, labels/*.png, classes.txt, captions.txt."""
    from pathlib import Path

    from PIL import Image

    root = Path(out)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    captions = []
    for i in range(count):
        scene = make_scene(i, split, seed, size)
        name = f"{split}_{i:06d}"
        Image.fromarray(scene.image).save(root / "images" / f"{name}.png")
        Image.fromarray(scene.mask.astype(np.uint8)).save(root / "labels" / f"{name}.png")
        captions.append(f"{name}\t{scene.caption}")
    (root / "captions.txt").write_text("\n".join(captions) + "\n")
