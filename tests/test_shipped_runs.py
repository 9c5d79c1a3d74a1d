"""The runs shipped inside the package: they load by name, and their measured quality holds.

Floors sit a few points under what the shipped fp16 runs measured on the first 100 synth val scenes
(the README has the full-split numbers, over seeds, with the commands that made them).
"""

import pytest

from vocaseg import Segmenter
from vocaseg.data.datasets import build_dataset
from vocaseg.evaluation import evaluate, get_split
from vocaseg.runs import shipped_runs

SAMPLE = 100
# name -> (split set or None, {metric: floor}); measured values in the comments
FLOORS = {
    # measured 40.9 mIoU (stuff 77.2, things 19.1); the MaskCLIP teacher scores 36.4-36.9 on these scenes
    "toy-maskclip-plus": (None, {"mIoU": 39.0}),
    # measured hIoU 76.5, mIoU(U) 74.8 (the bars: 70 and 60; MaskCLIP alone: 35.3 and 33.3)
    "toy-maskclip-plus-zs3": ("synth_zs", {"hIoU": 72.0, "mIoU_unseen": 68.0}),
    # measured 38.56 mIoU; MaskCLIP (the Query alone) scores 36.88 on these scenes
    "toy-reclip-rect": (None, {"mIoU": 37.5}),
    # measured 43.57 mIoU (the fp16 copy, 4,500 steps); its teacher toy-reclip-rect scores 38.56 on these scenes
    "toy-reclip": (None, {"mIoU": 41.0}),
    # measured mIoU(S) 56.63, mIoU(U) 25.09, hIoU 34.78 (the synth preset, lr 1e-3, seed 0): below the issue's
    # bars (60 / 40) and below MaskCLIP on the unseen classes (README, "CLIP-RC"); the floors guard what it reaches
    "toy-clip-rc": ("synth_zs", {"mIoU_seen": 54.0, "mIoU_unseen": 22.0}),
    # measured mIoU(S) 69.09, mIoU(U) 57.09, hIoU 62.52 (transductive from toy-clip-rc: mIoU(U) +32.0)
    "toy-clip-rc-trans": ("synth_zs", {"hIoU": 59.0, "mIoU_unseen": 53.0}),
    # toy-clip-rc with the ensemble (beta 0.6, not the paper's inference): measured mIoU(S) 62.52,
    # mIoU(U) 51.99, hIoU 56.77; the unseen classes gain 27 over the paper's rule
    "toy-clip-rc --ensemble 0.6": ("synth_zs", {"mIoU_unseen": 48.0, "hIoU": 53.0}),
    # measured mIoU(S) 73.68, mIoU(U) 56.40, hIoU 63.89 at its gamma 1.5 (the synth preset, GLM mean pooling;
    # the seen-only baseline of the same student and recipe, seed 0: U 31.74, hIoU 44.79; README, "CLIPTeacher")
    "toy-clipteacher": ("synth_zs", {"hIoU": 60.0, "mIoU_unseen": 52.0}),
    # measured 37.96 mIoU, the GPU-sized recipe (synth: batch 128 x 2,400 steps, lr 4e-3, seed 0); MaskCLIP
    # scores 36.4-36.9 on these scenes, the CPU-sized recipe's seed 0 33.0 (README, "SegCLIP")
    "toy-segclip": (None, {"mIoU": 35.5}),
}


def shipped_run_method(name):
    from vocaseg.runs import read_run_info

    return read_run_info(shipped_runs()[name])["method"]


@pytest.mark.parametrize("name", sorted(FLOORS))
def test_shipped_run_quality_floor(name):
    split_set, floors = FLOORS[name]
    name, _, beta = name.partition(" --ensemble ")  # a run scored with an inference option
    options = {"ensemble": float(beta)} if beta else {}
    if name not in shipped_runs():
        pytest.skip(f"{name} is not shipped in this checkout")
    ds = build_dataset("synth", split="val", length=SAMPLE)
    seg = Segmenter.from_pretrained(name, templates=ds.templates, **ds.protocol, **options)
    assert seg.method == shipped_run_method(name)
    result = evaluate(seg, ds, get_split(split_set, "synth") if split_set else None, workers=0, batch_images=25,
                      progress=False)
    for metric, floor in floors.items():
        assert result[metric] >= floor, (name, metric, result[metric])


def test_shipped_runs_are_small_and_listed(capsys):
    from vocaseg.cli import main

    runs = shipped_runs()
    total = sum(f.stat().st_size for path in runs.values() for f in path.iterdir())
    from vocaseg.loading import TOY_DIR

    toy = sum(f.stat().st_size for f in TOY_DIR.iterdir() if f.is_file())
    # shipped assets stay small (design: under 40 MB in all): the package carries them
    assert total < 24 * 2**20 and total + toy < 40 * 2**20
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in runs:
        assert name in out
