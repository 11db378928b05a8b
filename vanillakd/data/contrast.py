"""CRD's contrast samples: ``k`` indices drawn uniformly, with replacement, among samples of OTHER classes.

The class lists are built once, vectorised (a stable argsort of the labels), so 1.28M images take well
under a second; each draw is O(k) with no per-class Python loop. The training stream (stream.py) seeds each
draw from (seed, rank, epoch, position), so draws do not depend on worker count or order.
"""
from __future__ import annotations

import numpy as np

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

    def draw(self, index: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """``[index, k indices of other classes]``; ``rng`` defaults to one seeded by (seed, epoch, index)."""
        c = self.labels[index]
        rng = rng if rng is not None else np.random.default_rng((self.seed, self.epoch, index))
        r = rng.integers(0, self.n - self.sizes[c], size=self.k)
        r = np.where(r >= self.starts[c], r + self.sizes[c], r)  # skip the block of class c
        return np.concatenate([[index], self.order[r]])


def dataset_labels(dataset) -> np.ndarray:
    """Labels of a timm ImageFolder dataset without reading any image."""
    return np.fromiter((t for _, t in dataset.reader.samples), dtype=np.int64, count=len(dataset.reader.samples))
