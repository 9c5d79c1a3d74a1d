"""Where a SegCLIP run loses mIoU: its grouping (which patches share a region) or its naming (which class
a region gets).

    python tools/segclip_diagnostics.py runs/segclip --limit 100 [--checkpoint runs/segclip/state.pt]

On synth val scenes (whole image, 96 px, 85 templates as ``vocaseg eval``) it scores:

- ``run``: the run itself (the official rule: gated product of softmaxes, each pixel its centre's class);
- ``run, no gate``: the same without the image-level top-k gate;
- ``oracle naming``: each region named by the majority ground-truth class of its pixels, so only the
  grouping limits it (the bound of a perfect classifier on these regions);
- ``oracle grouping``: each ground-truth segment pooled through the run's group-module values, as if it
  were a region, then through the later blocks and named by the run (the bound of perfect regions);
- ``MaskCLIP, GT segments``: the frozen CLIP's MaskCLIP features averaged over each ground-truth segment
  and named by cosine (what naming perfect regions with the untrained value path gives);

and prints regions in use per image, pixel purity of the regions, and how often the gate keeps every
class present in the scene.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from vocaseg import Segmenter
from vocaseg.data.datasets import build_dataset
from vocaseg.evaluation import IGNORE_INDEX, ConfusionMatrix
from vocaseg.methods.segclip import region_class_scores


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("--limit", type=int, default=100, help="first N val scenes (default 100)")
    p.add_argument("--checkpoint", default=None, help="score the weights of this state.pt instead")
    p.add_argument("--clip", default="toy", help="the frozen CLIP the run started from (default toy)")
    args = p.parse_args(argv)
    ds = build_dataset("synth", split="val", length=args.limit)
    seg = Segmenter.from_pretrained(args.run, templates=ds.templates, **ds.protocol)
    model = seg.trained
    if args.checkpoint:
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
        weights = {k.removeprefix("model."): v for k, v in state["model"].items() if not k.startswith("reconstruction.")}
        model.load_state_dict(weights, strict=False)
        print(f"weights of step {state['step']}")
    model.eval()
    vocab = seg.vocabulary(ds.vocabulary)
    classifier = model.classifier(vocab, seg.encode_text)
    scale = float(model.contrast_scale().detach())
    c = len(vocab.names)
    names = ("run", "run, no gate", "oracle naming", "oracle grouping", "MaskCLIP, GT segments")
    frozen = Segmenter.from_pretrained(args.clip,
                                       method="maskclip", templates=ds.templates, **ds.protocol)
    frozen_text = frozen.encode_text(vocab.names)
    matrices = {k: ConfusionMatrix(c) for k in names}
    tower = model.tower
    used, purity_hits, pixels_total, gate_hits, gate_total = [], 0, 0, 0, 0
    with torch.no_grad():
        for i in range(len(ds)):
            sample = ds[i]
            label = torch.from_numpy(sample.label).long()
            pixels = torch.from_numpy(sample.image).permute(2, 0, 1)[None].float() / 255
            x = (pixels - model.mean) / model.std
            matrices["run"].update(model.logits(pixels, classifier).argmax(1)[0], label)
            patches, grid = tower.patches(x)
            feats = tower.encode_patches(patches)  # blocks before the module, once for all the rows below
            grouping = tower.group(feats)
            emb = F.normalize(tower.head(grouping.regions).float(), dim=-1)
            soft = grouping.logits.float().softmax(1).reshape(1, -1, *grid)
            soft = F.interpolate(soft, size=label.shape, mode="bilinear", align_corners=False)
            centre = soft.argmax(1)[0]  # (H, W)
            scores = region_class_scores(emb[:, 1:], emb[:, 0], classifier, scale, 0)[0]  # (L, C), no gate
            matrices["run, no gate"].update(scores.argmax(-1)[centre], label)
            # oracle naming and purity: each region's majority class
            valid = label != IGNORE_INDEX
            joint = torch.zeros(soft.shape[1], c, dtype=torch.long)
            joint.index_put_((centre[valid], label[valid]), torch.ones_like(label[valid]), accumulate=True)
            majority = joint.argmax(1)
            matrices["oracle naming"].update(majority[centre], label)
            used.append(int((joint.sum(1) > 0).sum()))
            purity_hits += int(joint.max(1).values.sum())
            pixels_total += int(valid.sum())
            present = label[valid].unique()
            image_scores = region_class_scores(emb[:, :1], emb[:, 0], classifier, scale, model.arch.gate_top_k)[0, 0]
            gate_total += len(present)
            gate_hits += int((image_scores[present] > 0).sum())
            # oracle grouping: each GT segment pooled as a region (its patches: those it covers over half,
            # else the one it covers most), with the centre most of its patches go to as the query
            centres, _, values = (t[0] for t in tower.group.centres_keys_values(feats))
            home = grouping.logits[0].argmax(0)  # (N,) each patch's centre
            segs = present.tolist()
            onehot = F.one_hot(label.masked_fill(~valid, 0), c).permute(2, 0, 1)[None].float() * valid
            cover = F.adaptive_avg_pool2d(onehot, grid)[0].flatten(1)  # (C, N)
            regions = []
            for s_ in segs:
                member = cover[s_] > 0.5
                if not member.any():
                    member = cover[s_] == cover[s_].max()
                regions.append(tower.group.regions_from(centres[home[member].mode().values], values[member].mean(0)))
            regions = torch.stack(regions)[None]
            emb_gt = F.normalize(tower.head(regions).float(), dim=-1)
            scores = region_class_scores(emb_gt[:, 1:], emb_gt[:, 0], classifier, scale, model.arch.gate_top_k)[0]
            pred = label.clone()
            for s_, cls in zip(segs, scores.argmax(-1).tolist()):
                pred[label == s_] = cls
            matrices["oracle grouping"].update(pred, label)
            dense = frozen.encode_dense(frozen.normalize(pixels))[0].flatten(1)  # (D, N), the frozen CLIP
            pooled = F.normalize(torch.stack([dense[:, cover[s_] > 0.5].mean(1) if (cover[s_] > 0.5).any()
                                              else dense[:, cover[s_].argmax()] for s_ in segs]), dim=-1)
            pred = label.clone()
            for s_, cls in zip(segs, (pooled @ frozen_text.T).argmax(-1).tolist()):
                pred[label == s_] = cls
            matrices["MaskCLIP, GT segments"].update(pred, label)
    print(f"{len(ds)} val scenes; regions in use per image {sum(used) / len(used):.2f} of {soft.shape[1]}; "
          f"region pixel purity {100 * purity_hits / pixels_total:.1f}%; gate keeps {100 * gate_hits / gate_total:.1f}% "
          f"of the classes present")
    for key in names:
        r = matrices[key].compute(vocab.names)
        print(f"{key:16s} mIoU {r['mIoU']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
