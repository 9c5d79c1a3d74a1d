"""Segmentation metrics from a confusion matrix that lives on the device, and zero-shot splits.

Conventions follow mmsegmentation: a class absent from both ground truth and prediction has an
undefined (NaN) IoU and is left out of the means; a class present in the prediction only has IoU 0.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .data.datasets import IGNORE_INDEX, normalise_name


@dataclass(frozen=True)
class ZeroShotSplit:
    """Seen/unseen classes of a dataset; ``excluded`` classes are ignored (e.g. VOC's background)."""

    name: str
    dataset: str
    unseen: tuple[str, ...]
    excluded: tuple[str, ...] = ()

    def masks(self, classes: Sequence[str]) -> tuple[list[bool], list[bool]]:
        names = [normalise_name(c) for c in classes]
        unseen = {normalise_name(c) for c in self.unseen}
        excluded = {normalise_name(c) for c in self.excluded}
        missing = unseen - set(names)  # an excluded class may be absent (voc_zs3 on voc20: no background)
        if missing:
            raise ValueError(f"split {self.name}: classes {sorted(missing)} are not in the dataset's classes")
        is_unseen = [n in unseen for n in names]
        is_seen = [n not in unseen and n not in excluded for n in names]
        return is_seen, is_unseen


ZERO_SHOT_SPLITS = {
    "voc_zs3": ZeroShotSplit("voc_zs3", "voc21", ("potted plant", "sheep", "sofa", "train", "tv monitor"),
                             excluded=("background",)),
    # Pascal Context, 10 unseen: CLIP-RC / ZegCLIP count background as a seen class (context60, 50 seen);
    # CLIPTeacher's 49 seen / 10 unseen are over the 59 classes without background (context59)
    "context_zs3": ZeroShotSplit("context_zs3", "context60", (
        "cow", "motorbike", "sofa", "cat", "boat", "fence", "bird", "tv monitor", "keyboard", "aeroplane")),
    "context59_zs3": ZeroShotSplit("context59_zs3", "context59", (
        "cow", "motorbike", "sofa", "cat", "boat", "fence", "bird", "tv monitor", "keyboard", "aeroplane")),
    "coco_stuff_zs3": ZeroShotSplit("coco_stuff_zs3", "coco_stuff171", (
        "frisbee", "skateboard", "cardboard", "carrot", "scissors", "suitcase", "giraffe", "cow", "road",
        "concrete wall", "tree", "grass", "river", "clouds", "playing field")),
    "synth_zs": ZeroShotSplit("synth_zs", "synth", ("hexagon", "crescent", "wood")),
}


def get_split(name_or_spec: str, dataset: str | None = None) -> ZeroShotSplit:
    """A named split, or a user split ``"unseen:cow,cat"`` (optionally ``;excluded:background``)."""
    if name_or_spec in ZERO_SHOT_SPLITS:
        return ZERO_SHOT_SPLITS[name_or_spec]
    if name_or_spec.startswith("unseen:"):
        parts = dict(p.split(":", 1) for p in name_or_spec.split(";") if ":" in p)
        unseen = tuple(c.strip() for c in parts.get("unseen", "").split(",") if c.strip())
        excluded = tuple(c.strip() for c in parts.get("excluded", "").split(",") if c.strip())
        if not unseen:
            raise ValueError("a user split needs at least one unseen class: 'unseen:cow,cat'")
        return ZeroShotSplit("custom", dataset or "", unseen, excluded)
    raise ValueError(f"unknown split {name_or_spec!r}; choose one of {', '.join(ZERO_SHOT_SPLITS)} "
                     "or write 'unseen:class a,class b'")


class ConfusionMatrix:
    """``matrix[t, p]`` counts pixels of true class t predicted as p, accumulated on ``device``.

    A prediction outside [0, C) (e.g. 255 = 'no decision') counts against the true class only.
    """

    def __init__(self, num_classes: int, device: str | torch.device = "cpu", ignore_index: int = IGNORE_INDEX):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros((num_classes, num_classes + 1), dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} differs from ground truth {tuple(target.shape)}")
        pred = pred.to(self.matrix.device, torch.int64).flatten()
        target = target.to(self.matrix.device, torch.int64).flatten()
        c, n = self.num_classes, self.num_classes + 1
        pred = torch.where((pred >= 0) & (pred < c), pred, c)
        # ignored pixels go to one extra bin past the matrix, dropped below: no boolean indexing,
        # whose data-dependent size would make the host wait for the GPU at every image
        index = torch.where((target != self.ignore_index) & (target >= 0) & (target < c), target * n + pred, c * n)
        if index.is_cuda:
            # histc has a fixed number of bins; bincount must first read the maximum back to the host.
            # Its float32 counts are exact below 2**24, hence the pieces.
            counts = sum(torch.histc(part.float(), bins=c * n + 1, min=0, max=c * n + 1).long()
                         for part in index.split((1 << 24) - 1))
        else:
            counts = torch.bincount(index, minlength=c * n + 1)
        self.matrix += counts[: c * n].view(c, n)

    def all_reduce(self) -> None:
        """Sum the matrices of all processes (torchrun / torch.distributed)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.matrix)

    def ious(self) -> torch.Tensor:
        """(C,) float64 IoU per class; NaN for a class absent from both ground truth and prediction."""
        m = self.matrix.double()
        intersect = m.diagonal()
        union = m.sum(1) + m[:, : self.num_classes].sum(0) - intersect
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=m.device)
        return torch.where(union > 0, intersect / union.clamp_min(1), nan)

    def compute(self, classes: Sequence[str], split: ZeroShotSplit | None = None) -> dict:
        m = self.matrix.double()
        intersect = m.diagonal()
        area_label = m.sum(1)
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=m.device)
        iou = self.ious()
        acc = torch.where(area_label > 0, intersect / area_label.clamp_min(1), nan)
        total = area_label.sum()
        if total == 0:
            raise ValueError("no labelled pixels were scored: every ground-truth pixel was ignore")
        freq = area_label / total
        result = {
            "aAcc": 100 * (intersect.sum() / total).item(),
            "mIoU": 100 * _nanmean(iou),
            "mAcc": 100 * _nanmean(acc),
            "fwIoU": 100 * torch.nansum(freq * iou).item(),
            "per_class": {name: {"IoU": _pct(iou[i]), "Acc": _pct(acc[i])} for i, name in enumerate(classes)},
        }
        if split is not None:
            seen, unseen = split.masks(classes)
            s = 100 * _nanmean(iou[torch.tensor(seen, device=m.device)])
            u = 100 * _nanmean(iou[torch.tensor(unseen, device=m.device)])
            keep = torch.tensor([a or b for a, b in zip(seen, unseen)], device=m.device)
            result.update({
                "split": split.name, "pAcc": 100 * (intersect[keep].sum() / area_label[keep].sum().clamp_min(1)).item(),
                "mIoU_seen": s, "mIoU_unseen": u,
                "hIoU": 2 * s * u / (s + u) if s + u > 0 else 0.0,
                "unseen_classes": [c for c, f in zip(classes, unseen) if f],
            })
        return result


def _nanmean(x: torch.Tensor) -> float:
    valid = ~torch.isnan(x)
    return float(x[valid].mean().item()) if valid.any() else float("nan")


def _pct(x: torch.Tensor) -> float | None:
    v = float(x.item())
    return None if math.isnan(v) else 100 * v


def format_table(result: dict, max_rows: int = 200) -> str:
    """A plain-text table: per-class IoU/Acc, then the summary metrics."""
    rows = [f"{'class':<24} {'IoU':>7} {'Acc':>7}"]
    for name, v in list(result["per_class"].items())[:max_rows]:
        iou = "-" if v["IoU"] is None else f"{v['IoU']:.2f}"
        acc = "-" if v["Acc"] is None else f"{v['Acc']:.2f}"
        rows.append(f"{name[:24]:<24} {iou:>7} {acc:>7}")
    summary = ["aAcc", "mIoU", "mAcc", "fwIoU"] + (["pAcc", "mIoU_seen", "mIoU_unseen", "hIoU"] if "hIoU" in result else [])
    rows.append("-" * 40)
    rows.append("  ".join(f"{k} {result[k]:.2f}" for k in summary))
    return "\n".join(rows)


# ---------------------------------------------------------------------------- runners
def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class _Shard(torch.utils.data.Dataset):
    """The images of one process, read in the loader's workers, where :func:`_collate` also packs them."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        from .data.datasets import DatasetError

        try:
            sample = self.dataset[self.indices[i]]
        except DatasetError as err:  # re-raised in the main process with its one-line message intact
            return err
        label = sample.label
        for dtype in (np.uint8, np.int16, np.int32):  # the smallest integer type that holds it
            if label.size == 0 or (label.min() >= np.iinfo(dtype).min and label.max() <= np.iinfo(dtype).max):
                label = label.astype(dtype)
                break
        return sample.id, torch.from_numpy(np.require(sample.image, requirements=["C", "W"])), torch.from_numpy(label)


def _collate(items):
    """A batch as two flat tensors (every image's pixels, every label's values) and the shapes to cut
    them back: torch moves a tensor from a worker through shared memory, so the main process
    receives two buffers a batch; numpy arrays would be pickled through a pipe (a 14-worker loader
    gave 293 images/s that way on the H200 machine, 799 with one tensor per sample)."""
    for item in items:
        if isinstance(item, Exception):
            return item
    ids = [sid for sid, _, _ in items]
    labels = [label for _, _, label in items]
    dtype = labels[0].dtype
    for label in labels[1:]:
        dtype = torch.promote_types(dtype, label.dtype)
    return (ids, [tuple(image.shape) for _, image, _ in items], torch.cat([image.reshape(-1) for _, image, _ in items]),
            [tuple(label.shape) for label in labels], torch.cat([label.reshape(-1).to(dtype) for label in labels]))


def _unpack(batch, int64_labels: bool) -> tuple[list, np.ndarray]:
    """:func:`_collate`'s batch -> Samples whose arrays are views of the received buffers, and the
    flat label buffer itself (every label's values in order)."""
    from .data.datasets import Sample

    if isinstance(batch, Exception):
        raise batch
    ids, image_shapes, images, label_shapes, labels = batch
    images, labels = images.numpy(), labels.numpy()
    samples, i, j = [], 0, 0
    for sid, image_shape, label_shape in zip(ids, image_shapes, label_shapes):
        image = images[i:i + math.prod(image_shape)].reshape(image_shape)
        label = labels[j:j + math.prod(label_shape)].reshape(label_shape)
        i, j = i + image.size, j + label.size
        samples.append(Sample(sid, image, label.astype(np.int64) if int64_labels else label))
    return samples, labels


def _timed(timings: dict | None, stage: str, since: float) -> float:
    """Add the seconds since ``since`` to ``timings[stage]`` (when timings are kept); returns now."""
    now = time.perf_counter()
    if timings is not None:
        timings[stage] = timings.get(stage, 0.0) + now - since
    return now


def _model_calls(loader, batch_images: int, int64_labels: bool, timings: dict | None):
    """The loader's small batches regrouped into model calls of ``batch_images`` images: (samples,
    their labels as one flat buffer). Small loader batches reach the model sooner (a worker decodes 8
    images, not 64, before the first forward can start) and keep every worker busy to the end."""

    def joined(flats: list[np.ndarray]) -> np.ndarray:
        return flats[0] if len(flats) == 1 else np.concatenate(flats, dtype=np.result_type(*flats))

    samples, labels, tick = [], [], time.perf_counter()
    for batch in loader:
        tock = _timed(timings, "waiting for data", tick)
        part, flat = _unpack(batch, int64_labels)
        samples += part
        labels.append(flat)
        _timed(timings, "unpacking", tock)
        if len(samples) >= batch_images:
            yield samples, joined(labels)
            samples, labels = [], []
        tick = time.perf_counter()
    if samples:
        yield samples, joined(labels)


def evaluate(segmenter, dataset, split: ZeroShotSplit | None = None, batch_images: int = 4, workers: int = 2,
             save_predictions: str | None = None, progress: bool = True, on_image=None,
             return_matrix: bool = False, load_batch: int = 8, timings: dict | None = None) -> dict | tuple[dict, ConfusionMatrix]:
    """Run ``segmenter`` over ``dataset`` and score it. Under torchrun each process takes every
    world_size-th image and the confusion matrices are summed before the metrics are computed.

    ``on_image(sample, prediction)``, if given, sees every image with its (H, W) int64 prediction on
    the device (e.g. :class:`WorstImages`); ``return_matrix``: also return the summed confusion matrix;
    ``load_batch``: images per loader batch (regrouped into calls of ``batch_images``); ``timings``: a
    dict that receives the main process's seconds per stage (the host's view: GPU work is queued)."""
    from pathlib import Path

    from tqdm import tqdm

    from .visualize import save_label_png

    rank, world = _distributed()
    indices = list(range(rank, len(dataset), world))
    loader = torch.utils.data.DataLoader(_Shard(dataset, indices), batch_size=max(1, min(load_batch, batch_images)),
                                         num_workers=workers, collate_fn=_collate, persistent_workers=False)
    vocab = dataset.vocabulary
    cm = ConfusionMatrix(len(vocab), device=segmenter.device)
    out_dir = Path(save_predictions) if save_predictions else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(indices), desc=f"eval {dataset.name}", unit="img", disable=not progress or rank != 0,
               dynamic_ncols=True)
    for samples, labels in _model_calls(loader, batch_images, on_image is not None, timings):
        t = time.perf_counter()
        results = segmenter.segment_arrays([s.image for s in samples], vocab)
        preds = [res.labels_tensor() for res in results]
        for sample, pred in zip(samples, preds):
            if tuple(pred.shape) != sample.label.shape:
                raise ValueError(f"{sample.id}: prediction shape {tuple(pred.shape)} differs from ground truth "
                                 f"{sample.label.shape}")
        t = _timed(timings, "segmenting (host)", t)
        # one update a call against its labels as they arrived (one flat buffer): on a GPU a pinned,
        # asynchronous copy, so the host queues the next call meanwhile
        target = torch.from_numpy(labels)
        if preds[0].is_cuda:
            target = target.pin_memory().to(preds[0].device, non_blocking=True)
        cm.update(torch.cat([p.flatten() for p in preds]), target)
        t = _timed(timings, "metric (host)", t)
        for sample, pred in zip(samples, preds):
            if on_image is not None:
                on_image(sample, pred)
            if out_dir:
                save_label_png(pred.cpu().numpy(), out_dir / f"{sample.id}.png")
        bar.update(len(samples))
        _timed(timings, "hooks, saving, progress", t)
    bar.close()
    cm.all_reduce()
    t = time.perf_counter()
    result = cm.compute(dataset.classes, split)  # reads the matrix back: waits for the device's queue
    _timed(timings, "waiting for the device at the end", t)
    result["num_images"] = len(dataset)
    return (result, cm) if return_matrix else result


