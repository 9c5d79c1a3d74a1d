"""``vocaseg gallery``: the same synthetic scenes segmented by every method available, side by side.

One PNG grid: a row per scene; columns image, ground truth, then each method (the training-free rules
the CLIP's tower supports, then the trained runs); each method's header carries its mIoU over the
drawn scenes, each cell the image's own mIoU; one legend of the classes below. Beside it a JSON with
the numbers. Every method runs through :func:`~vocaseg.evaluation.evaluate` with the synth
benchmark's protocol (a trained run with its own inference defaults, as ``vocaseg eval`` does), so
the mIoU equals ``vocaseg eval --dataset synth --split SPLIT --limit N --model M --method X``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from .visualize import class_colour, text_font, tint

RULE_LABELS = {"raw": "raw CLIP", "maskclip": "MaskCLIP", "sclip": "SCLIP", "clearclip": "ClearCLIP",
               "naclip": "NACLIP"}
# grid geometry (pixels); written to gallery.json so a reader can find any panel
CELL, GAP, HEADER, FONT = 160, 4, 70, 12


@dataclass(frozen=True)
class GalleryMethod:
    label: str  # column header
    model: str  # a CLIP name or a run (folder or shipped name)
    method: str | None  # a training-free rule, or None: the run's trained method
    kind: str  # "training-free" or "trained: <method>"
    setting: str = ""  # a run's training setting (annotation-free, transductive on a split set ...)


def load_clip_segmenter(model: str, pretrained: str | None, device: str, dataset):
    """``model`` as ``vocaseg eval`` loads it for ``dataset``: the dataset's protocol and templates, or a
    run's own inference defaults and templates."""
    from . import Segmenter
    from .runs import find_run, run_inference_defaults

    templates = None if find_run(model) is not None else dataset.templates
    return Segmenter.from_pretrained(model, pretrained=pretrained, device=device, templates=templates,
                                     **{**dataset.protocol, **run_inference_defaults(model)})


def gallery_methods(base, model: str, runs: Sequence[str] | None = None) -> list[GalleryMethod]:
    """The columns: every training-free rule ``base`` (the loaded ``model``) runs, ``model``'s trained
    method if it is a run, then ``runs`` (default: the shipped runs trained on the CLIP ``model``)."""
    from .runs import find_run, read_run_info, shipped_runs

    trained = base.trained.name if base.trained is not None else None
    columns = [GalleryMethod(RULE_LABELS.get(r, r), model, r, "training-free") for r in base.methods if r != trained]
    if trained is not None:
        columns.append(_run_column(model, find_run(model)))
    if runs is None:
        runs = [name for name, path in shipped_runs().items() if read_run_info(path)["clip"]["model"] == model]
    for run in runs:
        path = find_run(run)
        if path is None:
            raise FileNotFoundError(f"{run}: neither a run folder (with method.json) nor a shipped run")
        columns.append(_run_column(str(run), path))
    return columns


def _run_column(run: str, path: Path) -> GalleryMethod:
    from .runs import read_run_info

    info = read_run_info(path)
    setting = info.get("setting") or ""
    if info.get("split_set"):
        setting += f" ({info['split_set']})"
    return GalleryMethod(Path(run).name, run, None, f"trained: {info['method']}", setting)


