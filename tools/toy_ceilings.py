"""What a head on the toy CLIP's patch grid can reach on the synth world, with every label.

    python tools/toy_ceilings.py                      # the grid ceiling at 6, 12, 18 and 24 patches a side
    python tools/toy_ceilings.py --probe --seeds 0 1 2   # + heads trained on the frozen tower's features

CLIP-RC (and ZegCLIP, which it builds on) scores classes on the ViT's patch grid and upsamples the
scores bilinearly; its tower stays frozen. Two ceilings tell what that costs on the toy:

- ``grid N``: the ground truth itself pooled to an N x N grid (each cell: the share of each class in
  it), upsampled bilinearly and argmaxed. What a perfect patch-grid scorer of area shares would get
  (a sharper scorer can do a little better: it is a reference, not a strict bound). The toy at 96 px
  has a 12 x 12 grid.
- ``--probe``: with every class labelled (the synth train split), heads trained on the frozen toy
  CLIP's dense features (MaskCLIP's value path at 96 px, 12 x 12, what CLIP-RC's preset decodes): a
  linear 1x1 classifier, a per-patch MLP (two 1x1 convolutions, 256 channels: no neighbours, as a
  head that scores each patch alone) and two 3x3 convolutions (256 channels). Cross-entropy on the upsampled
  scores (``--loss focal_dice``: CLIP-RC's per-class sigmoid focal x100 + dice x1 instead); AdamW,
  one-cycle lr 1e-3, batch 32. They measure how much of the scene the frozen features carry, without
  prompts, and (with the two losses) what the loss alone costs a head.

All scored on the synth val split (whole image, short side 96, labels at full size) with synth_zs's
seen/unseen columns; stuff and things are the means over the 6 stuff / 10 thing classes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from vocaseg import Segmenter
from vocaseg.data.datasets import build_dataset
from vocaseg.data.synth import STUFF_CLASSES
from vocaseg.evaluation import ConfusionMatrix, get_split
from vocaseg.methods.clip_rc import focal_dice_loss

SIZE = 96  # the synth protocol's short side (the scenes are square)


def row(name: str, matrix: ConfusionMatrix, names: list[str]) -> dict:
    r = matrix.compute(names, get_split("synth_zs", "synth"))
    iou = {c: v["IoU"] or 0.0 for c, v in r["per_class"].items()}
    out = {"mIoU": r["mIoU"], "mIoU_S": r["mIoU_seen"], "mIoU_U": r["mIoU_unseen"], "hIoU": r["hIoU"],
           "stuff": statistics.mean(iou[c] for c in names[:len(STUFF_CLASSES)]),
           "things": statistics.mean(iou[c] for c in names[len(STUFF_CLASSES):]),
           "wood": iou["wood"], "hexagon": iou["hexagon"], "crescent": iou["crescent"]}
    print(f"{name:<36} " + "  ".join(f"{k} {v:5.1f}" for k, v in out.items()), flush=True)
    return out


def grid_ceiling(val, grids) -> None:
    names, classes = val.vocabulary.names, len(val.vocabulary.names)
    for grid in grids:
        matrix = ConfusionMatrix(classes)
        for i in range(len(val)):
            label = torch.from_numpy(val[i].label).long()
            valid = (label < classes)[None, None]
            shares = F.one_hot(label.clamp(max=classes - 1), classes).permute(2, 0, 1)[None].float() * valid
            pooled = F.adaptive_avg_pool2d(shares, grid)
            pred = F.interpolate(pooled, size=label.shape, mode="bilinear", align_corners=False).argmax(1)[0]
            matrix.update(pred, label)
        row(f"grid {grid} x {grid} (ground truth)", matrix, names)


@torch.no_grad()
def frozen_features(seg: Segmenter, ds, n: int, batch: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    feats, labels = [], []
    for start in range(0, n, batch):
        samples = [ds[j] for j in range(start, min(n, start + batch))]
        images = torch.stack([torch.from_numpy(s.image).permute(2, 0, 1).float() / 255 for s in samples])
        x = F.interpolate(images, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        x = (x - seg.mean) / seg.std
        feats.append(seg.backbone.dense(x, "maskclip").features)
        labels.append(torch.stack([torch.from_numpy(s.label).long() for s in samples]))
    return torch.cat(feats), torch.cat(labels)


HEADS = {
    "linear": ("linear 1x1", lambda dim, classes: nn.Conv2d(dim, classes, 1)),
    "mlp": ("two 1x1 convs (256)", lambda dim, classes: nn.Sequential(nn.Conv2d(dim, 256, 1), nn.GELU(),
                                                                    nn.Conv2d(256, classes, 1))),
    "conv3": ("two 3x3 convs (256)", lambda dim, classes: nn.Sequential(nn.Conv2d(dim, 256, 3, padding=1), nn.GELU(),
                                                                      nn.Conv2d(256, classes, 3, padding=1))),
}


def probe(train, val, names, seed: int, steps: int, loss_name: str = "ce", heads=("linear", "conv3")) -> None:
    (x_train, y_train), (x_val, y_val) = train, val
    dim, classes = x_train.shape[1], len(names)
    for key in heads:
        torch.manual_seed(seed)
        name, head = HEADS[key][0], HEADS[key][1](dim, classes)
        opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=steps)
        for _ in range(steps):
            idx = torch.randint(0, len(x_train), (32,))
            scores = F.interpolate(head(x_train[idx]), size=y_train.shape[-2:], mode="bilinear", align_corners=False)
            if loss_name == "ce":
                loss = F.cross_entropy(scores, y_train[idx], ignore_index=255)
            else:  # CLIP-RC's weights (VOC's official 100 / 1)
                focal, dice = focal_dice_loss(scores, y_train[idx])
                loss = 100 * focal + dice
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        matrix = ConfusionMatrix(classes)
        with torch.no_grad():
            for i in range(0, len(x_val), 50):
                scores = F.interpolate(head(x_val[i:i + 50]), size=y_val.shape[-2:], mode="bilinear",
                                       align_corners=False)
                matrix.update(scores.argmax(1), y_val[i:i + 50])
        row(f"probe seed {seed}, {loss_name}: {name}", matrix, names)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grids", nargs="+", type=int, default=[6, 12, 18, 24])
    p.add_argument("--probe", action="store_true", help="also train heads on the frozen toy CLIP's features")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="probe seeds (init and batch order)")
    p.add_argument("--train-scenes", type=int, default=3000, help="probe training scenes (default 3000)")
    p.add_argument("--steps", type=int, default=1500, help="probe steps (default 1500)")
    p.add_argument("--heads", nargs="+", choices=list(HEADS), default=["linear", "conv3"],
                   help="probe heads: linear (1x1), mlp (two 1x1 convs), conv3 (two 3x3 convs)")
    p.add_argument("--loss", nargs="+", choices=["ce", "focal_dice"], default=["ce"],
                   help="probe losses: ce (softmax cross-entropy) and/or focal_dice (CLIP-RC's sigmoid focal + dice)")
    args = p.parse_args(argv)
    val = build_dataset("synth", split="val")
    grid_ceiling(val, args.grids)
    if args.probe:
        t0 = time.time()
        seg = Segmenter.from_pretrained("toy")
        train = frozen_features(seg, build_dataset("synth", split="train"), args.train_scenes)
        held = frozen_features(seg, val, len(val))
        print(f"features of {args.train_scenes} train and {len(val)} val scenes in {time.time() - t0:.0f} s", flush=True)
        for loss_name in args.loss:
            for seed in args.seeds:
                probe(train, held, val.vocabulary.names, seed, args.steps, loss_name, args.heads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
