"""A replayable training stream: every sample's augmentation and every batch's mixup are seeded from
(seed, rank, epoch, position in the epoch), not from worker state.

So the same flags give the same batches whatever the worker count or persistence, a run resumed in the
middle of an epoch sees exactly the batches it would have seen, and a teacher-output cache can be checked
against the stream that produced it.
"""
from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .contrast import ContrastSampler

_MASK = (1 << 63) - 1
BATCH_KEY = "_batch_key"  # (epoch, position of the batch's first sample), popped by the prefetch loader


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (SplitMix64 steps), stable across processes and Python versions."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & _MASK


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Python, NumPy and torch RNGs (the CPU's and ``device``'s) seeded with ``seed`` inside, restored after:
    for randomness drawn in the main process (random erasing, mixup on the device) that must replay from the
    stream without disturbing the training run's own RNG streams."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [device] if device is not None and device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            seed_all(seed)
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


class StreamSampler(Sampler):
    """Wraps the epoch's sampler (distributed / repeated-augmentation), yielding ``(epoch, position, index)``
    keys from position ``start`` on (a resumed epoch skips what it already trained on)."""

    def __init__(self, base: Sampler):
        self.base = base
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        for position, index in enumerate(self.base):
            if position >= self.start:
                yield self.epoch, position, index

    def __len__(self) -> int:
        return max(len(self.base) - self.start, 0)


class StreamDataset(Dataset):
    """Items become ``(image, target, extras)``; the RNGs are seeded per sample before the transform runs.

    ``extras`` holds the per-batch seed (for the collate) and, for CRD, ``index`` and ``contrastive_index``."""

    def __init__(self, dataset, seed: int, rank: int = 0, contrast: ContrastSampler | None = None):
        self.dataset, self.seed, self.rank, self.contrast = dataset, seed, rank, contrast

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def transform(self):
        return self.dataset.transform

    @transform.setter
    def transform(self, value) -> None:
        self.dataset.transform = value

    def __getitem__(self, key):
        epoch, position, index = key
        sample_seed = mix_seed(self.seed, self.rank, epoch, position)
        seed_all(sample_seed)
        img, target = self.dataset[index]
        extras = {"_epoch": epoch, "_position": position}
        if self.contrast is not None:
            extras["index"] = index
            extras["contrastive_index"] = self.contrast.draw(index, np.random.default_rng(sample_seed))
        return img, target, extras


def stream_collate(inner: Callable, seed: int, rank: int = 0, mixup_off_epoch: int = 0) -> Callable:
    """Collate ``(image, target, extras)`` items: seed the batch-level randomness (mixup / cutmix) from the
    batch's first key, call ``inner`` (timm's fast_collate or FastCollateMixup), stack the extras."""
    def collate(batch):
        first = batch[0][2]
        epoch = first["_epoch"]
        seed_all(mix_seed(seed, rank, epoch, first["_position"], 1))
        if hasattr(inner, "mixup_enabled") and mixup_off_epoch:
            inner.mixup_enabled = epoch < mixup_off_epoch
        x, y = inner([(b[0], b[1]) for b in batch])
        keys = [k for k in first if not k.startswith("_")]
        extras = {k: torch.as_tensor(np.stack([np.asarray(b[2][k]) for b in batch])) for k in keys}
        # the batch's place in the stream, for randomness drawn after collation (random erasing on the device)
        extras[BATCH_KEY] = torch.tensor([epoch, first["_position"]])
        return x, y, extras
    collate.inner = inner
    return collate