def make_gallery(out: str | Path, scenes: int = 5, split: str = "test", model: str = "toy",
                 pretrained: str | None = "default", runs: Sequence[str] | None = None, device: str = "cpu",
                 overwrite: bool = False) -> dict:
    """Draw the gallery into ``out`` (gallery.png, gallery.json); returns what gallery.json holds."""
    import torch

    from .data.datasets import build_dataset
    from .evaluation import evaluate, image_scores

    out = Path(out)
    if (out / "gallery.png").exists() and not overwrite:
        raise FileExistsError(f"{out / 'gallery.png'} exists; pass --overwrite to replace it")
    if scenes < 1:
        raise ValueError("draw at least one scene (--scenes 1 or more)")
    dataset = build_dataset("synth", split=split, length=scenes)
    base = load_clip_segmenter(model, pretrained, device, dataset)
    columns = gallery_methods(base, model, runs)
    truth = [dataset[i] for i in range(len(dataset))]
    records, predictions = [], []
    for col in columns:
        if col.model == model:  # a rule (or the trained method) of the model loaded once
            seg = base.with_options(method=col.method or base.trained.name)
        else:
            seg = load_clip_segmenter(col.model, "default", device, dataset)
        preds: list[np.ndarray] = []
        result = evaluate(seg, dataset, workers=0, progress=False,
                          on_image=lambda sample, pred: preds.append(pred.cpu().numpy()))
        per_scene = [image_scores(torch.from_numpy(p), torch.from_numpy(s.label), len(dataset.classes))
                     for p, s in zip(preds, truth)]
        records.append({"label": col.label, "model": col.model, "method": seg.method, "kind": col.kind,
                        "setting": col.setting,
                        "mIoU": result["mIoU"], "aAcc": result["aAcc"],
                        "scene_mIoU": [None if s is None else s[0] for s in per_scene]})
        predictions.append(preds)
        print(f"{col.label:<24s} {col.kind:<28s} mIoU over these {len(truth)} scenes {result['mIoU']:.1f}")
    grid = _draw(truth, predictions, records, dataset.classes)
    out.mkdir(parents=True, exist_ok=True)
    grid.save(out / "gallery.png", optimize=True)
    info = {"split": split, "scenes": len(truth), "scene_ids": [s.id for s in truth], "classes": dataset.classes,
            "protocol": dataset.protocol, "methods": records,
            "layout": {"cell": CELL, "gap": GAP, "header": HEADER,
                       "columns": ["image", "ground truth"] + [r["label"] for r in records]}}
    (out / "gallery.json").write_text(json.dumps(info, indent=2))
    print(f"gallery -> {out / 'gallery.png'} ({len(truth)} scenes x {len(records)} methods), numbers in "
          f"{out / 'gallery.json'}")
    return info


def panel_box(row: int, col: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the image cell at ``row``, ``col`` of the grid."""
    x = GAP + col * (CELL + GAP)
    y = HEADER + row * (CELL + GAP)
    return x, y, x + CELL, y + CELL


def cell_image(image: np.ndarray, labels: np.ndarray | None, num_classes: int) -> Image.Image:
    """What a cell shows: the picture (labels None) or the picture tinted by ``labels``, at CELL px."""
    shown = image if labels is None else tint(image, labels, num_classes)
    return Image.fromarray(shown).resize((CELL, CELL), Image.NEAREST)


def _draw(truth, predictions, records, classes) -> Image.Image:
    n_rows, n_cols, c = len(truth), 2 + len(records), len(classes)
    font, small = text_font(FONT), text_font(FONT - 1)
    legend_cols = max(1, (GAP + n_cols * (CELL + GAP)) // 150)
    legend_rows = -(-c // legend_cols)
    width = GAP + n_cols * (CELL + GAP)
    grid_bottom = HEADER + n_rows * (CELL + GAP)
    canvas = Image.new("RGB", (width, grid_bottom + 8 + legend_rows * 20 + 6), "white")
    draw = ImageDraw.Draw(canvas)
    heads = [("image", "", "", ""), ("ground truth", "", "", "")] + [
        (r["label"], r["kind"], r["setting"], f"mIoU {r['mIoU']:.1f}") for r in records]
    for col, lines in enumerate(heads):
        x = GAP + col * (CELL + GAP)
        for k, line in enumerate(lines):
            draw.text((x + 2, 3 + k * (FONT + 4)), line, fill="black", font=font if k in (0, 3) else small)
    for row, sample in enumerate(truth):
        cells = [cell_image(sample.image, None, c), cell_image(sample.image, sample.label, c)]
        cells += [cell_image(sample.image, preds[row], c) for preds in predictions]
        for col, cell in enumerate(cells):
            canvas.paste(cell, panel_box(row, col)[:2])
        for col, r in enumerate(records, 2):
            score = r["scene_mIoU"][row]
            if score is not None:
                x0, y0, _, _ = panel_box(row, col)
                text = f"{score:.0f}"
                box = draw.textbbox((x0 + 3, y0 + 2), text, font=small)
                draw.rectangle([box[0] - 2, box[1] - 1, box[2] + 2, box[3] + 1], fill="white")
                draw.text((x0 + 3, y0 + 2), text, fill="black", font=small)
    for i, name in enumerate(classes):
        x = GAP + (i % legend_cols) * 150
        y = grid_bottom + 8 + (i // legend_cols) * 20
        draw.rectangle([x, y, x + 14, y + 14], fill=class_colour(i, c), outline="black")
        draw.text((x + 20, y), name, fill="black", font=font)
    return canvas
