"""Evaluate models on the synthetic world the way the README reports them, and aggregate over runs.

    python tools/synth_report.py toy runs/mcp-s0 runs/mcp-s1 runs/mcp-s2 --label "MaskCLIP+" --splits val test
    python tools/synth_report.py runs/zs3-s* --split-set synth_zs --world-seeds 0 1

Each MODEL is anything ``--model`` takes (``toy`` = the MaskCLIP teacher, a run folder, a shipped run).
Runs given together are treated as seeds of one recipe: the table shows each, then mean and sample
standard deviation. Columns: mIoU, stuff and things IoU (means over the 6 stuff / 10 thing classes),
and with ``--split-set`` mIoU(S), mIoU(U), hIoU and each unseen class. ``--world-seeds`` also scores
scenes drawn from other seeds of the world (not the one anything was trained on). ``--json`` writes all
numbers. Evaluation is whole image at 96 px (or the scale a run was trained at), 85 templates (the synth protocol
of ``vocaseg eval``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from vocaseg import Segmenter
from vocaseg.data.datasets import build_dataset
from vocaseg.data.synth import STUFF_CLASSES, THING_CLASSES
from vocaseg.evaluation import evaluate, get_split
from vocaseg.runs import run_inference_defaults


def score(model: str, split: str, world_seed: int, split_set: str | None, limit: int | None, method: str | None,
          **options):
    ds = build_dataset("synth", split=split, length=limit, seed=world_seed)
    # the dataset's protocol, then a run's own (e.g. the scale it was trained at), then the flags: as `vocaseg eval`
    options = {**ds.protocol, **run_inference_defaults(model), **{k: v for k, v in options.items() if v is not None}}
    seg = Segmenter.from_pretrained(model, method=method, templates=ds.templates, **options)
    zs = get_split(split_set, "synth") if split_set else None
    r = evaluate(seg, ds, zs, workers=0, batch_images=32, progress=False)
    iou = {c: (v["IoU"] if v["IoU"] is not None else 0.0) for c, v in r["per_class"].items()}
    row = {"mIoU": r["mIoU"], "aAcc": r["aAcc"],
           "stuff": statistics.mean(iou[c] for c in ds.classes[:len(STUFF_CLASSES)]),
           "things": statistics.mean(iou[c] for c in ds.classes[len(STUFF_CLASSES):len(STUFF_CLASSES) + len(THING_CLASSES)])}
    if zs is not None:
        row.update({"mIoU_S": r["mIoU_seen"], "mIoU_U": r["mIoU_unseen"], "hIoU": r["hIoU"]})
        row.update({f"U:{c}": iou[c] for c in r["unseen_classes"]})
    row["per_class"] = iou
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+")
    p.add_argument("--label", default=None, help="name of the recipe in the table")
    p.add_argument("--method", default=None, help="method to run (default: the model's own)")
    p.add_argument("--splits", nargs="+", default=["val", "test"])
    p.add_argument("--world-seeds", nargs="+", type=int, default=[0])
    p.add_argument("--split-set", default=None)
    p.add_argument("--limit", type=int, default=None, help="first N scenes only")
    p.add_argument("--json", default=None)
    p.add_argument("--calibration", type=float, default=None, help="zero-shot runs: instead of the run's own")
    p.add_argument("--ensemble", type=float, default=None, help="clip-rc runs: the ensemble's beta (see vocaseg eval)")
    args = p.parse_args(argv)

    results = {}
    for split in args.splits:
        for ws in args.world_seeds:
            key = f"{split}" + (f"@world{ws}" if ws else "")
            rows = {m: score(m, split, ws, args.split_set, args.limit, args.method,
                                     calibration=args.calibration, ensemble=args.ensemble) for m in args.models}
            results[key] = rows
            cols = [c for c in next(iter(rows.values())) if c != "per_class"]
            print(f"\n{args.label or ''} synth {key}" + (f" ({args.limit} scenes)" if args.limit else ""))
            print(f"{'model':<40s}" + "".join(f"{c:>11s}" for c in cols))
            for m, row in rows.items():
                print(f"{m[-40:]:<40s}" + "".join(f"{row[c]:11.1f}" for c in cols))
            if len(rows) > 1:
                mean = {c: statistics.mean(r[c] for r in rows.values()) for c in cols}
                sd = {c: statistics.stdev(r[c] for r in rows.values()) for c in cols}
                print(f"{'mean':<40s}" + "".join(f"{mean[c]:11.1f}" for c in cols))
                print(f"{'sd':<40s}" + "".join(f"{sd[c]:11.1f}" for c in cols))
                results[key]["mean"], results[key]["sd"] = mean, sd
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
