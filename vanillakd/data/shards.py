"""WebDataset shards (``--dataset wds/NAME``) as a replayable stream, split across ranks and loader workers.

timm's own WebDataset reader shuffles with each worker's torch seed and lets ``with_epoch`` cut or repeat a
worker's shards, so a run cannot be replayed or resumed mid-epoch, and ranks may see a sample twice or not at
all. We keep timm's ``_info.json`` (parsed by timm's ``ReaderWds``: shard names and sizes per split) and
read the tar files sequentially with ``webdataset``, laid out so that the epoch is a pure function of the
flags:

* The epoch's sample sequence is the shards in an order drawn from (seed, epoch) and concatenated
  (``--epoch-repeats F``: ceil(F) such orders, cut to round(F x N) samples).
* The sequence is cut into ``world_size x lanes`` contiguous, equal ranges (a lane is one loader worker of
  one rank; ``lanes = max(1, --workers)``), each a whole number of batches; the few samples past the last
  whole batch of every lane are left out of that epoch (like ``drop_last``), and logged. Every other sample
  of the epoch is seen exactly once over all ranks and workers.
* A lane reads its range (at most one partial shard at each end, read from the shard's start) through a
  shuffle buffer seeded from (seed, epoch, lane); its j-th batch is the rank's batch ``j x lanes + lane``,
  which is the order in which the DataLoader takes batches from its workers.
* Each sample's augmentation is seeded from (seed, rank, epoch, position in the rank's stream), as for
  folders, and the batch's mixup from its first position (stream.py).

Guarantee: with the same shards, seed, batch size, world size, ``--workers`` and flags, a run (and so a
``--resume`` mid-epoch or a teacher cache) sees the same batches. A resumed epoch re-reads its lanes up to
where they stopped without decoding. Changing ``--workers`` or the world size changes the order.
"""
from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from ..errors import UserError
from .stream import mix_seed, seed_all

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
SHUFFLE_BUFFER = 1024  # samples per lane held for shuffling (raw bytes: ~100 MB at ImageNet's ~110 KB)


@dataclass(frozen=True)
class Piece:
    """Samples ``start <= i < stop`` of shard ``shard``."""
    shard: int
    start: int
    stop: int


def _reason(e: BaseException) -> str:
    """One line from webdataset's errors (which append the stream and the url to ``args``)."""
    if isinstance(e, OSError) and isinstance(e.strerror, str):
        text = e.strerror
    else:
        text = str(e.args[0]) if e.args else ""
    return " ".join(f"{type(e).__name__}: {text}".split())


def epoch_order(num_shards: int, seed: int, epoch: int, copies: int) -> list[int]:
    """The shards in the epoch's order: ``copies`` independent permutations, one after the other."""
    order: list[int] = []
    for copy in range(copies):
        rng = np.random.default_rng(mix_seed(seed, epoch, copy, 0x5A4D))
        order.extend(rng.permutation(num_shards).tolist())
    return order


def cut_range(order: list[int], lengths: list[int], start: int, stop: int) -> list[Piece]:
    """The pieces of the concatenated shards ``order`` covering samples ``start <= i < stop``."""
    pieces, offset = [], 0
    for shard in order:
        n = lengths[shard]
        lo, hi = max(start, offset), min(stop, offset + n)
        if lo < hi:
            pieces.append(Piece(shard, lo - offset, hi - offset))
        offset += n
        if offset >= stop:
            break
    return pieces


