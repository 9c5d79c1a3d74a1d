"""Run folders: what ``vocaseg train METHOD --out runs/NAME`` writes, and how it is loaded again.

A run folder holds
- ``method.json``: the method and its setting, the CLIP it was trained on (architecture, weights
  spec, and a fingerprint of the weights file), the classes and split set it was trained with, the
  model's architecture arguments, inference defaults, the full config and command line, the
  vocaseg version and the format number;
- ``weights.safetensors``: only what the method trained (the frozen CLIP is reloaded from its
  identity), fp16 for shipped runs;
- ``state.pt`` (resume), ``log.jsonl``, ``curves.png``, ``eval.json`` from the trainer.

``Segmenter.from_pretrained("runs/NAME")`` and ``--model runs/NAME`` load one; so do the names of
the runs shipped inside the package (``toy-maskclip-plus`` ...).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

RUN_FORMAT = 1
INFO_FILE = "method.json"
WEIGHTS_FILE = "weights.safetensors"
SHIPPED_RUNS_DIR = Path(__file__).parent / "assets" / "runs"


class RunError(ValueError):
    """A run folder that cannot be loaded as it is; the message says why and what to do."""


def shipped_runs() -> dict[str, Path]:
    """The runs that ship inside the package, by name."""
    if not SHIPPED_RUNS_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(SHIPPED_RUNS_DIR.iterdir()) if (p / INFO_FILE).is_file()}


def find_run(name: str | os.PathLike) -> Path | None:
    """A run folder (a path holding method.json) or a shipped run's name; None for anything else."""
    path = Path(name)
    if (path / INFO_FILE).is_file():
        return path
    return shipped_runs().get(str(name))


def run_inference_defaults(model: str | os.PathLike) -> dict:
    """A run's own inference defaults (its paper's protocol, e.g. whole image), or {} for a CLIP."""
    run = find_run(model)
    return read_run_info(run).get("inference", {}) if run is not None else {}


