"""``vocaseg demo``: runs offline on any machine. Generates synthetic scenes, segments them with the
shipped toy CLIP from free-form class names, writes picture + ground truth + prediction panels and
prints the mIoU."""

from __future__ import annotations

from pathlib import Path

import torch

from .data.synth import CLASSES, SynthScenes
from .evaluation import ConfusionMatrix
from .visualize import overlay, picture, side_by_side

# What a person might type; the index is the synth class id (so the ground truth can be scored).
DEMO_CLASS_NAMES = [
    "blue sky", "green grass", "water, waves", "sand, beach", "brick wall, bricks", "wood, wooden planks",
    "circle, disc", "square", "triangle", "star", "cross, plus sign", "ring", "heart", "diamond", "hexagon",
    "crescent, moon",
]


def _fresh_folder(out: Path, overwrite: bool) -> Path:
    if overwrite or not out.exists() or not any(out.iterdir()):
        return out
    k = 2
    while (out.parent / f"{out.name}-{k}").exists():
        k += 1
    fresh = out.parent / f"{out.name}-{k}"
    print(f"{out} already has files; writing to {fresh} (pass --overwrite to reuse {out})")
    return fresh


# (model, method, label): the training-free teacher, then the shipped MaskCLIP+ student trained from it
DEMO_MODELS = [("toy", "maskclip", "MaskCLIP (toy CLIP)"), ("toy-maskclip-plus", None, "MaskCLIP+ (shipped run)")]


def run_demo(out: str = "vocaseg-demo", num_scenes: int = 6, overwrite: bool = False, device: str = "cpu",
             models=None) -> dict[str, float]:
    """Segment ``num_scenes`` synth test scenes with each model; returns {label: mIoU}."""
    from . import Segmenter
    from .runs import shipped_runs

    models = [m for m in (models or DEMO_MODELS) if m[0] == "toy" or m[0] in shipped_runs()]
    out_dir = _fresh_folder(Path(out), overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    scenes = SynthScenes("test", length=num_scenes)
    panels = [[picture(s.image, title="image"),
               overlay(s.image, s.mask, DEMO_CLASS_NAMES, title="ground truth")] for s in scenes]
    scores = {}
    for name, method, label in models:
        seg = Segmenter.from_pretrained(name, method=method, device=device, mode="whole", short_side=96)
        results = seg.predict_batch([s.image for s in scenes], DEMO_CLASS_NAMES)
        cm = ConfusionMatrix(len(CLASSES), device=seg.device)
        for panel, scene, res in zip(panels, scenes, results):
            cm.update(res.labels_tensor(), torch.from_numpy(scene.mask))
            panel.append(overlay(scene.image, res.labels, res.classes, title=label))
        metrics = cm.compute(DEMO_CLASS_NAMES)
        scores[label] = metrics["mIoU"]
        print(f"{label}: mIoU over these {num_scenes} scenes {metrics['mIoU']:.1f} "
              f"(pixel accuracy {metrics['aAcc']:.1f})")
    for i, (scene, panel) in enumerate(zip(scenes, panels)):
        path = out_dir / f"scene_{i}.png"
        side_by_side(panel).save(path)
        print(f"{path}: \"{scene.caption}\"")
    print(f"pictures in {out_dir}/ (image | ground truth | " + " | ".join(label for _, _, label in models) + ")")
    return scores