def image_scores(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                 ignore_index: int = IGNORE_INDEX) -> tuple[float, float] | None:
    """One image's (mIoU, pixel accuracy) in percent: the dataset-level rule applied to one image
    (mean IoU over the classes in its ground truth or prediction); None when no pixel is labelled."""
    cm = ConfusionMatrix(num_classes, device=pred.device, ignore_index=ignore_index)
    cm.update(pred, target)
    total = cm.matrix.sum()
    if total == 0:
        return None
    return 100 * _nanmean(cm.ious()), 100 * (cm.matrix.diagonal().sum() / total).item()


class WorstImages:
    """An ``on_image`` hook of :func:`evaluate` that keeps the ``k`` images a method does worst on.

    An image's score is its own mIoU: the mean IoU over the classes in its ground truth or its
    prediction (the dataset-level rule applied to one image); ties go to the earlier image.
    ``max_side`` bounds the stored pictures (long side, nearest-neighbour for the label maps).
    """

    def __init__(self, k: int, num_classes: int, max_side: int | None = 512, ignore_index: int = IGNORE_INDEX):
        self.k, self.num_classes, self.max_side, self.ignore_index = k, num_classes, max_side, ignore_index
        self.items: list[dict] = []  # sorted worst first
        self._seen = 0

    def __call__(self, sample, pred: torch.Tensor) -> None:
        from .visualize import shrink

        order = self._seen
        self._seen += 1
        if self.k <= 0:
            return
        scores = image_scores(pred, torch.from_numpy(sample.label), self.num_classes, self.ignore_index)
        if scores is None:  # nothing labelled in this image: nothing to judge
            return
        miou, acc = scores
        if len(self.items) == self.k and (miou, order) >= (self.items[-1]["mIoU"], self.items[-1]["order"]):
            return
        image, (label, prediction) = shrink(sample.image, [sample.label, pred.cpu().numpy()], self.max_side)
        self.items.append({"id": sample.id, "mIoU": miou, "aAcc": acc, "order": order, "image": image,
                           "label": label, "prediction": prediction})
        self.items.sort(key=lambda item: (item["mIoU"], item["order"]))
        del self.items[self.k:]

    def gather(self) -> None:
        """Under torchrun: every process ends up with the k worst images over all processes."""
        rank, world = _distributed()
        if world == 1:
            return
        # image k of process r is image r + k * world of the dataset (evaluate's sharding)
        mine = [dict(item, order=item["order"] * world + rank) for item in self.items]
        everything = [None] * world
        torch.distributed.all_gather_object(everything, mine)
        merged = sorted((item for part in everything for item in part), key=lambda it: (it["mIoU"], it["order"]))
        self.items = merged[: self.k]

    def summary(self) -> list[dict]:
        """What goes into the result JSON: id, mIoU and pixel accuracy of each, worst first."""
        return [{"id": item["id"], "mIoU": item["mIoU"], "aAcc": item["aAcc"]} for item in self.items]


