"""Load a CLIP model through open_clip's public API: pretrained tags, local checkpoints, the toy.

Weights are kept apart from architectures: ``name`` picks an open_clip architecture (or ``toy``,
the small CLIP shipped inside vocaseg, or a folder holding ``open_clip_config.json``) and
``pretrained`` picks the weights: an open_clip tag, a local file, ``"default"`` or ``None``
(random init). Offline, a tag whose weights are not cached fails within seconds with a message
that says how to pass a local file, instead of open_clip's minute of retries.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
import socket
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import open_clip
import torch

from .towers import apply_tower_config

TOY_DIR = Path(__file__).parent / "assets" / "toy"
TOY_WEIGHTS = TOY_DIR / "open_clip_model.safetensors"
MODEL_ALIASES = {"toy": TOY_DIR}


class WeightsUnavailableError(RuntimeError):
    """The requested weights cannot be had here (offline and not cached, or a missing file)."""


class ModelNotFoundError(ValueError):
    """An unknown architecture name, or a checkpoint that does not fit the architecture."""


@dataclass
class LoadedCLIP:
    model: torch.nn.Module
    tokenizer: Callable
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    name: str
    pretrained: str | None

    @property
    def identity(self) -> str | None:
        """A stable id of these weights for on-disk caches (None for random weights, never cached).
        A file's size and mtime are part of it, so a replaced file at the same path misses old entries."""
        if self.pretrained is None:
            return None
        ident = f"{self.name}|{self.pretrained}"
        if os.path.isfile(self.pretrained):
            st = os.stat(self.pretrained)
            ident += f"|{st.st_size}|{st.st_mtime_ns}"
        return ident


def _local_dir(name: str) -> Path | None:
    if name in MODEL_ALIASES:
        return MODEL_ALIASES[name]
    path = Path(name)
    if path.is_dir() and (path / "open_clip_config.json").is_file():
        return path
    return None


def _host_reachable(url_or_host: str, timeout: float = 3.0) -> bool:
    host = urlparse(url_or_host).hostname or url_or_host
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _cached_weights(cfg: dict, cache_dir: str | None) -> str | None:
    """A previously downloaded file for an open_clip pretrained cfg, or None."""
    hub = cfg.get("hf_hub", "")
    if hub:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover - open_clip depends on huggingface_hub
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            repo_id, filename = os.path.split(hub.rstrip("/")) if not hub.endswith("/") else (hub.rstrip("/"), "")
            names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
            for fname in names:
                hit = try_to_load_from_cache(repo_id, fname, cache_dir=cache_dir)
                if isinstance(hit, str) and os.path.isfile(hit):
                    return hit
    url = cfg.get("url", "")
    if url:
        root = cache_dir or os.path.expanduser("~/.cache/clip")
        candidate = os.path.join(root, os.path.basename(urlparse(url).path))
        if os.path.isfile(candidate):
            return candidate
    return None


def _resolve_tag(name: str, tag: str, cache_dir: str | None) -> tuple[str, dict]:
    """Return (tag or cached file path, pretrained cfg); fail fast when offline and not cached."""
    tags = open_clip.list_pretrained_tags_by_model(name)
    if tag == "default":
        if not tags:
            raise WeightsUnavailableError(
                f"open_clip has no pretrained weights for {name!r}; pass pretrained=None for random init "
                "or a local checkpoint path")
        tag = "openai" if "openai" in tags else tags[0]
    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg:
        raise WeightsUnavailableError(
            f"{tag!r} is neither a pretrained tag of {name!r} nor an existing file. "
            f"Tags for {name}: {', '.join(tags) or 'none'}")
    cached = _cached_weights(cfg, cache_dir)
    if cached:
        return cached, cfg
    hosts = [h for h in (cfg.get("url"), "huggingface.co" if cfg.get("hf_hub") else None) if h]
    if hosts and not any(_host_reachable(h) for h in hosts):
        raise WeightsUnavailableError(
            f"cannot download {name} weights {tag!r}: no network connection to "
            f"{', '.join(urlparse(h).hostname or h for h in hosts)} and no cached copy. Download the file on a "
            f"machine with internet (e.g. {cfg.get('url') or 'https://huggingface.co/' + cfg['hf_hub']}) and pass "
            f"its path: --pretrained /path/to/file.pt (Python: pretrained='/path/to/file.pt')")
    return tag, cfg


class _NoRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextlib.contextmanager
def _weights_loaded_after():
    """open_clip warns "initialized randomly" when it builds an empty model; we load weights next."""
    root, flt = logging.getLogger(), _NoRandomInitWarning()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