class ShardDataset(IterableDataset):
    """An iterable dataset of ``(image, target, extras)`` over one split's shards; see the module docstring.

    ``configure`` (the loader) says how the epoch is laid out; ``set_epoch`` which epoch and from which batch.
    Eval mode (``training=False``): the shards in their listed order, split into near-equal rank ranges,
    every sample once, last batch partial; items are ``(image, target)``.
    """

    def __init__(self, urls: list[str], lengths: list[int], num_classes: int, input_img_mode: str = "RGB",
                 training: bool = False):
        self.urls, self.lengths, self.num_classes = list(urls), [int(n) for n in lengths], num_classes
        self.input_img_mode, self.training = input_img_mode or "RGB", training
        self.transform: Callable | None = None
        self.seed, self.batch_size, self.lanes, self.world_size, self.rank = 0, 1, 1, 1, 0
        self.repeats = 1.0
        self.epoch, self.start_step = 0, 0

    @property
    def num_samples(self) -> int:
        return sum(self.lengths)

    def configure(self, seed: int, batch_size: int, workers: int, world_size: int = 1, rank: int = 0,
                  repeats: float = 0.0) -> None:
        self.seed, self.batch_size, self.lanes = seed, batch_size, max(1, workers)
        self.world_size, self.rank, self.repeats = world_size, rank, repeats or 1.0

    def set_loader_cfg(self, num_workers: int | None = None, batch_size: int | None = None) -> None:
        """The eval loader's workers and batch size (build_eval_loader). The lanes must be cut in whole
        batches of the loader's size: cut for another, their partial batches add up to more than the
        ceil(n / batch) batches the loader's length promises, and evaluate stops before the last ones."""
        if not self.training:
            self.lanes = max(1, num_workers or 0)
            if batch_size:
                self.batch_size = batch_size
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                self.world_size, self.rank = torch.distributed.get_world_size(), torch.distributed.get_rank()

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    # -- layout -----------------------------------------------------------------------------------------
    def epoch_samples(self) -> int:
        return int(round(self.repeats * self.num_samples)) if self.training else self.num_samples

    def batches_per_lane(self) -> int:
        return self.epoch_samples() // (self.world_size * self.lanes) // self.batch_size

    def left_out(self) -> int:
        """Samples of each training epoch no lane reads (past the last whole batch of a lane)."""
        return self.epoch_samples() - self.world_size * self.lanes * self.batches_per_lane() * self.batch_size

    def _train_lane(self, lane: int) -> list[Piece]:
        per_lane = self.batches_per_lane() * self.batch_size
        order = epoch_order(len(self.urls), self.seed, self.epoch, math.ceil(self.repeats))
        g = self.rank * self.lanes + lane
        return cut_range(order, self.lengths, g * per_lane, (g + 1) * per_lane)

    def _eval_rank_range(self) -> tuple[int, int]:
        n, w = self.num_samples, self.world_size
        return self.rank * n // w, (self.rank + 1) * n // w

    def _eval_lane(self, lane: int) -> list[Piece]:
        """Lane k takes the rank's batches k, k + lanes, ...: whole batches, one lane also the partial last."""
        lo, hi = self._eval_rank_range()
        b = self.batch_size
        batches = math.ceil((hi - lo) / b)
        counts = [len(range(k, batches, self.lanes)) for k in range(self.lanes)]
        sizes = [c * b for c in counts]
        if batches:
            sizes[(batches - 1) % self.lanes] -= batches * b - (hi - lo)  # the lane holding the last batch
        start = lo + sum(sizes[:lane])
        return cut_range(list(range(len(self.urls))), self.lengths, start, start + sizes[lane])

    def __len__(self) -> int:
        if self.training:
            # the rank's samples from the resume point on, as StreamSampler counts them (the loader's length,
            # len // batch, is then the batches left: train_one_epoch's total = start_step + len(loader))
            return max(self.lanes * self.batches_per_lane() - self.start_step, 0) * self.batch_size
        lo, hi = self._eval_rank_range()
        return hi - lo

    # -- reading ----------------------------------------------------------------------------------------
    def _raw(self, pieces: list[Piece]) -> Iterator[tuple[int, dict]]:
        """``(shard, sample dict of raw bytes)`` for every sample of ``pieces``, read sequentially.

        A shard that cannot be read (missing, not a tar, a failing ``pipe:`` command) or holds fewer samples
        than ``_info.json`` states (truncated) is a UserError naming it: webdataset would raise a traceback, or
        just end early and leave the epoch silently short."""
        import tarfile

        import webdataset as wds
        for piece in pieces:
            url = self.urls[piece.shard]
            samples = iter(wds.tarfile_to_samples()(iter([{"url": url}])))
            i = 0
            while i < piece.stop:
                try:
                    sample = next(samples)
                except StopIteration:
                    raise UserError(f"shard {url} holds {i} samples, but _info.json states "
                                    f"{self.lengths[piece.shard]} (truncated, or wrong shard_lengths)") from None
                except (tarfile.TarError, OSError, ValueError, EOFError) as e:
                    raise UserError(f"cannot read shard {url}: {_reason(e)}") from None
                if i >= piece.start:
                    yield piece.shard, sample
                i += 1

    def _shuffled(self, raw: Iterator, lane: int) -> Iterator:
        rng = np.random.default_rng(mix_seed(self.seed, self.epoch, self.rank, lane, 0xB0F))
        buffer: list = []
        for item in raw:
            if len(buffer) < SHUFFLE_BUFFER:
                buffer.append(item)
                continue
            j = int(rng.integers(len(buffer)))
            buffer[j], item = item, buffer[j]
            yield item
        while buffer:
            yield buffer.pop(int(rng.integers(len(buffer))))

    def decode(self, shard: int, sample: dict) -> tuple[Image.Image, int]:
        key = next((k for k in IMAGE_KEYS if k in sample), None)
        where = f"{self.urls[shard]}: sample {sample.get('__key__')!r}"
        if key is None or "cls" not in sample:
            raise UserError(f"{where} lacks an image (.jpg/.png/.webp) or a .cls label; members: "
                            f"{sorted(k for k in sample if not k.startswith('__'))}")
        try:
            with Image.open(io.BytesIO(sample[key])) as im:
                img = im.convert(self.input_img_mode)
        except (OSError, ValueError, SyntaxError) as e:
            raise UserError(f"{where}: bad image ({e})") from None
        target = int(sample["cls"])
        if not 0 <= target < self.num_classes:
            raise UserError(f"{where}: label {target} is outside the {self.num_classes} classes")
        return img, target

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if self.training:
            yield from self._train_items(worker)
            return
        for lane in ([worker] if info is not None else range(self.lanes)):
            for shard, sample in self._raw(self._eval_lane(lane)):
                img, target = self.decode(shard, sample)
                yield (self.transform(img) if self.transform else img), target

    def _train_items(self, worker: int):
        k = self.lanes
        # a resumed epoch starts at rank batch s: DataLoader worker i serves lane (i + s) % k, so that its
        # round-robin order over workers continues with batch s, s + 1, ...
        lane = (worker + self.start_step) % k
        skip = max(0, -(-(self.start_step - lane) // k))  # this lane's batches before batch s
        stream = self._shuffled(self._raw(self._train_lane(lane)), lane)
        b, n = self.batch_size, self.batches_per_lane()
        for i, (shard, sample) in enumerate(stream):
            j, within = divmod(i, b)
            if j >= n:
                break
            if j < skip:
                continue  # read, not decoded
            position = (j * k + lane) * b + within
            seed_all(mix_seed(self.seed, self.rank, self.epoch, position))
            img, target = self.decode(shard, sample)
            if self.transform is not None:
                img = self.transform(img)
            yield img, target, {"_epoch": self.epoch, "_position": position}
