"""Where a CLIP-RC run loses the unseen classes: its prompted tower or its decoder.

    python tools/clip_rc_diagnostics.py runs/rc-s0 --limit 100 [--checkpoint runs/rc-s0/state.pt]

On the synth_zs val scenes (whole image, 96 px) three predictions are scored:

- ``decoder``: the run itself (its masks, with its calibration);
- ``I (prompted)``: the run's own prompted image tower, each patch feature I scored by cosine against
  the text embeddings (MaskCLIP's rule on CLIP-RC's features, no decoder);
- ``I (no prompts)``: the frozen CLIP under MaskCLIP's rule (the training-free baseline);
- ``ensemble``: the run with ``--ensemble BETA`` (default 0.6): its head and the cosine scores of I
  blended for the classes it was not trained on (``ClipRcModel.logits``).

If the prompted features still score the unseen classes as MaskCLIP does while the decoder does
not, the decoder is what fails to carry CLIP's alignment over to classes it never saw.

Then, for each unseen class and prediction: its recall and precision, where its pixels go (the two
commonest predicted classes) and what the pixels predicted as it truly are (the two commonest), and
the geometry of its text embedding against the seen ones (the share of its norm inside the span of
the seen embeddings, its nearest seen class and their cosine): a head fitted on the seen embeddings
sees an unseen one only through that span.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from vocaseg import Segmenter
from vocaseg.data.datasets import build_dataset
from vocaseg.evaluation import ConfusionMatrix, get_split


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("--limit", type=int, default=100, help="first N val scenes (default 100)")
    p.add_argument("--checkpoint", default=None, help="score the weights of this state.pt instead")
    p.add_argument("--ensemble", type=float, default=0.6, help="beta of the ensemble row (default 0.6)")
    args = p.parse_args(argv)
    ds = build_dataset("synth", split="val", length=args.limit)
    seg = Segmenter.from_pretrained(args.run, templates=ds.templates, **ds.protocol)
    model = seg.trained
    if args.checkpoint:
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        print(f"weights of step {state['step']}")
    vocab = seg.vocabulary(ds.vocabulary)
    clf = model.classifier(vocab, seg.encode_text)
    split = get_split("synth_zs", "synth")
    size = (96, 96)
    matrices = {k: ConfusionMatrix(len(vocab)) for k in ("decoder", "I (prompted)", "I (no prompts)",
                                                         "ensemble")}

    def add(name, scores, label):
        pred = F.interpolate(scores, size=size, mode="bilinear", align_corners=False).argmax(1)[0]
        matrices[name].update(pred, label)

    with torch.no_grad():
        for i in range(len(ds)):
            sample = ds[i]
            x = torch.from_numpy(sample.image).permute(2, 0, 1).float()[None] / 255
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            label = F.interpolate(torch.from_numpy(sample.label)[None, None].float(), size=size,
                                  mode="nearest")[0, 0].long()
            pixels = (x - model.mean) / model.std
            encoded = model.encode(x)  # one prompted-tower pass serves the three rows below
            image = encoded[1]
            add("decoder", model.scores(encoded, clf), label)
            add("ensemble", model.scores(encoded, clf, ensemble=args.ensemble), label)
            add("I (prompted)", torch.einsum("bdhw,cd->bchw", image, clf.weights), label)
            plain = seg.backbone.dense(pixels, "maskclip").features
            add("I (no prompts)", torch.einsum("bdhw,cd->bchw", plain, clf.weights), label)
    for name, matrix in matrices.items():
        r = matrix.compute(vocab.names, split)
        iou = {c: v["IoU"] or 0.0 for c, v in r["per_class"].items()}
        print(f"{name:<15} mIoU(S) {r['mIoU_seen']:5.1f}  mIoU(U) {r['mIoU_unseen']:5.1f}  hIoU {r['hIoU']:5.1f}  "
              f"| wood {iou['wood']:5.1f}  hexagon {iou['hexagon']:5.1f}  crescent {iou['crescent']:5.1f}")
    seen = clf.extra["seen"].cpu()
    text = clf.class_embeddings().float().cpu()
    basis = torch.linalg.qr(text[seen].T).Q  # (D, n_seen): the span of the seen embeddings
    names = list(vocab.names)
    print("\neach unseen class: where its pixels go, what is predicted as it, and its text embedding")
    for c in torch.nonzero(~seen).flatten().tolist():
        goes = []
        for name in matrices:
            matrix = matrices[name].matrix[:, :len(names)].float()
            row_c, col_c = matrix[c], matrix[:, c]

            def top2(counts):
                top = counts.topk(2)
                return ", ".join(f"{names[j]} {100 * v / counts.sum().clamp_min(1):.0f}%"
                                 for v, j in zip(top.values.tolist(), top.indices.tolist()))

            goes.append(f"{name:<15} recall {100 * row_c[c] / row_c.sum():4.1f}  precision "
                        f"{100 * col_c[c] / col_c.sum().clamp_min(1):4.1f} | goes to {top2(row_c)} | "
                        f"predicted from {top2(col_c)}")
        t = text[c]
        inside = (basis @ (basis.T @ t)).norm() / t.norm()
        cos = text[seen] @ t / (text[seen].norm(dim=1) * t.norm())
        nearest = torch.nonzero(seen).flatten()[cos.argmax()].item()
        print(f"{names[c]:<9} in the seen span {100 * inside:.1f}% of its norm; nearest seen {names[nearest]} "
              f"(cos {cos.max():.2f})\n    " + "\n    ".join(goes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
