"""``vocaseg eval --report DIR``: an evaluation as a page people look at.

``DIR/index.html`` (opens from disk, no server) shows the summary metrics, the per-class IoU as a
bar chart and a table, the confusion matrix as a heat map, and the images where the method does
worst, each as picture | ground truth | prediction with legends. Beside it: ``eval.json`` (the same
result ``--out`` writes, every number of the page comes from it), ``confusion_matrix.csv`` (pixel
counts) and the PNGs. Figures are drawn with matplotlib's object API (Agg canvas, no pyplot state).
"""

from __future__ import annotations

import csv
import html
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from .visualize import class_colour, overlay, picture, side_by_side

SUMMARY_KEYS = ("aAcc", "mIoU", "mAcc", "fwIoU", "pAcc", "mIoU_seen", "mIoU_unseen", "hIoU")
REPORT_FILES = ("index.html", "eval.json", "per_class_iou.png", "confusion.png", "confusion_matrix.csv")


def fmt(value: float | None) -> str:
    """How every metric is printed in the report (and how a test reads it back)."""
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def per_class_chart(result: dict, path: Path) -> None:
    """Horizontal bars, best class on top; classes absent from ground truth and prediction listed last."""
    names = list(result["per_class"])
    unseen = set(result.get("unseen_classes") or ())
    scored = sorted((n for n in names if result["per_class"][n]["IoU"] is not None),
                    key=lambda n: -result["per_class"][n]["IoU"])
    absent = [n for n in names if result["per_class"][n]["IoU"] is None]
    order = scored + absent
    n = len(order)
    fig = _figure(7.5, max(2.5, 0.22 * n + 1.2))
    ax = fig.add_subplot(111)
    ys = np.arange(n)
    values = [result["per_class"][c]["IoU"] or 0.0 for c in order]
    colours = [np.array(class_colour(names.index(c), len(names))) / 255 for c in order]
    bars = ax.barh(ys, values, color=colours, edgecolor="black", linewidth=0.4)
    for bar, c in zip(bars, order):
        if c in unseen:
            bar.set_hatch("//")
    labels = [c + (" (unseen)" if c in unseen else "") + (" (absent)" if c in absent else "") for c in order]
    ax.set_yticks(ys, labels, fontsize=8 if n <= 60 else 5)
    ax.invert_yaxis()
    ax.set_xlim(0, 109)
    ax.set_xticks(range(0, 101, 20))
    ax.set_xlabel("IoU (%)")
    ax.axvline(result["mIoU"], color="black", linestyle="--", linewidth=1)
    ax.text(result["mIoU"], -0.8, f" mIoU {fmt(result['mIoU'])}", fontsize=8, va="bottom")
    if n <= 60:
        for y, v, c in zip(ys, values, order):
            if c not in absent:
                ax.text(v + 1, y, fmt(v), va="center", fontsize=7)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90 if n <= 60 else 150)  # small labels stay legible when zoomed


def confusion_chart(matrix: np.ndarray, classes: Sequence[str], path: Path) -> None:
    """Rows: ground truth; columns: prediction; each row as % of that class's pixels. A last column
    'no prediction' appears when some pixels got none."""
    counts = matrix.astype(np.float64)
    cols = list(classes)
    if counts[:, -1].sum() == 0:
        counts = counts[:, :-1]
    else:
        cols.append("no prediction")
    rows = counts.sum(1, keepdims=True)
    share = np.divide(100 * counts, rows, out=np.zeros_like(counts), where=rows > 0)
    n = len(classes)
    cell = 0.34 if n <= 40 else max(0.08, 14 / n)
    fig = _figure(max(5.0, cell * len(cols) + 3), max(4.0, cell * n + 2.5))
    ax = fig.add_subplot(111)
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=100, aspect="auto", interpolation="nearest")
    size = 8 if n <= 40 else 4
    ax.set_xticks(np.arange(len(cols)), cols, rotation=90, fontsize=size)
    ax.set_yticks(np.arange(n), classes, fontsize=size)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    if n <= 25:
        for i in range(n):
            for j in range(len(cols)):
                if share[i, j] >= 0.5:
                    ax.text(j, i, f"{share[i, j]:.0f}", ha="center", va="center", fontsize=6,
                            color="white" if share[i, j] > 60 else "black")
    fig.colorbar(im, ax=ax, label="% of the class's ground-truth pixels", shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=90 if n <= 40 else 150)


