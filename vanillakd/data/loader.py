"""Train / eval loaders from timm's transforms, collate, mixup and GPU-style prefetcher.

We assemble the train loader ourselves (rather than timm's ``create_loader``) to own the sampler: it is
seeded from ``--seed``, and repeated augmentation (``--aug-repeats``) also works in a single process,
which timm's loader refuses.
"""
from __future__ import annotations

import argparse
from typing import Any

import torch
from timm.data import FastCollateMixup, Mixup, create_loader, create_transform
from timm.data.distributed_sampler import RepeatAugSampler
from timm.data.loader import fast_collate
from torch.utils.data import DataLoader, DistributedSampler

from ..errors import UserError
from .contrast import ContrastSampler, dataset_labels
from .device_pipeline import DeviceAugmentConfig, DeviceAugmentLoader, DeviceStreamDataset, device_collate
from .prefetch import ExtrasPrefetchLoader
from .repeats import EpochRepeatSampler, check_epoch_repeats
from .shards import ShardDataset
from .stream import StreamDataset, StreamSampler, stream_collate


def mixup_active(args: argparse.Namespace) -> bool:
    return args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None


def train_dataset_view(dataset: Any, data_config: dict, args: argparse.Namespace, pipeline: str = "cpu",
                       rank: int = 0, contrast: ContrastSampler | None = None):
    """What the loader workers index with stream keys: augmented uint8 images (cpu pipeline: timm's transform),
    or file bytes plus drawn augmentation parameters (gpu pipeline: the device does the rest)."""
    if pipeline == "gpu":
        if contrast is not None:
            raise UserError("--data-pipeline gpu does not carry CRD's contrast indices; use --data-pipeline cpu")
        return DeviceStreamDataset(dataset, DeviceAugmentConfig.from_args(args, data_config), args.seed, rank)
    set_train_transform(dataset, data_config, args)
    return StreamDataset(dataset, args.seed, rank, contrast)


def set_train_transform(dataset: Any, data_config: dict, args: argparse.Namespace) -> None:
    """timm's training transform (uint8 output: the prefetcher normalises on the device)."""
    dataset.transform = create_transform(
        data_config["input_size"], is_training=True, use_prefetcher=True, no_aug=args.no_aug,
        scale=args.scale, ratio=args.ratio, hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter,
        auto_augment=args.aa, interpolation=args.train_interpolation, mean=data_config["mean"],
        std=data_config["std"])


def _train_sampler(dataset: Any, args: argparse.Namespace, world_size: int, rank: int):
    """The epoch's order: repeated augmentation, ``--epoch-repeats``, or a seeded DistributedSampler."""
    repeats = getattr(args, "epoch_repeats", 0.0)
    check_epoch_repeats(repeats, args.aug_repeats)
    if args.aug_repeats:
        # timm keeps a multiple of 256 samples per epoch; on a set smaller than that it would keep none
        selected_round = 256 if len(dataset) >= 256 * world_size else 0
        return RepeatAugSampler(dataset, num_replicas=world_size, rank=rank, num_repeats=args.aug_repeats,
                                selected_round=selected_round)
    if repeats and repeats != 1:
        return EpochRepeatSampler(len(dataset), repeats, world_size, rank, args.seed)
    return DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed)


def _shard_loader(dataset: ShardDataset, args: argparse.Namespace, collate, device: torch.device,
                  world_size: int, rank: int) -> DataLoader:
    """Streamed shards: the dataset itself splits the epoch over ranks and workers (shards.py). Workers are
    started afresh each epoch so that they see the epoch and the resume point."""
    if args.aug_repeats:
        raise UserError("--aug-repeats is not supported with wds/ shards (use --epoch-repeats to see each sample "
                        "more often)")
    check_epoch_repeats(getattr(args, "epoch_repeats", 0.0), 0)
    dataset.configure(args.seed, args.batch_size, args.workers, world_size, rank, getattr(args, "epoch_repeats", 0.0))
    if dataset.batches_per_lane() == 0:
        raise UserError(f"--batch-size {args.batch_size} x {max(1, args.workers)} worker(s) x {world_size} "
                        f"process(es) is more than the {dataset.epoch_samples()} training samples; lower "
                        "--batch-size or --workers")
    return DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers, collate_fn=collate,
                      pin_memory=bool(args.pin_mem) and device.type == "cuda", drop_last=True)


