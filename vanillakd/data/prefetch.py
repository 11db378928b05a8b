"""timm's PrefetchLoader (uint8 to the device on a side stream, normalised there), extended to carry a third
batch element: a dict of per-sample extras (dataset index, contrast indices, ...) for the methods that need
them. Batches without extras come out as ``(input, target)`` exactly as timm's do."""
from __future__ import annotations

from contextlib import suppress
from functools import partial

import torch
from timm.data.loader import PrefetchLoader


class ExtrasPrefetchLoader(PrefetchLoader):
    def _to_device(self, batch):
        x = batch[0].to(device=self.device, non_blocking=True)
        x = x.to(self.img_dtype).sub_(self.mean).div_(self.std)
        if self.random_erasing is not None:
            x = self.random_erasing(x)
        out = [x, batch[1].to(device=self.device, non_blocking=True)]
        if len(batch) > 2:
            out.append({k: v.to(device=self.device, non_blocking=True) for k, v in batch[2].items()})
        return tuple(out)

    def __iter__(self):
        if self.is_cuda:
            if self.stream is None:
                self.stream = torch.cuda.Stream(device=self.device)
            stream_context = partial(torch.cuda.stream, stream=self.stream)
        else:
            stream_context = suppress
        pending = None
        for batch in self.loader:
            if self.is_cuda:
                # the consumer may have freed blocks the copies below reuse: wait for its queued work
                self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with stream_context():
                ready = self._to_device(batch)
            if pending is not None:
                yield pending
            if self.is_cuda:
                torch.cuda.current_stream(self.device).wait_stream(self.stream)
            pending = ready
        if pending is not None:
            yield pending

    def __len__(self):
        return len(self.loader)
