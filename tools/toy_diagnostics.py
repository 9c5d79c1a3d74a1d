"""Where a CLIP trained on the synthetic world stands on things, at three levels (README, "The toy CLIP").

    python tools/toy_diagnostics.py [MODEL] [--scenes N]

1. caption probe: for val scenes whose caption names exactly one shape, rank the ten captions that
   differ only in that shape word against the image (chance 10%);
2. single-name prompts: for each val image, the top thing class among the ten class-name prompts
   (the 85 MaskCLIP templates), how often it is in the scene, and how often each class comes top;
3. dense: at thing pixels, MaskCLIP features' best class among the ten things (chance 10%).
"""

import argparse
import re

import numpy as np
import torch
import torch.nn.functional as F

from vocaseg import Segmenter
from vocaseg.data.synth import CLASSES, STUFF_CLASSES, THING_CLASSES, make_scene


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="toy", help="'toy' or a model folder / open_clip name")
    parser.add_argument("--scenes", type=int, default=200)
    args = parser.parse_args()
    torch.manual_seed(0)
    seg = Segmenter.from_pretrained(args.model, method="maskclip", templates="maskclip85", device="cpu")
    clip = seg.backbone.clip
    size = seg.backbone.image_size
    scenes = [make_scene(i, "val", 0, size) for i in range(args.scenes)]
    pixels = seg.normalize(torch.stack([torch.from_numpy(s.image).permute(2, 0, 1).float() / 255 for s in scenes]))
    image_emb = F.normalize(clip.encode_image(pixels), dim=-1)
    things = [CLASSES.index(t) for t in THING_CLASSES]

    # 1. shape words inside whole captions
    shape_word = re.compile(r"\b(" + "|".join(THING_CLASSES) + r")\b")
    hits = total = 0
    for k, s in enumerate(scenes):
        found = shape_word.findall(s.caption)
        if len(found) == 1:
            variants = [shape_word.sub(t, s.caption) for t in THING_CLASSES]
            text = F.normalize(clip.encode_text(seg.tokenizer(variants)), dim=-1)
            hits += int((text @ image_emb[k]).argmax()) == THING_CLASSES.index(found[0])
            total += 1
    print(f"1. shape word in its caption: {100 * hits / total:.1f}% right of {total} scenes (chance 10%)")

    # 2. class names alone
    text = seg.encode_text(list(CLASSES))  # (C, D), template-averaged, normalised
    top = (image_emb @ text[things].T).argmax(1)
    present = [set(np.unique(s.mask).tolist()) for s in scenes]
    with_things = [k for k, p in enumerate(present) if p & set(things)]
    right = np.mean([things[int(top[k])] in present[k] for k in with_things])
    chance = np.mean([len(present[k] & set(things)) / len(things) for k in with_things])
    counts = np.bincount(top.numpy(), minlength=len(things))
    sims = (text[things] @ text[things].T)[~torch.eye(len(things), dtype=torch.bool)]
    print(f"2. top thing prompt present in the scene: {100 * right:.1f}% of {len(with_things)} scenes "
          f"(chance {100 * chance:.1f}%); "
          f"times each class comes top: {dict(zip(THING_CLASSES, counts.tolist()))}; "
          f"cosine between thing prompts: median {sims.median():.2f}, max {sims.max():.2f}")

    # 3. dense MaskCLIP features at thing pixels
    dense = seg.encode_dense(pixels)  # (B, D, h, w)
    scores = torch.einsum("bdhw,cd->bchw", dense, text[things])
    scores = F.interpolate(scores, size=(size, size), mode="bilinear", align_corners=False)
    masks = torch.from_numpy(np.stack([s.mask for s in scenes]))
    at_things = masks >= len(STUFF_CLASSES)
    predicted = scores.argmax(1) + len(STUFF_CLASSES)
    print(f"3. dense, among the ten things, at thing pixels: "
          f"{100 * (predicted[at_things] == masks[at_things]).float().mean():.1f}% right (chance 10%)")


if __name__ == "__main__":
    main()