def build_train_loader(dataset: Any, data_config: dict, args: argparse.Namespace, num_classes: int,
                       device: torch.device, world_size: int = 1, rank: int = 0,
                       contrast_k: int | None = None, labels: Any = None) -> ExtrasPrefetchLoader:
    """Shuffled, augmented, mixed batches, normalised on ``device`` (uint8 or file bytes cross to the device).

    The stream is replayable (see stream.py): sample and batch randomness come from (seed, rank, epoch,
    position). With ``contrast_k`` each batch also carries ``{'index', 'contrastive_index'}`` for CRD.
    ``args.data_pipeline`` 'gpu' decodes and augments on ``device`` (device_pipeline.py). ``labels``: every
    sample's label, for CRD's contrast draws (default: read from a folder dataset's file list).
    """
    pipeline = getattr(args, "data_pipeline", "cpu")
    streaming = isinstance(dataset, ShardDataset)
    if pipeline == "gpu" and not hasattr(dataset, "reader"):
        raise UserError("--data-pipeline gpu reads image files of a folder dataset; use --data-pipeline cpu with "
                        "--dataset torch/, hfds/ or wds/")
    # label smoothing is applied per student by its objective, so one mixed batch serves students with
    # different --smoothing values
    mix_args = dict(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                    prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                    label_smoothing=0.0, num_classes=num_classes)
    if mixup_active(args) and args.batch_size % 2:
        raise UserError(f"--mixup / --cutmix pair each sample with another: --batch-size must be even, got "
                        f"{args.batch_size}")
    contrast = None
    if contrast_k is not None:
        contrast = ContrastSampler(labels if labels is not None else dataset_labels(dataset), contrast_k, args.seed)
    if pipeline == "gpu":
        collate = device_collate
    else:
        inner = FastCollateMixup(**mix_args) if mixup_active(args) else fast_collate
        collate = stream_collate(inner, args.seed, rank, args.mixup_off_epoch)
    if streaming:
        set_train_transform(dataset, data_config, args)
        loader = _shard_loader(dataset, args, collate, device, world_size, rank)
    else:
        view = train_dataset_view(dataset, data_config, args, pipeline, rank, contrast)
        base = _train_sampler(dataset, args, world_size, rank)
        loader = DataLoader(
            view, batch_size=args.batch_size, sampler=StreamSampler(base), num_workers=args.workers,
            collate_fn=collate, pin_memory=bool(args.pin_mem) and device.type == "cuda", drop_last=True,
            persistent_workers=args.workers > 0)
        if len(loader) == 0:
            raise UserError(f"--batch-size {args.batch_size} is larger than the training set ({len(base)} images "
                            f"per process) and incomplete batches are dropped; lower --batch-size")
    common = dict(mean=data_config["mean"], std=data_config["std"], channels=data_config["input_size"][0],
                  device=device, re_prob=args.reprob, re_mode=args.remode, re_count=args.recount, seed=args.seed,
                  rank=rank)
    if pipeline == "gpu":
        mixup = Mixup(**mix_args) if mixup_active(args) else None
        return DeviceAugmentLoader(loader, view.config, mixup, args.mixup_off_epoch, **common)
    return ExtrasPrefetchLoader(loader, **common)


def build_eval_loader(dataset: Any, data_config: dict, batch_size: int, workers: int, device: torch.device,
                      distributed: bool = False, pin_memory: bool = False) -> Any:
    """Center-cropped, normalised batches in a fixed order."""
    if isinstance(dataset, ShardDataset):
        # shards: one lane per worker, cut in whole batches of this size; ranks from the process group
        dataset.set_loader_cfg(workers, batch_size)
    return create_loader(
        dataset, input_size=data_config["input_size"], batch_size=batch_size, is_training=False,
        use_prefetcher=True, interpolation=data_config["interpolation"], mean=data_config["mean"],
        std=data_config["std"], num_workers=workers, distributed=distributed, crop_pct=data_config["crop_pct"],
        crop_mode=data_config.get("crop_mode"), pin_memory=pin_memory and device.type == "cuda", device=device,
        persistent_workers=False)


def set_epoch(loader: ExtrasPrefetchLoader, epoch: int, start_step: int = 0) -> None:
    """The epoch's sample order; a resumed epoch starts after its first ``start_step`` batches."""
    dataset = loader.loader.dataset
    if isinstance(dataset, ShardDataset):
        dataset.set_epoch(epoch, start_step)
        return
    loader.sampler.set_epoch(epoch, start_step * loader.loader.batch_size)
