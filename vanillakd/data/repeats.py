"""``--epoch-repeats F``: one training epoch passes over the dataset F times (timm 0.6's "epoch repeat
multiplier"; there it applied to its iterable readers, here to every dataset kind).

An epoch is ceil(F) independent shuffles of the dataset, one after the other, cut to round(F x N) samples
and dealt to the ranks as ``DistributedSampler`` does (padded to a multiple of the world size). So each
sample appears floor(F) or ceil(F) times, and every copy gets its own augmentation (the stream seeds by
position, not by sample). Useful on small sets, where per-epoch overheads (evaluation, checkpoints,
worker start-up) would otherwise dominate.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from ..errors import UserError


def check_epoch_repeats(value: float, aug_repeats: int) -> None:
    if not math.isfinite(value) or value < 0:
        raise UserError(f"--epoch-repeats must be >= 0 (0 = once per epoch), got {value}")
    if value and aug_repeats:
        raise UserError("--epoch-repeats and --aug-repeats both change the epoch's sampler; use one of them")


class EpochRepeatSampler(Sampler):
    def __init__(self, size: int, repeats: float, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        self.size, self.repeats, self.num_replicas, self.rank, self.seed = size, repeats, num_replicas, rank, seed
        self.epoch = 0
        self.total = int(round(repeats * size))
        self.per_rank = math.ceil(self.total / num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        order = torch.cat([torch.randperm(self.size, generator=g) for _ in range(math.ceil(self.repeats))])
        order = order[: self.total].tolist()
        order += order[: self.per_rank * self.num_replicas - len(order)]  # pad as DistributedSampler does
        return iter(order[self.rank::self.num_replicas])

    def __len__(self) -> int:
        return self.per_rank
