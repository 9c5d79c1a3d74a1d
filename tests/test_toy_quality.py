"""The shipped toy CLIP: its measured quality on a fixed synth sample, so a regression fails CI.

Floors sit a few points under the values measured when the toy was shipped (see README,
"The toy CLIP"); they are on the first 64 synth val scenes with the synth protocol.
"""

import pytest

from vocaseg import Segmenter
from vocaseg.data.datasets import build_dataset
from vocaseg.evaluation import evaluate
from vocaseg.loading import TOY_WEIGHTS

pytestmark = pytest.mark.skipif(not TOY_WEIGHTS.is_file(), reason="toy weights not shipped in this checkout")

SAMPLE = 64
MASKCLIP_FLOOR = 33.0  # measured 36.4 (raw 12.0) when the current toy (v10) shipped; the bar is 30
GAP_FLOOR = 20.0  # MaskCLIP over the raw baseline in mIoU points: measured 24.4 (the aim is >= 10)


@pytest.fixture(scope="module")
def scores():
    ds = build_dataset("synth", split="val", length=SAMPLE)
    seg = Segmenter.from_pretrained("toy", templates=ds.templates, **ds.protocol)
    return {m: evaluate(seg.with_options(method=m), ds, workers=0, batch_images=16, progress=False)["mIoU"]
            for m in ("raw", "maskclip")}


def test_maskclip_quality_floor(scores):
    assert scores["maskclip"] >= MASKCLIP_FLOOR, scores


def test_maskclip_far_above_raw(scores):
    assert scores["maskclip"] - scores["raw"] >= GAP_FLOOR, scores


def test_demo_runs_offline(tmp_path, capsys):
    from vocaseg.demo import run_demo

    scores = run_demo(str(tmp_path / "demo"), num_scenes=2)
    assert (tmp_path / "demo" / "scene_0.png").is_file() and (tmp_path / "demo" / "scene_1.png").is_file()
    assert set(scores) == {"MaskCLIP (toy CLIP)", "MaskCLIP+ (shipped run)"}
    assert all(0.0 <= v <= 100.0 for v in scores.values())
    run_demo(str(tmp_path / "demo"), num_scenes=1)  # a second run never overwrites the first
    assert (tmp_path / "demo-2" / "scene_0.png").is_file()
    assert "mIoU" in capsys.readouterr().out


def test_toy_diagnostics_tool_runs(capsys, monkeypatch):
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "tools" / "toy_diagnostics.py"
    monkeypatch.setattr(sys, "argv", [str(script), "toy", "--scenes", "24"])
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert "1. shape word" in out and "2. top thing prompt" in out and "3. dense" in out
    assert "4. linear probe" in out and "5. " in out and "6. where pixels go" in out
