"""Where a CLIP trained on the synthetic world stands on things, image level and dense (README, "The toy CLIP").

    python tools/toy_diagnostics.py [MODEL] [--scenes N]

1. caption probe: for val scenes whose caption names exactly one shape, rank the ten captions that
   differ only in that shape word against the image (chance 10%);
2. single-name prompts: for each val image, the top thing class among the ten class-name prompts
   (the 85 MaskCLIP templates), how often it is in the scene, and how often each class comes top;
3. dense: at thing pixels, MaskCLIP features' best class among the ten things (chance 10%);
4. linear probe: how well a linear classifier fit on train scenes reads the thing class from the same
   dense features at thing patches: the identity that is there, aligned with the text or not;
5. for class-token towers: the class token's thing knowledge (as in 2.) after each block, and
   from the last block's attention output alone, the only part a value-path method reads;
6. where pixels go: MaskCLIP's best class among all sixteen, at thing and at stuff pixels.
"""

import argparse
import re

import numpy as np
import torch
import torch.nn.functional as F

from vocaseg import Segmenter
from vocaseg.data.synth import CLASSES, STUFF_CLASSES, THING_CLASSES, make_scene


def _model_input(seg, scenes) -> torch.Tensor:
    return seg.normalize(torch.stack([torch.from_numpy(s.image).permute(2, 0, 1).float() / 255 for s in scenes]))


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
    pixels = _model_input(seg, scenes)
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
    present = [set(np.unique(s.mask).tolist()) for s in scenes]
    with_things = [k for k, p in enumerate(present) if p & set(things)]

    def top_prompt_present(emb: torch.Tensor) -> float:
        """% of scenes with things whose top thing prompt (for image embeddings ``emb``) is in the scene."""
        top = (F.normalize(emb, dim=-1) @ text[things].T).argmax(1)
        return 100 * np.mean([things[int(top[k])] in present[k] for k in with_things])

    top = (image_emb @ text[things].T).argmax(1)
    chance = np.mean([len(present[k] & set(things)) / len(things) for k in with_things])
    counts = np.bincount(top.numpy(), minlength=len(things))
    sims = (text[things] @ text[things].T)[~torch.eye(len(things), dtype=torch.bool)]
    print(f"2. top thing prompt present in the scene: {top_prompt_present(image_emb):.1f}% of {len(with_things)} scenes "
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

    linear_probe(seg, scenes, dense)
    class_token_by_block(seg, pixels, top_prompt_present)

    # 6. all sixteen classes, as the synth protocol segments (whole image at the model's input size)
    scores = F.interpolate(torch.einsum("bdhw,cd->bchw", dense, text), size=(size, size), mode="bilinear",
                           align_corners=False)
    best = scores.argmax(1)
    stuff = len(STUFF_CLASSES)
    right, called_thing = best == masks, best >= stuff
    print(f"6. where pixels go (all {len(CLASSES)} classes): thing pixels "
          f"{100 * right[at_things].float().mean():.1f}% right, "
          f"{100 * (~right & called_thing)[at_things].float().mean():.1f}% another thing, "
          f"{100 * (~called_thing)[at_things].float().mean():.1f}% a stuff class; stuff pixels "
          f"{100 * right[~at_things].float().mean():.1f}% right, "
          f"{100 * called_thing[~at_things].float().mean():.1f}% called a thing")


def _patch_labels(scenes, grid: int) -> torch.Tensor:
    """(B, grid*grid) class id at each patch centre."""
    step = scenes[0].mask.shape[0] // grid
    return torch.from_numpy(np.stack([s.mask[step // 2::step, step // 2::step] for s in scenes])).flatten(1)


def _linear_probe(x: torch.Tensor, y: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor, classes: int) -> float:
    """Accuracy of an L2-regularised multinomial logistic regression (L-BFGS) on standardised features."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    x, x_val = (x - mean) / std, (x_val - mean) / std
    weight = torch.zeros(x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=200)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + 1e-3 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return 100 * ((x_val @ weight + bias).argmax(1) == y_val).float().mean().item()


def linear_probe(seg, scenes, feats_val: torch.Tensor) -> None:
    """``feats_val``: the dense features of ``scenes``, as section 3 computed them."""
    size, first_thing = seg.backbone.image_size, len(STUFF_CLASSES)
    train = [make_scene(i, "train", 0, size) for i in range(2 * len(scenes))]
    feats = seg.encode_dense(_model_input(seg, train))
    grid = feats.shape[-1]
    y, y_val = _patch_labels(train, grid), _patch_labels(scenes, grid)
    x, x_val = feats.flatten(2).transpose(1, 2), feats_val.flatten(2).transpose(1, 2)
    at, at_val = y >= first_thing, y_val >= first_thing
    acc = _linear_probe(x[at], y[at] - first_thing, x_val[at_val], y_val[at_val] - first_thing, len(THING_CLASSES))
    print(f"4. linear probe on the dense features at thing patches: {acc:.1f}% right "
          f"({int(at.sum())} train / {int(at_val.sum())} val patches; chance 10%)")


def class_token_by_block(seg, pixels, top_prompt_present) -> None:
    visual = seg.backbone.clip.visual
    if getattr(visual, "pool_type", "tok") != "tok":
        print(f"5. (image embedding pools {visual.pool_type!r}, not the class token: nothing to decompose)")
        return
    joins = getattr(visual, "class_token_block", 0)  # vocaseg's LateClassTokenViT: the class token joins late
    if joins == 0:
        states = visual.forward_intermediates(pixels, output_fmt="NLC", output_extra_tokens=True,
                                              intermediates_only=True)
        class_tokens = [prefix[:, 0] for prefix in states["image_intermediates_prefix"]]  # after each block
        per_block = [top_prompt_present(visual.ln_post(c) @ visual.proj) for c in class_tokens]
        where = (f"after blocks 1..{len(per_block)}: " + " ".join(f"{a:.1f}" for a in per_block))
    else:
        where = f"(the class token joins before block {joins + 1} of {len(visual.transformer.resblocks)})"
    last = visual.transformer.resblocks[-1]
    before_last = last.ln_1(seg.backbone.tokens_before_last_block(pixels)[0])
    attn_out = last.ls_1(last.attn(before_last, before_last, before_last, need_weights=False)[0])
    print(f"5. class token, top thing prompt present {where}; from the last block's attention output alone: "
          f"{top_prompt_present(visual.ln_post(attn_out[:, 0]) @ visual.proj):.1f}%")


if __name__ == "__main__":
    main()
