"""Image-caption pairs for image-text training (CLIP pretraining, SegCLIP).

Three sources, each indexable: ``pair(i)`` -> (image (H, W, 3) uint8, caption), ``key(i)`` -> a stable
name of the image (for on-disk caches of per-image data such as superpixels), ``len(source)``.

- ``synth``: the synthetic world's captioned train scenes, generated on the fly. With ``twins``,
  item 2k+1 is scene k with every shape replaced (a hard negative; README, "The toy CLIP").
- ``csv``: a CSV file of ``path,caption`` rows (a header row naming the columns is optional; paths
  relative to the CSV's folder). COCO's several captions per image are several rows.
- ``webdataset``: tar shards in the webdataset layout, each sample ``KEY.jpg`` (or .jpeg / .png /
  .webp) with ``KEY.txt`` (or ``KEY.json`` holding a "caption"). Shards are named by a folder, a glob
  (``shards/*.tar``) or a brace range (``cc3m-{00000..00331}.tar``). They are read with the standard
  library's ``tarfile``, by random access: each shard is indexed once (member offsets and captions,
  cached on disk), so item ``i`` reads one image and the trainer's exact resume holds.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import os
import re
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from ..images import ImageReadError, read_image
from .datasets import DatasetError
from .synth import SPLITS, make_scene

PAIR_SOURCES = ("synth", "csv", "webdataset")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
PATH_COLUMNS = ("path", "filepath", "image", "file", "filename")
CAPTION_COLUMNS = ("caption", "text", "title")


class SynthCaptions:
    """The synthetic world's captioned scenes of one split (``twins``: scene k, then its twin)."""

    def __init__(self, split: str = "train", seed: int = 0, size: int = 96, length: int | None = None,
                 twins: bool = False):
        if split not in SPLITS:
            raise DatasetError(f"synth has the splits {', '.join(SPLITS)}, not {split!r}")
        self.split, self.seed, self.size, self.twins = split, seed, size, twins
        self.scenes = SPLITS[split][1] if length is None else length

    def __len__(self) -> int:
        return self.scenes * (2 if self.twins else 1)

    def scene(self, i: int):
        if self.twins:
            return make_scene(i // 2 % self.scenes, self.split, self.seed, self.size, twin=i % 2)
        return make_scene(i % self.scenes, self.split, self.seed, self.size)

    def pair(self, i: int) -> tuple[np.ndarray, str]:
        scene = self.scene(i)
        return scene.image, scene.caption

    def key(self, i: int) -> str:
        return f"synth:{self.split}:{self.seed}:{self.size}:{i if self.twins else i % self.scenes}"


class CsvCaptions:
    """``path,caption`` rows of a CSV file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise DatasetError(f"caption CSV not found: {self.path} (a file of 'path,caption' rows)")
        with open(self.path, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
        if not rows:
            raise DatasetError(f"{self.path} has no rows; expected 'path,caption' per line")
        path_col, caption_col, first = 0, 1, 1
        header = [c.strip().lower() for c in rows[0]]
        if any(c in PATH_COLUMNS for c in header) and any(c in CAPTION_COLUMNS for c in header):
            path_col = next(i for i, c in enumerate(header) if c in PATH_COLUMNS)
            caption_col = next(i for i, c in enumerate(header) if c in CAPTION_COLUMNS)
            rows, first = rows[1:], 2
        base = self.path.resolve().parent
        self.rows: list[tuple[Path, str]] = []
        for n, row in enumerate(rows, start=first):
            if len(row) <= max(path_col, caption_col):
                raise DatasetError(f"{self.path}, row {n}: expected a path and a caption, got {row!r}")
            image = Path(row[path_col].strip())
            self.rows.append((image if image.is_absolute() else base / image, row[caption_col].strip()))
        if not self.rows:
            raise DatasetError(f"{self.path} has a header but no pairs")

    def __len__(self) -> int:
        return len(self.rows)

    def pair(self, i: int) -> tuple[np.ndarray, str]:
        image, caption = self.rows[i]
        try:
            return read_image(image), caption
        except ImageReadError as err:
            raise DatasetError(f"{err} (listed in {self.path}; fix or remove the row)") from err

    def key(self, i: int) -> str:
        return str(self.rows[i][0])


def expand_shards(spec: str | os.PathLike) -> list[Path]:
    """Shard files from a folder (its ``*.tar``), a glob, a brace range ``a-{000..012}.tar``, or one file."""
    spec = str(spec)
    if Path(spec).is_dir():
        return sorted(Path(spec).glob("*.tar"))
    names = [spec]
    while any("{" in n for n in names):
        expanded = []
        for name in names:
            m = re.search(r"\{(\d+)\.\.(\d+)\}", name)
            if m is None:
                raise DatasetError(f"cannot read the shard pattern {spec!r}: braces must hold a range like "
                                   "{00000..00331}")
            lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
            expanded += [name[:m.start()] + str(k).zfill(width) + name[m.end():] for k in range(lo, hi + 1)]
        names = expanded
    out = []
    for name in names:
        out += sorted(Path(p) for p in glob.glob(name)) if any(c in name for c in "*?[") else [Path(name)]
    return out


def _caption_of(data: bytes, ext: str) -> str:
    text = data.decode("utf-8", errors="replace")
    if ext == "json":
        value = json.loads(text)
        return str(value.get("caption") or value.get("text") or "") if isinstance(value, dict) else ""
    return text.strip()


def index_shard(path: Path) -> list[tuple[str, int, int, str]]:
    """(sample key, image offset, image size, caption) of every sample of a shard that has both."""
    images, captions = {}, {}
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            ext = ext.lower()
            if ext in IMAGE_EXTENSIONS:
                images[key] = (member.offset_data, member.size)
            elif ext in ("txt", "json") and key not in captions:
                captions[key] = _caption_of(tar.extractfile(member).read(), ext)
    return [(k, *images[k], captions[k]) for k in sorted(images) if k in captions and captions[k]]


class ShardCaptions:
    """Samples of webdataset tar shards, read by random access (see the module docstring)."""

    def __init__(self, spec: str | os.PathLike, cache_dir: str | os.PathLike | None = None):
        self.shards = expand_shards(spec)
        if not self.shards:
            raise DatasetError(f"no shards found for {spec} (a folder of .tar files, a glob or a brace range)")
        missing = [str(p) for p in self.shards if not p.is_file()]
        if missing:
            raise DatasetError(f"shard file not found: {missing[0]}" + (f" (and {len(missing) - 1} more)"
                                                                         if len(missing) > 1 else ""))
        from ..vocabulary import default_cache_dir

        cache = Path(cache_dir) if cache_dir else default_cache_dir().parent / "shard_index"
        self.samples: list[tuple[int, str, int, int, str]] = []
        for s, shard in enumerate(self.shards):
            for key, offset, size, caption in self._index(shard, cache):
                self.samples.append((s, key, offset, size, caption))
        if not self.samples:
            raise DatasetError(f"the shards of {spec} hold no image with a caption (KEY.jpg + KEY.txt or KEY.json)")

    @staticmethod
    def _index(shard: Path, cache: Path) -> list:
        st = shard.stat()
        name = hashlib.sha256(f"{shard.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:24]
        path = cache / f"{name}.json"
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):  # a broken cache entry is rebuilt
                pass
        try:
            entries = index_shard(shard)
        except tarfile.TarError as err:
            raise DatasetError(f"{shard}: not a readable tar shard ({err})") from err
        try:
            cache.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(entries))
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only cache only costs the scan next time
        return entries

    def __len__(self) -> int:
        return len(self.samples)

    def pair(self, i: int) -> tuple[np.ndarray, str]:
        s, key, offset, size, caption = self.samples[i]
        with open(self.shards[s], "rb") as f:
            f.seek(offset)
            data = f.read(size)
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                return read_image(img), caption
        except (OSError, ValueError) as err:
            raise DatasetError(f"{self.shards[s]}: sample {key} is not a readable image ({err})") from err

    def key(self, i: int) -> str:
        s, key = self.samples[i][:2]
        return f"{self.shards[s].resolve()}#{key}"


def build_pairs(source: str, data_root: str | None = None, *, synth_seed: int = 0, size: int = 96,
                length: int | None = None, twins: bool = False, cache_dir: str | None = None):
    """An image-caption source by name (``PAIR_SOURCES``); ``length`` keeps the first N pairs."""
    if source == "synth":
        return SynthCaptions("train", seed=synth_seed, size=size, length=length, twins=twins)
    if source not in PAIR_SOURCES:
        raise DatasetError(f"unknown image-text source {source!r}; choose one of {', '.join(PAIR_SOURCES)}")
    if not data_root:
        example = "pairs.csv" if source == "csv" else "'shards/cc3m-{00000..00331}.tar'"
        raise DatasetError(f"--dataset {source} needs --data-root (e.g. {example})")
    if source == "csv":
        if not str(data_root).lower().endswith(".csv"):
            raise DatasetError(f"--data-root {data_root} is not a .csv file; for tar shards pass --dataset webdataset")
        pairs = CsvCaptions(data_root)
    else:
        pairs = ShardCaptions(data_root, cache_dir)
    if length:
        pairs = _First(pairs, length)
    return pairs


class _First:
    """The first ``n`` pairs of a source."""

    def __init__(self, pairs, n: int):
        self.pairs, self.n = pairs, min(n, len(pairs))

    def __len__(self) -> int:
        return self.n

    def pair(self, i: int):
        return self.pairs.pair(i)

    def key(self, i: int) -> str:
        return self.pairs.key(i)