def score_predictions(dataset, pred_dir: str, split: ZeroShotSplit | None = None, progress: bool = True) -> dict:
    """Score a folder of label PNGs (``<image id>.png``: class indices, 255 = ignore) against ``dataset``."""
    from pathlib import Path

    import numpy as np
    from PIL import Image
    from tqdm import tqdm

    from .data.datasets import DatasetError

    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise DatasetError(f"prediction folder missing: {pred_dir}")
    cm = ConfusionMatrix(len(dataset.classes))
    for i in tqdm(range(len(dataset)), desc=f"score {dataset.name}", unit="img", disable=not progress):
        sample = dataset[i]
        path = pred_dir / f"{sample.id}.png"
        if not path.is_file():
            raise DatasetError(f"{path}: prediction missing for image {sample.id}")
        try:
            with Image.open(path) as img:
                pred = np.asarray(img)
        except OSError as err:
            raise DatasetError(f"{path}: unreadable prediction ({err})") from err
        if pred.ndim != 2:
            raise DatasetError(f"{path}: prediction has shape {pred.shape}; expected one channel of class indices")
        if pred.shape != sample.label.shape:
            raise DatasetError(f"{path}: prediction size {pred.shape[1]}x{pred.shape[0]} differs from ground truth "
                               f"{sample.label.shape[1]}x{sample.label.shape[0]}")
        bad = (pred != IGNORE_INDEX) & (pred >= len(dataset.classes))
        if bad.any():
            raise DatasetError(f"{path}: prediction values {sorted(np.unique(pred[bad]).tolist())[:8]} exceed the "
                               f"{len(dataset.classes)} classes")
        cm.update(torch.from_numpy(pred.astype(np.int64)), torch.from_numpy(sample.label))
    result = cm.compute(dataset.classes, split)
    result["num_images"] = len(dataset)
    return result
