"""Per-sample extras for methods that need them (CRD): the sample's dataset index and ``k`` contrast indices
drawn uniformly, with replacement, among samples of OTHER classes.

The class lists are built once, vectorised (a stable argsort of the labels), so 1.28M images take well
under a second; each draw is O(k) with no per-class Python loop. Draws are seeded by (seed, epoch, index),
so they do not depend on worker count or order.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import UserError


class ContrastSampler:
    def __init__(self, labels: np.ndarray, k: int, seed: int = 0):
        labels = np.asarray(labels, dtype=np.int64)
        classes, counts = np.unique(labels, return_counts=True)
        if len(classes) < 2:
            raise UserError("CRD needs a training set with at least two classes (contrast samples come from "
                            f"other classes); found {len(classes)}")
        self.k, self.seed = k, seed
        self.order = np.argsort(labels, kind="stable")        # indices grouped by class
        starts = np.zeros(labels.max() + 1, dtype=np.int64)
        sizes = np.zeros(labels.max() + 1, dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
        starts[classes], sizes[classes] = offsets, counts
        self.labels, self.starts, self.sizes, self.n = labels, starts, sizes, len(labels)
        self.epoch = 0

    def draw(self, index: int) -> np.ndarray:
        """``[index, k indices of other classes]``."""
        c = self.labels[index]
        rng = np.random.default_rng((self.seed, self.epoch, index))
        r = rng.integers(0, self.n - self.sizes[c], size=self.k)
        r = np.where(r >= self.starts[c], r + self.sizes[c], r)  # skip the block of class c
        return np.concatenate([[index], self.order[r]])


class ContrastDataset(Dataset):
    """Wraps a timm dataset: items become ``(image, target, {'index', 'contrastive_index'})``."""

    def __init__(self, dataset, labels: np.ndarray, k: int, seed: int = 0):
        self.dataset = dataset
        self.sampler = ContrastSampler(labels, k, seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name):  # transform, reader ... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __setattr__(self, name, value):
        if name == "transform":
            self.dataset.transform = value
        else:
            super().__setattr__(name, value)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.epoch = epoch

    def __getitem__(self, index: int):
        img, target = self.dataset[index]
        return img, target, {"index": index, "contrastive_index": self.sampler.draw(index)}


def dataset_labels(dataset) -> np.ndarray:
    """Labels of a timm ImageFolder dataset without reading any image."""
    return np.fromiter((t for _, t in dataset.reader.samples), dtype=np.int64, count=len(dataset.reader.samples))


def collate_extras(inner):
    """A collate for ``(image, target, extras)`` items: ``inner`` handles images and targets (fast_collate or
    mixup), extras are stacked into tensors."""
    def collate(batch):
        x, y = inner([(b[0], b[1]) for b in batch])
        extras = {key: torch.as_tensor(np.stack([b[2][key] for b in batch])) for key in batch[0][2]}
        return x, y, extras
    collate.inner = inner
    return collate
