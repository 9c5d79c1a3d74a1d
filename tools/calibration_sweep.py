"""Choose a zero-shot run's calibration on validation scenes, then report the test split at that value.

    python tools/calibration_sweep.py runs/ct-s0 runs/ct-s1 runs/ct-s2 --label CLIPTeacher
    python tools/calibration_sweep.py runs/base-s* --label "seen-only" --gammas 0 1 2 3 4 5 6 8

For each run (a CLIPTeacher or CLIP-RC run trained on the seen classes of ``--split-set``), every gamma
of ``--gammas`` is added to the unseen classes' scores (= ``vocaseg eval --calibration G``) in one pass
over the selection split (``val``); the gamma with the best hIoU there is kept (ties: the smaller), and
the report splits (``test``, and ``--world-seeds``: scenes of other world seeds) are scored at it. The
test split is never used to choose. Runs given together are seeds of one recipe: the table shows each
run, then the mean and sample standard deviation. ``--json`` writes every number.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from vocaseg import Segmenter
from vocaseg.data.datasets import build_dataset
from vocaseg.evaluation import ConfusionMatrix, get_split


def sweep(seg: Segmenter, split: str, world_seed: int, split_set: str, gammas: list[float], limit: int | None):
    """One pass over the scenes; {gamma: metrics} with gamma added to the unseen classes' scores."""
    ds = build_dataset("synth", split=split, length=limit, seed=world_seed)
    seg = seg.with_options(**ds.protocol)
    zs = get_split(split_set, "synth")
    vocab = ds.vocabulary
    unseen = torch.tensor(zs.masks(ds.classes)[1], dtype=torch.float32).view(-1, 1, 1)
    matrices = {g: ConfusionMatrix(len(vocab)) for g in gammas}
    for start in range(0, len(ds), 32):
        samples = [ds[i] for i in range(start, min(start + 32, len(ds)))]
        for sample, res in zip(samples, seg.segment_arrays([s.image for s in samples], vocab)):
            # the scores upsampled to the scene as the Segmenter does (a per-class shift commutes with it)
            scores = F.interpolate(res.logits.float().cpu()[None], size=sample.label.shape, mode="bilinear",
                                   align_corners=False)[0]
            target = torch.from_numpy(sample.label)
            for g in gammas:
                matrices[g].update((scores + g * unseen).argmax(0), target)
    out = {}
    for g, cm in matrices.items():
        r = cm.compute(ds.classes, zs)
        iou = {c: (v["IoU"] or 0.0) for c, v in r["per_class"].items()}
        out[g] = {"mIoU_S": r["mIoU_seen"], "mIoU_U": r["mIoU_unseen"], "hIoU": r["hIoU"]} | {
            f"U:{c}": iou[c] for c in r["unseen_classes"]}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("--label", default=None)
    p.add_argument("--split-set", default="synth_zs")
    p.add_argument("--gammas", nargs="+", type=float, default=[0, 0.5, 1, 1.5, 2, 2.5, 3, 4, 5, 6, 8])
    p.add_argument("--select-split", default="val")
    p.add_argument("--report-splits", nargs="*", default=["test"])
    p.add_argument("--world-seeds", nargs="+", type=int, default=[0])
    p.add_argument("--limit", type=int, default=None, help="first N scenes of each split")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    results = {}
    for run in args.runs:
        seg = Segmenter.from_pretrained(run, calibration=0.0)  # raw scores; gamma is added here
        chosen_sweep = sweep(seg, args.select_split, 0, args.split_set, args.gammas, args.limit)
        best = max(args.gammas, key=lambda g: (round(chosen_sweep[g]["hIoU"], 6), -g))
        row = {"gamma": best, "sweep": {str(g): v for g, v in chosen_sweep.items()},
               args.select_split: chosen_sweep[best]}
        for split in args.report_splits:
            for ws in args.world_seeds:
                key = split + (f"@world{ws}" if ws else "")
                row[key] = sweep(seg, split, ws, args.split_set, [best], args.limit)[best]
        results[run] = row
        print(f"{run}: gamma {best} (val hIoU by gamma: "
              + ", ".join(f"{g:g}: {v['hIoU']:.1f}" for g, v in chosen_sweep.items()) + ")", flush=True)

    keys = [args.select_split] + [s + (f"@world{w}" if w else "") for s in args.report_splits
                                  for w in args.world_seeds]
    for key in keys:
        cols = list(next(iter(results.values()))[key])
        print(f"\n{args.label or ''} synth {key}, gamma chosen on {args.select_split}")
        print(f"{'run':<36s}{'gamma':>7s}" + "".join(f"{c:>12s}" for c in cols))
        for run, row in results.items():
            print(f"{run[-36:]:<36s}{row['gamma']:7.1f}" + "".join(f"{row[key][c]:12.1f}" for c in cols))
        if len(results) > 1:
            for name, fn in (("mean", statistics.mean), ("sd", statistics.stdev)):
                print(f"{name:<36s}{'':>7s}" + "".join(f"{fn(r[key][c] for r in results.values()):12.1f}"
                                                      for c in cols))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
