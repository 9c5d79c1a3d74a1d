"""Class vocabularies, prompt templates and the text-embedding cache.

A class is one or more names (synonyms): ``"tv monitor, television, screen"``; its score at a pixel
is the maximum over its names. The text embedding of a name is the mean over prompt templates of
normalised text features, normalised again.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

# OpenAI's 80 ImageNet prompt templates, as format strings.
IMAGENET_TEMPLATES: tuple[str, ...] = tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)
# MaskCLIP adds five scene templates to those 80.
SCENE_TEMPLATES: tuple[str, ...] = (
    "there is a {} in the scene.", "there is the {} in the scene.", "this is a {} in the scene.",
    "this is the {} in the scene.", "this is one {} in the scene.",
)
DEFAULT_TEMPLATES: tuple[str, ...] = IMAGENET_TEMPLATES + SCENE_TEMPLATES  # 85, as MaskCLIP
TEMPLATE_SETS = {"maskclip85": DEFAULT_TEMPLATES, "imagenet80": IMAGENET_TEMPLATES, "plain": ("{}",),
                 "photo": ("a photo of a {}.",)}

# SCLIP's VOC background: one "background" class that scores as the best of these stuff words.
VOC_BACKGROUND_WORDS: tuple[str, ...] = (
    "sky", "wall", "tree", "wood", "grass", "road", "sea", "river", "mountain", "sands", "desk", "bed",
    "building", "cloud", "lamp", "door", "window", "wardrobe", "ceiling", "shelf", "curtain", "stair",
    "floor", "hill", "rail", "fence",
)


def _char_class(ch: str) -> str:
    """The class of a character for CLIP's BPE pre-split (letters run together, digits stand alone,
    other symbols run together, whitespace separates)."""
    if ch.isspace():
        return "space"
    if ch.isdigit():
        return "digit"
    return "letter" if ch.isalpha() else "other"


def _joins_cleanly(left: str, right: str) -> bool:
    """Whether the pre-split of ``left + right`` is the pre-split of each (no word runs across the seam)."""
    if not left or not right:
        return True
    a, b = _char_class(left[-1]), _char_class(right[0])
    if "'" in (left[-1], right[0]):  # contractions ('s, 't, ...) match across a seam
        return False
    return "space" in (a, b) or "digit" in (a, b) or a != b


def tokenize_prompts(tokenizer, templates: Sequence[str], names: Sequence[str]) -> torch.Tensor:
    """``tokenizer([t.format(n) for n in names for t in templates])``, without tokenizing every prompt.

    CLIP's tokenizer cleans the text, splits it into words and BPE-encodes each word on its own, so
    a prompt's tokens are its template's and its name's tokens put together, where the seam falls
    between words. Each template and name is encoded once and spliced; a prompt whose seam is not
    clean (or text that cleaning could change: non-ASCII, HTML entities) goes through the tokenizer
    whole. 171 classes x 85 templates: 0.16 s instead of 2.4 s on a 2-core CPU.
    """
    from open_clip.tokenizer import SimpleTokenizer, _clean_lower

    if not (isinstance(tokenizer, SimpleTokenizer) and tokenizer.reduction_fn is None
            and tokenizer.clean_fn is _clean_lower):
        return tokenizer([t.format(n) for n in names for t in templates])

    def plain(text: str) -> bool:  # text that cleaning leaves as it is, up to case and spaces
        return text.isascii() and "&" not in text

    sot, eot, length = tokenizer.sot_token_id, tokenizer.eot_token_id, tokenizer.context_length
    split = []  # per template: (prefix, suffix, their tokens) when it has one plain "{}", else None
    for template in templates:
        parts = template.split("{}")
        ok = len(parts) == 2 and plain(template)
        split.append((parts[0], parts[1], tokenizer.encode(parts[0]), tokenizer.encode(parts[1])) if ok else None)
    out = np.zeros((len(names) * len(templates), length), dtype=np.int64)
    row = 0
    for name in names:
        name_ok = plain(name) and name.strip() == name
        name_tokens = tokenizer.encode(name) if name_ok else None
        for template, parts in zip(templates, split):
            if name_ok and parts and _joins_cleanly(parts[0], name) and _joins_cleanly(name, parts[1]):
                tokens = [sot] + parts[2] + name_tokens + parts[3] + [eot]
            else:
                tokens = [sot] + tokenizer.encode(template.format(name)) + [eot]
            if len(tokens) > length:  # the tokenizer's own truncation
                tokens = tokens[:length]
                tokens[-1] = eot
            out[row, :len(tokens)] = tokens
            row += 1
    return torch.from_numpy(out)


class VocabularyError(ValueError):
    """An unusable class list (empty, duplicate, malformed)."""


@dataclass(frozen=True)
class Vocabulary:
    """Classes, each a tuple of names to score; ``labels`` are display names (default: first name)."""

    classes: tuple[tuple[str, ...], ...]
    labels: tuple[str, ...] | None = None

    @classmethod
    def parse(cls, classes: Sequence[str] | str) -> "Vocabulary":
        """Build from a list of entries ("dog, puppy" = one class, two names) or one CLI string.

        A single string is split into classes at ';' when it has one, else at ','
        ("cat, dog, grass" = three classes; "tv, television; cat" = two classes, the first with a synonym).
        """
        if isinstance(classes, str):
            sep = ";" if ";" in classes else ","
            entries = [[n.strip() for n in e.split(",")] if sep == ";" else [e.strip()]
                       for e in classes.split(sep)]
        else:
            entries = [[n.strip() for n in str(e).split(",")] for e in classes]
        entries = [tuple(n for n in names if n) for names in entries]
        entries = [names for names in entries if names]
        if not entries:
            raise VocabularyError("the class list is empty: name at least one class, e.g. --classes \"cat, dog, grass\"")
        seen: dict[str, str] = {}
        for names in entries:
            for name in names:
                key = name.lower()
                if key in seen:
                    where = "listed twice" if seen[key] == names[0] or seen[key].lower() == key else \
                        f"also a name of class {seen[key]!r}"
                    raise VocabularyError(f"duplicate class name {name!r} ({where}); each name may appear once")
                seen[key] = names[0]
        return cls(tuple(entries))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Vocabulary":
        """One class per line, synonyms separated by commas; blank lines and '#' comments ignored."""
        path = Path(path)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as err:
            raise VocabularyError(f"cannot read class file {path}: {err.strerror}") from err
        return cls.parse([ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")])

    @property
    def names(self) -> list[str]:
        """Display names, one per class."""
        return list(self.labels) if self.labels else [names[0] for names in self.classes]

    def __len__(self) -> int:
        return len(self.classes)

    def with_background(self, words: Sequence[str] = ("background",)) -> "Vocabulary":
        """Prepend a class shown as "background" (index 0) and scored as the best of ``words``."""
        if "background" in (n.lower() for n in self.names):
            raise VocabularyError("the class list already has a 'background' class; do not add another")
        return Vocabulary((tuple(words),) + self.classes, ("background",) + tuple(self.names))

    def prompt_names(self) -> tuple[list[str], list[int]]:
        """All names to embed, and the class index of each."""
        names, owner = [], []
        for i, cls_names in enumerate(self.classes):
            names.extend(cls_names)
            owner.extend([i] * len(cls_names))
        return names, owner


def parse_background(text: str | None) -> bool | list[str] | None:
    """What a background option says: '' -> None (no background class), 'background' -> True (a class
    'background' scored as that word), 'sky, wall' -> those words, scored as one class 'background'."""
    text = (text or "").strip()
    if not text:
        return None
    if text.lower() == "background":
        return True
    words = [w.strip() for w in text.split(",") if w.strip()]
    return words or None


def resolve_templates(templates: Sequence[str] | str | None) -> tuple[str, ...]:
    if templates is None:
        return DEFAULT_TEMPLATES
    if isinstance(templates, str):
        if templates in TEMPLATE_SETS:
            return TEMPLATE_SETS[templates]
        path = Path(templates)
        if path.is_file():
            templates = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        else:
            raise VocabularyError(
                f"unknown template set {templates!r}: use one of {', '.join(TEMPLATE_SETS)} or a file, one template per line")
    templates = tuple(templates)
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise VocabularyError(f"each template needs exactly one '{{}}' for the class name; bad: {bad[:3]}")
    return templates


def default_cache_dir() -> Path:
    return Path(os.environ.get("VOCASEG_CACHE", Path.home() / ".cache" / "vocaseg")) / "text"


class TextEmbeddingCache:
    """Memory + on-disk cache of per-name text embeddings, keyed by model, templates and name."""

    def __init__(self, directory: str | os.PathLike | None = None, enabled: bool = True):
        self.directory = Path(directory) if directory else default_cache_dir()
        self.enabled = enabled
        self.memory: dict[str, torch.Tensor] = {}

    @staticmethod
    def key(model_id: str, templates: Sequence[str], name: str) -> str:
        blob = json.dumps([model_id, list(templates), name], ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def get(self, key: str) -> torch.Tensor | None:
        if key in self.memory:
            return self.memory[key]
        if self.enabled:
            path = self.directory / f"{key}.pt"
            if path.is_file():
                try:
                    value = torch.load(path, map_location="cpu", weights_only=True)
                except Exception:  # a corrupt cache entry is recomputed, never fatal
                    return None
                self.memory[key] = value
                return value
        return None

    def put(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().float().cpu()
        self.memory[key] = value
        if self.enabled:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                tmp = self.directory / f".{key}.{os.getpid()}.tmp"
                torch.save(value, tmp)
                os.replace(tmp, self.directory / f"{key}.pt")
            except OSError:
                pass  # a read-only home is no reason to fail a segmentation