def read_run_info(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        info = json.loads((path / INFO_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RunError(f"{path / INFO_FILE}: unreadable run description ({err})") from err
    fmt = info.get("format")
    if not isinstance(fmt, int) or fmt > RUN_FORMAT:
        raise RunError(f"{path} was written by a newer vocaseg (run format {fmt}; this one reads up to "
                       f"{RUN_FORMAT}): upgrade with `pip install -U vocaseg`")
    return info


def weights_fingerprint(path: str | os.PathLike) -> dict:
    """Size and a hash of the first 4 MiB: enough to tell files apart, fast for a 600 MB checkpoint."""
    path = Path(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(4 << 20))
    return {"size": path.stat().st_size, "sha256_first_4MiB": h.hexdigest()}


def clip_identity(model: str, pretrained: str | None, resolved: str | None, random_seed: int | None = None) -> dict:
    """How a run names its CLIP: the architecture and weights as the user gave them (a file as an
    absolute path), plus a fingerprint of the file the weights came from. Random weights
    (``pretrained=None``) are named by the seed they were drawn with."""
    spec = pretrained
    if pretrained is not None and os.path.isfile(pretrained):
        spec = str(Path(pretrained).resolve())
    local = Path(model)
    model_spec = str(local.resolve()) if local.is_dir() else model
    ident = {"model": model_spec, "pretrained": spec}
    if pretrained is None and random_seed is not None:
        ident["random_init_seed"] = random_seed
    if resolved is not None and os.path.isfile(resolved):
        ident["fingerprint"] = weights_fingerprint(resolved)
    return ident


def vocaseg_command() -> str:
    return " ".join(["vocaseg"] + sys.argv[1:]) if Path(sys.argv[0]).name in ("vocaseg", "cli.py", "__main__.py") \
        else " ".join(sys.argv)


def training_record(summary: dict) -> dict:
    """The part of method.json that says how a run was trained, from the trainer's summary: steps,
    time, speed, processes, device, final losses and held-out eval, and the resume if there was one."""
    record = {"trained": {k: summary[k] for k in ("steps", "train_seconds_this_run", "steps_per_s_this_run",
                                                  "processes", "device")}
              | {"final": summary["final"], "eval": summary.get("eval")}}
    if summary.get("resumed_from"):
        record["resumed"] = {"from_step": summary["resumed_from"], "command": vocaseg_command()}
    return record


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_run(out: str | os.PathLike, info: dict, weights: dict[str, torch.Tensor], fp16: bool = False) -> Path:
    """Write method.json and weights.safetensors (each atomically) into ``out``."""
    from . import __version__

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    info = {"format": RUN_FORMAT, **info, "vocaseg_version": __version__}
    info.setdefault("git_commit", git_commit())
    tensors = {k: (v.detach().half() if fp16 and v.is_floating_point() else v.detach()).contiguous().cpu()
               for k, v in weights.items()}
    tmp = out / (WEIGHTS_FILE + ".tmp")
    save_file(tensors, str(tmp), metadata={"method": str(info.get("method"))})
    os.replace(tmp, out / WEIGHTS_FILE)
    tmp = out / (INFO_FILE + ".tmp")
    tmp.write_text(json.dumps(info, indent=2, default=str))
    os.replace(tmp, out / INFO_FILE)
    return out


def _load_run_clip(path: Path, info: dict, device, pretrained: str | None):
    """The run's frozen CLIP; ``pretrained`` (not "default") replaces the weights it names."""
    from .loading import WeightsUnavailableError, load_clip

    ident = info["clip"]
    spec = ident.get("pretrained") if pretrained in (None, "default") else pretrained
    if spec not in (None, "default") and (os.sep in spec or spec.endswith((".pt", ".pth", ".bin", ".safetensors"))) \
            and not os.path.isfile(spec):
        raise WeightsUnavailableError(
            f"run {path} was trained with the CLIP weights {spec}, which are not there: put the file back, or "
            f"pass the same weights from another place with --pretrained FILE (Python: pretrained='FILE')")
    model = ident["model"]
    if os.sep in model and not Path(model).is_dir():
        raise WeightsUnavailableError(f"run {path} was trained with the CLIP model folder {model}, which is not "
                                      "there: put it back (the run stores only what it trained)")
    if spec is None and "random_init_seed" in ident:  # the same random weights the run was trained with
        torch.manual_seed(ident["random_init_seed"])
    loaded = load_clip(model, pretrained=spec, device=device)
    expected = ident.get("fingerprint")
    if expected and loaded.pretrained and os.path.isfile(loaded.pretrained):
        got = weights_fingerprint(loaded.pretrained)
        if got != expected:
            raise RunError(f"the CLIP weights {loaded.pretrained} differ from those run {path} was trained with "
                           f"(size {got['size']} vs {expected['size']}, or content): its classifier would not "
                           "match. Pass the original weights with --pretrained FILE")
    return loaded


def load_run(path: str | os.PathLike, device: str | torch.device = "cpu", method: str | None = None,
             templates=None, cache_dir: str | None = None, pretrained: str | None = "default", **config):
    """A :class:`~vocaseg.Segmenter` running a trained method from its run folder.

    The run's inference defaults apply unless ``config`` overrides them; ``method`` may also name a
    training-free rule, to run the same CLIP without the trained part."""
    from .inference import Segmenter
    from .methods import get_method

    path = Path(path)
    info = read_run_info(path)
    entry = get_method(info["method"])
    if not (path / WEIGHTS_FILE).is_file():
        raise RunError(f"{path} has no {WEIGHTS_FILE}: the run did not finish (resume it with --resume)")
    loaded = _load_run_clip(path, info, device, pretrained)
    model = entry.model.from_run(info, loaded)
    state = load_file(str(path / WEIGHTS_FILE))
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise RunError(f"{path / WEIGHTS_FILE} does not fit the {info['method']} model described in {INFO_FILE} "
                       f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    options = {**info.get("inference", {}), **config}
    model_id = loaded.identity
    if model.fine_tunes_text and model_id is not None:  # its own text embeddings, cached apart from the CLIP's
        model_id += f"|run:{weights_fingerprint(path / WEIGHTS_FILE)['sha256_first_4MiB']}"
    return Segmenter(loaded.model, loaded.tokenizer, method=method, templates=templates or info.get("templates"),
                     mean=loaded.mean, std=loaded.std, device=device, model_id=model_id,
                     cache_dir=cache_dir, model=model, **options)
