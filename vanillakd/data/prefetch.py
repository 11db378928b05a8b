"""timm's PrefetchLoader (uint8 to the device on a side stream, normalised there), extended to carry a third
batch element: a dict of per-sample extras (dataset index, contrast indices, ...) for the methods that need
them. Batches without extras come out as ``(input, target)`` exactly as timm's do."""
from __future__ import annotations

from contextlib import suppress
from functools import partial

import torch
from timm.data.loader import PrefetchLoader

from .stream import BATCH_KEY, mix_seed, seeded


class ExtrasPrefetchLoader(PrefetchLoader):
    def __init__(self, loader, *args, seed: int = 0, rank: int = 0, **kwargs):
        super().__init__(loader, *args, **kwargs)
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

    def __iter__(self):
        if self.is_cuda:
            if self.stream is None:
                self.stream = torch.cuda.Stream(device=self.device)
            stream_context = partial(torch.cuda.stream, stream=self.stream)
        else:
            stream_context = suppress
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

    def __len__(self):
        return len(self.loader)


def _tensors(batch):
    for item in batch:
        if isinstance(item, torch.Tensor):
            yield item
        elif isinstance(item, dict):
            yield from (v for v in item.values() if isinstance(v, torch.Tensor))
