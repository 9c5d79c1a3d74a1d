"""`vocaseg eval --report DIR`: the files exist, the page's numbers are the JSON's, the worst images
are really the worst, and the confusion counts give back the JSON's metrics."""

import csv
import json
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from vocaseg.cli import main
from vocaseg.data.datasets import build_dataset
from vocaseg.report import REPORT_FILES

SCENES, WORST = 6, 3
ARGS = ["eval", "--dataset", "synth", "--limit", str(SCENES), "--model", "toy", "--workers", "0",
        "--split-set", "synth_zs", "--report-worst", str(WORST)]


class _Page(HTMLParser):
    """Collects the report's numbers: summary cells (data-key), per-class rows, worst-image figures, images."""

    def __init__(self):
        super().__init__()
        self.summary, self.per_class, self.worst, self.images = {}, {}, [], []
        self._key = self._cls = self._cell = self._fig = self._span = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "td" and "data-key" in a:
            self._key = a["data-key"]
        if tag == "tr" and "data-class" in a:
            self._cls = a["data-class"]
            self.per_class[self._cls] = {}
        if tag == "td" and self._cls and a.get("class") in ("iou", "acc"):
            self._cell = a["class"]
        if tag == "figure" and "data-id" in a:
            self._fig = {"id": a["data-id"]}
            self.worst.append(self._fig)
        if tag == "span" and self._fig is not None and a.get("class") in ("miou", "aacc"):
            self._span = a["class"]
        if tag == "img":
            self.images.append(a["src"])
            if self._fig is not None:
                self._fig["src"] = a["src"]

    def handle_endtag(self, tag):
        if tag == "tr":
            self._cls = None
        if tag == "figure":
            self._fig = None

    def handle_data(self, data):
        if self._key:
            self.summary[self._key] = data
            self._key = None
        elif self._cell:
            self.per_class[self._cls][self._cell] = data
            self._cell = None
        elif self._span:
            self._fig[self._span] = data
            self._span = None


def _f(value):
    return "-" if value is None else f"{value:.2f}"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    preds = root / "preds"
    code = main(ARGS + ["--out", str(root / "r.json"), "--report", str(root / "rep"), "--save-predictions", str(preds)])
    assert code == 0
    return root, json.loads((root / "r.json").read_text())


def test_report_files_exist_and_open(report):
    root, result = report
    for name in REPORT_FILES:
        assert (root / "rep" / name).is_file() and (root / "rep" / name).stat().st_size > 0, name
    page = _Page()
    page.feed((root / "rep" / "index.html").read_text())
    # every picture the page shows is beside it (relative links: it opens without a server)
    assert page.images and all(not src.startswith(("/", "http")) for src in page.images)
    for src in page.images:
        with Image.open(root / "rep" / src) as im:
            assert im.size[0] > 100 and im.size[1] > 100
    assert json.loads((root / "rep" / "eval.json").read_text()) == result


def test_report_numbers_equal_the_json(report):
    root, result = report
    page = _Page()
    page.feed((root / "rep" / "index.html").read_text())
    for key in ("aAcc", "mIoU", "mAcc", "fwIoU", "mIoU_seen", "mIoU_unseen", "hIoU", "pAcc"):
        assert page.summary[key] == _f(result[key]), key
    assert list(page.per_class) == list(result["per_class"])
    for name, v in result["per_class"].items():
        assert page.per_class[name] == {"iou": _f(v["IoU"]), "acc": _f(v["Acc"])}, name
    assert [(w["id"], w["miou"], w["aacc"]) for w in page.worst] == \
        [(w["id"], _f(w["mIoU"]), _f(w["aAcc"])) for w in result["worst_images"]]
    assert len(page.worst) == WORST


def _image_miou(pred, label, n):
    keep = label != 255
    ious = []
    for c in range(n):
        p, t = (pred == c) & keep, (label == c) & keep
        union = (p | t).sum()
        if union:
            ious.append((p & t).sum() / union)
    return 100 * float(np.mean(ious))


def test_worst_images_are_the_lowest_scoring(report):
    root, result = report
    ds = build_dataset("synth", split="val", length=SCENES)
    scores = {}
    for i in range(SCENES):
        s = ds[i]
        pred = np.asarray(Image.open(root / "preds" / f"{s.id}.png")).astype(np.int64)
        scores[s.id] = _image_miou(pred, s.label, len(ds.classes))
    expected = sorted(scores, key=lambda k: scores[k])[:WORST]
    assert [w["id"] for w in result["worst_images"]] == expected
    for w in result["worst_images"]:
        assert w["mIoU"] == pytest.approx(scores[w["id"]], abs=1e-6)


def test_confusion_counts_give_the_json_metrics(report):
    root, result = report
    rows = list(csv.reader(open(root / "rep" / "confusion_matrix.csv")))
    classes = [r[0] for r in rows[1:]]
    m = np.array([[int(x) for x in r[1:]] for r in rows[1:]], dtype=np.float64)
    n = len(classes)
    inter = np.diag(m[:, :n])
    union = m.sum(1) + m[:, :n].sum(0) - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
    assert 100 * np.nanmean(iou) == pytest.approx(result["mIoU"], abs=1e-9)
    assert 100 * inter.sum() / m.sum() == pytest.approx(result["aAcc"], abs=1e-9)
    assert classes == list(result["per_class"])


def test_report_is_not_overwritten(report, capsys):
    root, _ = report
    assert main(ARGS + ["--report", str(root / "rep")]) == 2
    assert "already holds a report" in capsys.readouterr().err


def test_worst_images_merge_across_processes(monkeypatch):
    """Under torchrun each process keeps its own worst images; gather() merges them as if one process
    had seen the whole dataset (image k of process r is dataset image r + k * world)."""
    import torch

    from vocaseg import evaluation
    from vocaseg.data.datasets import Sample

    label = np.array([[0, 0], [1, 1]])
    preds = {"good": label, "half": np.array([[0, 0], [0, 0]]), "bad": np.array([[1, 1], [0, 0]])}
    # dataset order: 0 half, 1 bad, 2 good, 3 half, 4 good, 5 bad -> worst three: 1, 5 (bad, tie: earlier first), 0
    kinds = ["half", "bad", "good", "half", "good", "bad"]
    world, shared = 2, {}

    def run(rank):
        w = evaluation.WorstImages(3, 2)
        for i in range(rank, len(kinds), world):
            w(Sample(f"img{i}", np.zeros((2, 2, 3), np.uint8), label), torch.from_numpy(preds[kinds[i]]))
        monkeypatch.setattr(evaluation, "_distributed", lambda: (rank, world))

        def fake_gather(out, mine):
            shared[rank] = mine
            out[:] = [shared.get(r, []) for r in range(world)]

        monkeypatch.setattr(torch.distributed, "all_gather_object", fake_gather)
        w.gather()
        return w

    run(1)
    merged = run(0)
    assert [item["id"] for item in merged.items] == ["img1", "img5", "img0"]
    single = evaluation.WorstImages(3, 2)
    for i, kind in enumerate(kinds):
        single(Sample(f"img{i}", np.zeros((2, 2, 3), np.uint8), label), torch.from_numpy(preds[kind]))
    assert merged.summary() == single.summary()
