"""What a CLIPTeacher run's global learning module attends to, and where its classes' pixels go.

    python tools/clipteacher_diagnostics.py toy-clipteacher runs/ct-attention-s0 --limit 100 [--gamma 0]

On the first ``--limit`` synth val scenes (whole image, 96 px, the synth protocol), for each run:

- **GLM attention**: CLIP's image embedding S (the teacher's class token) as the query over the run's
  student features R, ``w = softmax_l(S . R_l / sqrt(D))`` as in training (whatever pooling the run was
  trained with): how many positions it effectively reads (exp of the entropy of w), its largest weight,
  and how well CLIP's space holds the features: cosine of S with the attention-pooled R, with the
  mean-pooled R, and with each position's R (averaged).
- **Confusion**: for each unseen class, the share of its pixels predicted as each class (the top 3),
  at ``--gamma`` (default: the run's own calibration).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from vocaseg import Segmenter
from vocaseg.backbone import CLIPBackbone
from vocaseg.data.datasets import build_dataset
from vocaseg.evaluation import ConfusionMatrix, get_split
from vocaseg.loading import load_clip
from vocaseg.methods.clipteacher import glm_attention
from vocaseg.runs import find_run, read_run_info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="CLIPTeacher run folders or shipped run names")
    p.add_argument("--limit", type=int, default=100, help="first N val scenes (default 100)")
    p.add_argument("--gamma", type=float, default=None, help="calibration for the confusion (default: the run's)")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    ds = build_dataset("synth", split="val", length=args.limit)
    size = (96, 96)
    images = torch.stack([torch.from_numpy(ds[i].image).permute(2, 0, 1).float() / 255 for i in range(len(ds))])
    images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
    labels = torch.stack([torch.from_numpy(ds[i].label)[None].float() for i in range(len(ds))])
    labels = F.interpolate(labels, size=size, mode="nearest")[:, 0].long()
    unseen = get_split("synth_zs", "synth").unseen
    teachers = {}
    for run in args.runs:
        path = find_run(run)
        if path is None:
            raise SystemExit(f"{run}: not a run folder (no method.json) nor a shipped run's name")
        info = read_run_info(path)
        if info["method"] != "clipteacher":
            raise SystemExit(f"{run} is a {info['method']} run, not clipteacher")
        key = (info["clip"]["model"], info["clip"].get("pretrained"))
        if key not in teachers:
            loaded = load_clip(key[0], pretrained=key[1] or "default")
            mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (loaded.mean, loaded.std))
            teachers[key] = CLIPBackbone(loaded.model).global_and_dense((images - mean) / std, "raw")[0].float()
        s = teachers[key]
        seg = Segmenter.from_pretrained(run, templates=ds.templates, **ds.protocol)
        model = seg.trained
        features = torch.cat([model(images[i:i + 25]).float() for i in range(0, len(images), 25)])
        r, w = features.flatten(2), glm_attention(features, s)  # (B, D, L), (B, L)
        effective = (-(w * w.clamp_min(1e-12).log()).sum(-1)).exp()
        cos_attention = F.cosine_similarity(torch.einsum("bl,bdl->bd", w, r), s).mean()
        cos_mean = F.cosine_similarity(r.mean(-1), s).mean()
        cos_position = F.cosine_similarity(r, s[:, :, None], dim=1).mean()
        glm = info["config"].get("glm", "attention")
        print(f"{run} (GLM {glm}): attention reads {effective.mean():.1f} of {r.shape[-1]} positions "
              f"(median {effective.median():.1f}), largest weight {w.amax(-1).mean():.3f}; cosine with S: "
              f"attention-pooled R {cos_attention:.3f}, mean-pooled R {cos_mean:.3f}, each position's R {cos_position:.3f}")

        if args.gamma is not None:
            model.calibration = args.gamma
        vocab = seg.vocabulary(ds.vocabulary)
        clf = model.classifier(vocab, seg.encode_text)
        confusion = ConfusionMatrix(len(vocab))
        for i in range(0, len(images), 25):
            scores = model.logits(images[i:i + 25], clf)
            confusion.update(F.interpolate(scores, size=size, mode="bilinear", align_corners=False).argmax(1),
                             labels[i:i + 25])
        m = confusion.matrix.double()
        ious = confusion.ious()
        names = vocab.names
        for c in range(len(names)):
            if names[c] not in unseen or m[c].sum() == 0:
                continue
            share = m[c, :len(names)] / m[c].sum() * 100
            top = share.argsort(descending=True)[:3]
            where = ", ".join(f"{names[k]} {share[k]:.1f}%" for k in top.tolist())
            print(f"    {names[c]:<10} IoU {ious[c] * 100:5.1f}  its pixels -> {where}  (gamma {model.calibration:g})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
