"""The training loader's device side: uint8 batches to the device on a side stream, normalised there (timm's
PrefetchLoader design), with a third batch element: a dict of per-sample extras (dataset index, contrast
indices, ...) for the methods that need them. Batches without extras come out as ``(input, target)`` exactly as
timm's do.

The class is ours, not a subclass of timm's: what timm's PrefetchLoader sets on itself changes between releases
(1.0.31 keeps its CUDA stream on ``self.stream``, 1.0.29 in a local of ``__iter__``), so every attribute read here
is set here. From timm we use only its public RandomErasing."""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import suppress
from functools import partial

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.random_erasing import RandomErasing

from .stream import BATCH_KEY, mix_seed, seeded


def channel_stats(values: float | Sequence[float], channels: int) -> tuple[float, ...]:
    """Per-channel mean / std: a scalar is repeated, a sequence of another length averaged (timm's rule, so a
    pretrained config's 3-channel stats serve a 1-channel model)."""
    if not isinstance(values, (tuple, list)):
        return (float(values),) * channels
    if len(values) != channels:
        return (sum(values) / len(values),) * channels
    return tuple(float(v) for v in values)


class ExtrasPrefetchLoader:
    """Arguments as timm's PrefetchLoader's (without its deprecated ``fp16``), plus ``seed`` and ``rank`` that
    seed random erasing from each batch's place in the stream."""

    def __init__(self, loader: Iterable, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                 std: Sequence[float] = IMAGENET_DEFAULT_STD, channels: int = 3,
                 device: torch.device = torch.device("cuda"), img_dtype: torch.dtype | None = None,
                 re_prob: float = 0.0, re_mode: str = "const", re_count: int = 1, re_num_splits: int = 0,
                 seed: int = 0, rank: int = 0):
        self.loader = loader
        self.device = torch.device(device)
        self.img_dtype = img_dtype or torch.float32
        # the loader hands uint8 pixels: the stats are scaled to 0..255 once here, not per batch
        shape = (1, channels, 1, 1)
        self.mean = torch.tensor([255 * m for m in channel_stats(mean, channels)], device=self.device,
                                 dtype=self.img_dtype).view(shape)
        self.std = torch.tensor([255 * s for s in channel_stats(std, channels)], device=self.device,
                                dtype=self.img_dtype).view(shape)
        self.random_erasing = (RandomErasing(probability=re_prob, mode=re_mode, max_count=re_count,
                                             num_splits=re_num_splits, device=self.device)
                               if re_prob > 0 else None)
        self.is_cuda = self.device.type == "cuda" and torch.cuda.is_available()
        # one side stream for the loader's lifetime, made on first use: the caching allocator pools blocks per
        # stream, so a new stream per epoch would strand every earlier epoch's cached blocks
        self.stream: torch.cuda.Stream | None = None
        self.seed, self.rank = seed, rank

    def _to_device(self, batch):
        extras = dict(batch[2]) if len(batch) > 2 else {}
        key = extras.pop(BATCH_KEY, None)
        x = batch[0].to(device=self.device, non_blocking=True)
        x = x.to(self.img_dtype).sub_(self.mean).div_(self.std)
        if self.random_erasing is not None:
            x = self._erase(x, key)
        out = [x, batch[1].to(device=self.device, non_blocking=True)]
        if extras:
            out.append({k: v.to(device=self.device, non_blocking=True) for k, v in extras.items()})
        return tuple(out)

    def _erase(self, x, key):
        """timm's random erasing, its randomness seeded from the batch's place in the stream (when known) so
        that a resumed run and a teacher cache see the same erased pixels."""
        if key is None:
            return self.random_erasing(x)
        epoch, position = (int(v) for v in key)
        with seeded(mix_seed(self.seed, self.rank, epoch, position, 2), self.device):
            return self.random_erasing(x)

    def _stream_context(self):
        if not self.is_cuda:
            return suppress
        if self.stream is None:
            self.stream = torch.cuda.Stream(device=self.device)
        return partial(torch.cuda.stream, stream=self.stream)

    def __iter__(self) -> Iterator[tuple]:
        stream_context = self._stream_context()
        pending = None
        for batch in self.loader:
            with stream_context():
                ready = self._to_device(batch)
            if self.is_cuda:
                # the batch is made on the side stream and used on the consumer's: recording that use keeps the
                # allocator from handing its memory to a later batch before the consumer's kernels are done, so
                # the side stream need not wait for the consumer and its work overlaps the training step
                consumer = torch.cuda.current_stream(self.device)
                for t in _tensors(ready):
                    t.record_stream(consumer)
            if pending is not None:
                yield pending
            if self.is_cuda:
                torch.cuda.current_stream(self.device).wait_stream(self.stream)
            pending = ready
        if pending is not None:
            yield pending

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def sampler(self):
        return self.loader.sampler

    @property
    def batch_sampler(self):
        return self.loader.batch_sampler


def _tensors(batch):
    for item in batch:
        if isinstance(item, torch.Tensor):
            yield item
        elif isinstance(item, dict):
            yield from (v for v in item.values() if isinstance(v, torch.Tensor))