def write_report(result: dict, out_dir: str | Path, classes: Sequence[str], matrix, worst=None) -> Path:
    """Write the report of ``result`` (what :func:`~vocaseg.evaluation.evaluate` returned, with its
    ``config``) into ``out_dir``; ``matrix``: the (C, C+1) confusion counts; ``worst``: a
    :class:`~vocaseg.evaluation.WorstImages` that saw the evaluation. Returns the index.html path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    matrix = np.asarray(matrix.cpu() if hasattr(matrix, "cpu") else matrix)
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    with open(out / "confusion_matrix.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ground truth \\ prediction"] + list(classes) + ["no prediction"])
        for name, row in zip(classes, matrix.tolist()):
            w.writerow([name] + row)
    per_class_chart(result, out / "per_class_iou.png")
    confusion_chart(matrix, classes, out / "confusion.png")
    figures = []
    for rank, item in enumerate(worst.items if worst is not None else [], 1):
        name = f"worst_{rank}.png"
        side_by_side([picture(item["image"], title=str(item["id"])),
                      overlay(item["image"], item["label"], classes, title="ground truth"),
                      overlay(item["image"], item["prediction"], classes,
                              title=f"prediction (mIoU {fmt(item['mIoU'])})")]).save(out / name)
        figures.append((name, item))
    index = out / "index.html"
    index.write_text(_html(result, figures))
    return index


def _html(result: dict, figures: list) -> str:
    e = html.escape
    cfg = result.get("config", {})
    title = (f"{cfg.get('model', '?')} / {cfg.get('method', '?')} on {cfg.get('dataset', '?')} "
             f"({cfg.get('split', '?')})")
    summary = "".join(f'<tr><th>{k}</th><td data-key="{k}">{fmt(result[k])}</td></tr>'
                      for k in SUMMARY_KEYS if k in result)
    unseen = set(result.get("unseen_classes") or ())
    rows = "".join(
        f'<tr data-class="{e(name)}"><td>{e(name)}{" <i>(unseen)</i>" if name in unseen else ""}</td>'
        f'<td class="iou">{fmt(v["IoU"])}</td><td class="acc">{fmt(v["Acc"])}</td></tr>'
        for name, v in result["per_class"].items())
    worst = "".join(
        f'<figure data-id="{e(str(item["id"]))}"><img src="{name}" alt="{e(str(item["id"]))}">'
        f'<figcaption>#{k} <b>{e(str(item["id"]))}</b>: image mIoU <span class="miou">{fmt(item["mIoU"])}'
        f'</span>, pixel accuracy <span class="aacc">{fmt(item["aAcc"])}</span></figcaption></figure>'
        for k, (name, item) in enumerate(figures, 1))
    if not figures:
        worst = "<p>No images were kept (--report-worst 0).</p>"
    setup = "".join(f"<tr><th>{e(k)}</th><td>{e(str(cfg[k]))}</td></tr>" for k in
                    ("model", "pretrained", "method", "dataset", "data_root", "split", "split_set", "templates")
                    if cfg.get(k) is not None)
    setup += f"<tr><th>images</th><td>{result.get('num_images', '?')}</td></tr>"
    if "seconds" in result:
        setup += f"<tr><th>seconds</th><td>{result['seconds']}</td></tr>"
    command = f"<p>Command: <code>{e(cfg['command'])}</code></p>" if cfg.get("command") else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>vocaseg eval: {e(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1400px; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 2px 10px; text-align: left; }}
td.iou, td.acc, td[data-key] {{ text-align: right; font-variant-numeric: tabular-nums; }}
figure {{ margin: 1em 0; }} img {{ max-width: 100%; }}
.cols {{ display: flex; gap: 2em; align-items: flex-start; flex-wrap: wrap; }}
</style></head><body>
<h1>vocaseg eval: {e(title)}</h1>
<div class="cols"><div><h2>Summary</h2><table id="summary">{summary}</table></div>
<div><h2>Setup</h2><table id="setup">{setup}</table></div></div>
<p>Every number on this page is in <a href="eval.json">eval.json</a> (percent, 2 decimals).
Classes absent from both ground truth and prediction have no IoU (-) and are left out of the means.</p>
<h2>Per-class IoU</h2>
<div class="cols"><img src="per_class_iou.png" alt="per-class IoU">
<table id="per-class"><tr><th>class</th><th>IoU</th><th>Acc</th></tr>{rows}</table></div>
<h2>Confusion matrix</h2>
<p>Rows: ground truth; columns: prediction; each row in % of that class's pixels.
Pixel counts: <a href="confusion_matrix.csv">confusion_matrix.csv</a>.</p>
<img src="confusion.png" alt="confusion matrix">
<h2>Where it does worst</h2>
<p>The images with the lowest image mIoU (mean IoU over the classes in the image's ground truth or
prediction), worst first: picture | ground truth | prediction.</p>
<div id="worst">{worst}</div>
{command}
</body></html>
"""
