"""The training data stream every trained method reads: item ``i`` -> one augmented crop.

Item i reads image ``order[i % n]`` of a per-epoch permutation seeded by (seed, epoch) and draws its
augmentation from a generator seeded by (seed, i): it depends on i alone, as the trainer's exact
resume needs.
"""

from __future__ import annotations

import torch

from ..data.datasets import SegDataset
from .augment import JointAugment
from .loop import item_seed


class EpochOrder:
    """Item ``i`` of an endless stream -> index ``order[i % n]`` of a permutation of ``range(n)`` drawn
    per epoch from (seed, epoch): every epoch visits each index once, and the map depends on i alone."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._epoch, self._order = None, None

    def __call__(self, i: int) -> int:
        epoch = i // self.n
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(item_seed(self.seed, "order", epoch))
            self._epoch, self._order = epoch, torch.randperm(self.n, generator=g)
        return int(self._order[i % self.n])


class TrainStream(torch.utils.data.Dataset):
    """An endless stream of augmented crops of ``dataset``.

    label_fn: ground-truth label map (H, W) -> the training label map; None means the label file is
    never opened (annotation-free / unsupervised training) and the item's mask is None.
    with_index: also return the image's index in ``dataset`` (for per-image data such as ReCLIP's
    image-level pseudo classes).
    """

    def __init__(self, dataset: SegDataset, augment: JointAugment, label_fn, seed: int, read_labels: bool,
                 with_index: bool = False):
        self.dataset, self.augment, self.label_fn, self.seed = dataset, augment, label_fn, seed
        self.read_labels, self.with_index = read_labels, with_index
        self._index = EpochOrder(len(dataset), seed)

    def __len__(self) -> int:
        return 1 << 40

    def __getitem__(self, i: int):
        j = self._index(i)
        if self.read_labels:
            sample = self.dataset[j]
            image, label = sample.image, self.label_fn(torch.from_numpy(sample.label))
        else:  # the label file is never opened
            image, label = self.dataset.image(j), None
        g = torch.Generator().manual_seed(item_seed(self.seed, "augment", i))
        pixels, mask = self.augment(image, label, generator=g)
        return (pixels, mask, j) if self.with_index else (pixels, mask)
