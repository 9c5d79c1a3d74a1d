
import pytest
import torch

from vocaseg.evaluation import ConfusionMatrix, get_split


def test_hand_computed_metrics_with_absent_class_and_ignore():
    # 4 classes; class 3 absent from both GT and prediction -> excluded from means
    gt = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 3, 0]])  # predictions on ignore pixels do not count
    cm = ConfusionMatrix(4)
    cm.update(pred, gt)
    r = cm.compute(["a", "b", "c", "d"])
    # class a: TP 1, FN 1 (a->b), FP 1 (c->a) -> IoU 1/3; b: TP 2, FP 1 -> 2/3; c: TP 1, FN 1 -> 1/2
    assert r["per_class"]["a"]["IoU"] == pytest.approx(100 / 3)
    assert r["per_class"]["b"]["IoU"] == pytest.approx(200 / 3)
    assert r["per_class"]["c"]["IoU"] == pytest.approx(50)
    assert r["per_class"]["d"]["IoU"] is None
    assert r["mIoU"] == pytest.approx((100 / 3 + 200 / 3 + 50) / 3)
    assert r["aAcc"] == pytest.approx(100 * 4 / 6)
    assert r["mAcc"] == pytest.approx((50 + 100 + 50) / 3)
    assert r["fwIoU"] == pytest.approx(2 / 6 * 100 / 3 + 2 / 6 * 200 / 3 + 2 / 6 * 50)


def test_class_predicted_but_absent_in_gt_counts_as_zero():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 0, 2]), torch.tensor([0, 0, 0]))
    r = cm.compute(["a", "b", "c"])
    assert r["per_class"]["c"]["IoU"] == 0.0 and r["per_class"]["b"]["IoU"] is None
    assert r["mIoU"] == pytest.approx((200 / 3 + 0) / 2)


def test_out_of_range_prediction_counts_against_gt_only():
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([255, 1]), torch.tensor([0, 1]))
    r = cm.compute(["a", "b"])
    assert r["per_class"]["a"]["IoU"] == 0.0 and r["per_class"]["b"]["IoU"] == 100.0


def test_split_metrics():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2]))
    split = get_split("unseen:c")
    r = cm.compute(["a", "b", "c"], split)
    s, u = (100 + 50) / 2, 50.0
    assert r["mIoU_seen"] == pytest.approx(s) and r["mIoU_unseen"] == pytest.approx(u)
    assert r["hIoU"] == pytest.approx(2 * s * u / (s + u))


def test_named_splits_match_dataset_classes():
    from vocaseg.data.datasets import class_file

    voc = class_file("voc20").with_background(("sky",)).names
    seen, unseen = get_split("voc_zs3").masks(voc)
    assert sum(unseen) == 5 and sum(seen) == 15 and not seen[0] and not unseen[0]
    ctx = class_file("context59").with_background(("background",)).names
    seen, unseen = get_split("context_zs3").masks(ctx)
    assert sum(unseen) == 10 and sum(seen) == 50
    stuff = class_file("coco_stuff171").names
    seen, unseen = get_split("coco_stuff_zs3").masks(stuff)
    assert sum(unseen) == 15 and sum(seen) == 156


def test_empty_ground_truth_is_an_error():
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([0, 1]), torch.tensor([255, 255]))
    with pytest.raises(ValueError, match="no labelled pixels"):
        cm.compute(["a", "b"])


def _merge_worker(rank, world, path, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    cm = ConfusionMatrix(3)
    gt = torch.tensor([0, 1, 2, 2, 1, 0])
    pred = torch.tensor([0, 1, 1, 2, 1, 2])
    cm.update(pred[rank::world], gt[rank::world])
    cm.all_reduce()
    if rank == 0:
        torch.save(cm.matrix, out)
    dist.destroy_process_group()


def test_multiprocess_merge_equals_single_process(tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "m.pt"
    mp.spawn(_merge_worker, args=(2, str(tmp_path / "rdzv"), str(out)), nprocs=2, join=True)
    single = ConfusionMatrix(3)
    single.update(torch.tensor([0, 1, 1, 2, 1, 2]), torch.tensor([0, 1, 2, 2, 1, 0]))
    assert torch.equal(torch.load(out), single.matrix)


class _ColourSegmenter:
    """Predicts class = red channel mod C: a stand-in model whose output the test can compute itself."""

    device = torch.device("cpu")

    def __init__(self, num_classes):
        self.num_classes, self.calls = num_classes, []

    def segment_arrays(self, arrays, vocab):
        self.calls.append(len(arrays))

        class Result:
            def __init__(self, labels):
                self._labels = labels

            def labels_tensor(self):
                return self._labels

        return [Result(torch.from_numpy(a[..., 0].astype("int64") % self.num_classes)) for a in arrays]


@pytest.mark.parametrize("workers,load_batch,batch_images", [(0, 8, 4), (2, 3, 5), (2, 8, 64)])
def test_evaluate_regroups_loader_batches_into_model_calls(tmp_path, workers, load_batch, batch_images):
    """Small loader batches are regrouped into calls of batch_images; the confusion matrix is the one
    computed directly, whatever the grouping, with images of mixed sizes and label dtypes."""
    import numpy as np
    from PIL import Image

    from vocaseg.data.datasets import build_dataset
    from vocaseg.evaluation import evaluate

    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    (tmp_path / "classes.txt").write_text("a\nb\nc\n")
    expected = ConfusionMatrix(3)
    for i in range(11):
        h, w = (20, 30) if i % 3 else (17, 23)
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        label = rng.integers(0, 3, (h, w)).astype(np.uint8)
        label[rng.random((h, w)) < 0.1] = 255
        Image.fromarray(image).save(tmp_path / "images" / f"{i:02d}.png")
        Image.fromarray(label).save(tmp_path / "labels" / f"{i:02d}.png")
        expected.update(torch.from_numpy(image[..., 0].astype(np.int64) % 3), torch.from_numpy(label.astype(np.int64)))
    dataset = build_dataset("folder", str(tmp_path))
    seg = _ColourSegmenter(3)
    timings = {}
    _, cm = evaluate(seg, dataset, workers=workers, batch_images=batch_images, load_batch=load_batch,
                     progress=False, return_matrix=True, timings=timings)
    assert torch.equal(cm.matrix, expected.matrix)
    assert sum(seg.calls) == 11 and all(n >= min(batch_images, 11) for n in seg.calls[:-1])
    assert max(seg.calls) < batch_images + load_batch  # a call never holds more than one loader batch extra
    assert {"waiting for data", "segmenting (host)", "metric (host)"} <= set(timings)