def _is_torchscript(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("constants.pkl") for n in zf.namelist())


def load_clip(
    name: str,
    pretrained: str | None = "default",
    device: str | torch.device = "cpu",
    cache_dir: str | None = None,
    quick_gelu: bool | None = None,
) -> LoadedCLIP:
    """Build an open_clip model and its tokenizer, with weights from a tag, a file, or none.

    pretrained: ``"default"`` (the shipped weights for ``toy``, OpenAI's where open_clip has them),
    an open_clip tag such as ``"openai"`` or ``"laion2b_s34b_b88k"``, a local file (OpenAI ``.pt``
    TorchScript or state dict, open_clip ``.bin/.pt/.pth/.safetensors``), or ``None`` (random init).
    quick_gelu: force QuickGELU (OpenAI's activation); None decides from the weights' source.
    """
    local = _local_dir(name)
    if local is not None:
        spec = f"local-dir:{local}"
        weights = None
        if pretrained == "default":
            found = sorted(local.glob("*.safetensors")) + sorted(local.glob("*.bin")) + sorted(local.glob("*.pt"))
            if not found:
                raise WeightsUnavailableError(
                    f"no weights found in {local}; pass pretrained=None for random init or a checkpoint path")
            weights = str(found[0])
        elif pretrained is not None:
            if not os.path.isfile(pretrained):
                raise WeightsUnavailableError(f"checkpoint file not found: {pretrained}")
            weights = pretrained
        with _weights_loaded_after():
            model = open_clip.create_model(spec, load_weights=False, device="cpu")
        apply_tower_config(model, json.loads((local / "open_clip_config.json").read_text()))
        if weights is not None:
            open_clip.load_checkpoint(model, weights, strict=True)
        tokenizer = open_clip.get_tokenizer(spec)
        mean, std = model.visual.image_mean, model.visual.image_std
        return LoadedCLIP(model.to(device).eval(), tokenizer, tuple(mean), tuple(std), name, weights)

    name = name.replace("/", "-")
    if name not in open_clip.list_models():
        close = difflib.get_close_matches(name, open_clip.list_models(), n=5)
        raise ModelNotFoundError(
            f"unknown model {name!r}. Did you mean: {', '.join(close) or '-'}? "
            "(`python -c 'import open_clip; print(open_clip.list_models())'` lists all; 'toy' is the shipped one)")

    kwargs = {}
    if pretrained is None:
        model = open_clip.create_model(name, pretrained=None, device="cpu", force_quick_gelu=bool(quick_gelu))
    elif os.path.isfile(pretrained):
        if _is_torchscript(pretrained):  # OpenAI's release format; architecture is read from the weights
            from open_clip.model import build_model_from_openai_state_dict

            state = torch.jit.load(pretrained, map_location="cpu").state_dict()
            for key in ("input_resolution", "context_length", "vocab_size", "attn_mask"):
                state.pop(key, None)  # archive attributes and buffers that are not weights
            model = build_model_from_openai_state_dict(state).float()  # it builds in fp16
        else:
            with _weights_loaded_after():
                model = open_clip.create_model(name, pretrained=None, device="cpu",
                                               force_quick_gelu=bool(quick_gelu))
            try:
                open_clip.load_checkpoint(model, pretrained, strict=True)
            except RuntimeError as err:
                raise ModelNotFoundError(f"checkpoint {pretrained} does not fit architecture {name!r}: "
                                 f"{str(err).splitlines()[0]}") from err
    elif isinstance(pretrained, str) and (os.sep in pretrained or pretrained.endswith(
            (".pt", ".pth", ".bin", ".safetensors"))):
        raise WeightsUnavailableError(f"checkpoint file not found: {pretrained}")
    else:
        source, cfg = _resolve_tag(name, pretrained, cache_dir)
        if quick_gelu is None:
            quick_gelu = bool(cfg.get("quick_gelu", False))
        kwargs = {"force_quick_gelu": quick_gelu}
        if os.path.isfile(source):  # cached copy: load without touching the network
            with _weights_loaded_after():
                model = open_clip.create_model(name, pretrained=None, device="cpu", **kwargs)
            open_clip.load_checkpoint(model, source, strict=True)
        else:
            model = open_clip.create_model(name, pretrained=source, device="cpu", cache_dir=cache_dir, **kwargs)
        pretrained = source if os.path.isfile(source) else pretrained
    tokenizer = open_clip.get_tokenizer(name)
    mean = getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    return LoadedCLIP(model.to(device).eval(), tokenizer, tuple(mean), tuple(std), name, pretrained)
