"""``vocaseg demo``: runs offline on any machine. Generates synthetic scenes, segments them with the
shipped toy CLIP from free-form class names, writes picture + ground truth + prediction panels and
prints the mIoU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .data.synth import CLASSES, SynthScenes
from .evaluation import ConfusionMatrix
from .visualize import overlay, side_by_side

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


def run_demo(out: str = "vocaseg-demo", num_scenes: int = 6, overwrite: bool = False, device: str = "cpu") -> float:
    from . import Segmenter

    out_dir = _fresh_folder(Path(out), overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    seg = Segmenter.from_pretrained("toy", method="maskclip", device=device, mode="whole", short_side=96)
    scenes = SynthScenes("test", length=num_scenes)
    results = seg.predict_batch([s.image for s in scenes], DEMO_CLASS_NAMES)
    cm = ConfusionMatrix(len(CLASSES), device=seg.device)
    for i, (scene, res) in enumerate(zip(scenes, results)):
        cm.update(res.labels_tensor(), torch.from_numpy(scene.mask))
        panel = side_by_side([
            overlay(scene.image, np.full(scene.mask.shape, 255), [], title="image"),
            overlay(scene.image, scene.mask, res.classes, title="ground truth"),
            overlay(scene.image, res.labels, res.classes, title="vocaseg (toy CLIP, maskclip)"),
        ])
        path = out_dir / f"scene_{i}.png"
        panel.save(path)
        print(f"{path}: \"{scene.caption}\"")
    metrics = cm.compute(res.classes)
    print(f"mIoU over these {num_scenes} scenes: {metrics['mIoU']:.1f} (pixel accuracy {metrics['aAcc']:.1f}); "
          f"pictures in {out_dir}/")
    return metrics["mIoU"]
