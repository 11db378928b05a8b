"""Train / eval loaders from timm's transforms, collate, mixup and GPU-style prefetcher.

We assemble the train loader ourselves (rather than timm's ``create_loader``) to own the sampler: it is
seeded from ``--seed``, and repeated augmentation (``--aug-repeats``) also works in a single process,
which timm's loader refuses.
"""
from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from typing import Any

import torch
from timm.data import FastCollateMixup, Mixup, create_loader, create_transform
from timm.data.distributed_sampler import RepeatAugSampler
from timm.data.loader import fast_collate
from torch.utils.data import DataLoader, DistributedSampler

from ..config import AugConfig, RunConfig
from ..errors import UserError
from .contrast import ContrastSampler, dataset_labels
from .device_pipeline import DeviceAugmentConfig, DeviceAugmentLoader, DeviceStreamDataset, device_collate
from .prefetch import ExtrasPrefetchLoader
from .repeats import EpochRepeatSampler, check_epoch_repeats
from .shards import ShardDataset
from .stream import StreamDataset, StreamSampler, stream_collate


def train_dataset_view(dataset: Any, data_config: dict, cfg: RunConfig, pipeline: str = "cpu",
                       rank: int = 0, contrast: ContrastSampler | None = None):
    """What the loader workers index with stream keys: augmented uint8 images (cpu pipeline: timm's transform),
    or file bytes plus drawn augmentation parameters (gpu pipeline: the device does the rest)."""
    if pipeline == "gpu":
        if contrast is not None:
            raise UserError("--data-pipeline gpu does not carry CRD's contrast indices; use --data-pipeline cpu")
        return DeviceStreamDataset(dataset, DeviceAugmentConfig.from_aug(cfg.aug, data_config), cfg.loop.seed, rank)
    set_train_transform(dataset, data_config, cfg.aug)
    return StreamDataset(dataset, cfg.loop.seed, rank, contrast)


def set_train_transform(dataset: Any, data_config: dict, aug: AugConfig) -> None:
    """timm's training transform (uint8 output: the prefetcher normalises on the device)."""
    dataset.transform = create_transform(
        data_config["input_size"], is_training=True, use_prefetcher=True, no_aug=aug.no_aug,
        scale=aug.scale, ratio=aug.ratio, hflip=aug.hflip, vflip=aug.vflip, color_jitter=aug.color_jitter,
        auto_augment=aug.aa, interpolation=aug.train_interpolation, mean=data_config["mean"],
        std=data_config["std"])


def _train_sampler(dataset: Any, cfg: RunConfig, world_size: int, rank: int):
    """The epoch's order: repeated augmentation, ``--epoch-repeats``, or a seeded DistributedSampler."""
    repeats, aug_repeats, seed = cfg.data.epoch_repeats, cfg.aug.aug_repeats, cfg.loop.seed
    check_epoch_repeats(repeats, aug_repeats)
    if aug_repeats:
        # timm keeps a multiple of 256 samples per epoch; on a set smaller than that it would keep none
        selected_round = 256 if len(dataset) >= 256 * world_size else 0
        return RepeatAugSampler(dataset, num_replicas=world_size, rank=rank, num_repeats=aug_repeats,
                                selected_round=selected_round)
    if repeats and repeats != 1:
        return EpochRepeatSampler(len(dataset), repeats, world_size, rank, seed)
    return DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)


def _shard_loader(dataset: ShardDataset, cfg: RunConfig, collate, device: torch.device,
                  world_size: int, rank: int) -> DataLoader:
    """Streamed shards: the dataset itself splits the epoch over ranks and workers (shards.py). Workers are
    started afresh each epoch so that they see the epoch and the resume point."""
    d = cfg.data
    if cfg.aug.aug_repeats:
        raise UserError("--aug-repeats is not supported with wds/ shards (use --epoch-repeats to see each sample "
                        "more often)")
    check_epoch_repeats(d.epoch_repeats, 0)
    dataset.configure(cfg.loop.seed, d.batch_size, d.workers, world_size, rank, d.epoch_repeats)
    if dataset.batches_per_lane() == 0:
        raise UserError(f"--batch-size {d.batch_size} x {max(1, d.workers)} worker(s) x {world_size} "
                        f"process(es) is more than the {dataset.epoch_samples()} training samples; lower "
                        "--batch-size or --workers")
    return DataLoader(dataset, batch_size=d.batch_size, num_workers=d.workers, collate_fn=collate,
                      pin_memory=bool(cfg.speed.pin_mem) and device.type == "cuda", drop_last=True)


def build_train_loader(dataset: Any, data_config: dict, cfg: RunConfig, num_classes: int,
                       device: torch.device, world_size: int = 1, rank: int = 0,
                       contrast_k: int | None = None, labels: Any = None) -> ExtrasPrefetchLoader:
    """Shuffled, augmented, mixed batches, normalised on ``device`` (uint8 or file bytes cross to the device).

    The stream is replayable (see stream.py): sample and batch randomness come from (seed, rank, epoch,
    position). With ``contrast_k`` each batch also carries ``{'index', 'contrastive_index'}`` for CRD.
    ``--data-pipeline gpu`` decodes and augments on ``device`` (device_pipeline.py). ``labels``: every
    sample's label, for CRD's contrast draws (default: read from a folder dataset's file list).
    """
    pipeline, aug, d, seed = cfg.data.data_pipeline, cfg.aug, cfg.data, cfg.loop.seed
    streaming = isinstance(dataset, ShardDataset)
    if pipeline == "gpu" and not hasattr(dataset, "reader"):
        raise UserError("--data-pipeline gpu reads image files of a folder dataset; use --data-pipeline cpu with "
                        "--dataset torch/, hfds/ or wds/")
    # label smoothing is applied per student by its objective, so one mixed batch serves students with
    # different --smoothing values
    mix_args = dict(mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, cutmix_minmax=aug.cutmix_minmax,
                    prob=aug.mixup_prob, switch_prob=aug.mixup_switch_prob, mode=aug.mixup_mode,
                    label_smoothing=0.0, num_classes=num_classes)
    if aug.mixup_active and d.batch_size % 2:
        raise UserError(f"--mixup / --cutmix pair each sample with another: --batch-size must be even, got "
                        f"{d.batch_size}")
    contrast = None
    if contrast_k is not None:
        contrast = ContrastSampler(labels if labels is not None else dataset_labels(dataset), contrast_k, seed)
    if pipeline == "gpu":
        collate = device_collate
    else:
        inner = FastCollateMixup(**mix_args) if aug.mixup_active else fast_collate
        collate = stream_collate(inner, seed, rank, aug.mixup_off_epoch)
    if streaming:
        set_train_transform(dataset, data_config, aug)
        loader = _shard_loader(dataset, cfg, collate, device, world_size, rank)
    else:
        view = train_dataset_view(dataset, data_config, cfg, pipeline, rank, contrast)
        base = _train_sampler(dataset, cfg, world_size, rank)
        loader = DataLoader(
            view, batch_size=d.batch_size, sampler=StreamSampler(base), num_workers=d.workers,
            collate_fn=collate, pin_memory=bool(cfg.speed.pin_mem) and device.type == "cuda", drop_last=True,
            persistent_workers=d.workers > 0)
        if len(loader) == 0:
            raise UserError(f"--batch-size {d.batch_size} is larger than the training set ({len(base)} images "
                            f"per process) and incomplete batches are dropped; lower --batch-size")
    common = dict(mean=data_config["mean"], std=data_config["std"], channels=data_config["input_size"][0],
                  device=device, re_prob=aug.reprob, re_mode=aug.remode, re_count=aug.recount, seed=seed,
                  rank=rank)
    if pipeline == "gpu":
        mixup = Mixup(**mix_args) if aug.mixup_active else None
        return DeviceAugmentLoader(loader, view.config, mixup, aug.mixup_off_epoch, **common)
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
        # as timm: the workers live across evaluations instead of being forked again for each one
        persistent_workers=workers > 0)


def set_epoch(loader: ExtrasPrefetchLoader, epoch: int, start_step: int = 0) -> None:
    """The epoch's sample order; a resumed epoch starts after its first ``start_step`` batches."""
    dataset = loader.loader.dataset
    if isinstance(dataset, ShardDataset):
        dataset.set_epoch(epoch, start_step)
        return
    loader.sampler.set_epoch(epoch, start_step * loader.loader.batch_size)


def start_workers(loader: Any) -> None:
    """Fork an eval loader's persistent workers now, while the process is still quiet. Forking later, from a
    process whose communication and loader threads are busy, can leave the child with a lock held by a
    thread that does not exist in it: such a worker hangs for ever, and the job with it (seen on 2-process
    gloo runs). The first evaluation then reuses these workers."""
    inner = getattr(loader, "loader", loader)  # timm's PrefetchLoader wraps the DataLoader
    if isinstance(inner, DataLoader) and inner.num_workers > 0 and inner.persistent_workers:
        iter(inner)


class _WorkerIgnoresStopSignals:
    """A worker_init_fn that keeps a DataLoader worker alive through the SIGINT / SIGTERM meant for the run,
    then runs the loader's own.

    Ctrl-C reaches every process of the terminal's group and a batch system's SIGTERM every process of the job:
    a worker that died on it would take the run down before the main process could save where it was (the
    main process stops on them itself). SIGINT is ignored. SIGTERM cannot simply be ignored: the main process
    ends its workers with SIGTERM (multiprocessing's terminate, e.g. when it exits on an error), and a worker
    ignoring that would leave it waiting for ever. So SIGTERM is blocked and a thread takes each one: from the
    parent it ends the worker, from anyone else it is dropped (torch's own worker handler tells the two apart
    the same way)."""

    def __init__(self, inner: Callable[[int], None] | None):
        self.inner = inner

    def __call__(self, worker_id: int) -> None:
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        if hasattr(signal, "sigwaitinfo"):  # Linux; elsewhere the worker keeps torch's handling
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
            threading.Thread(target=_end_on_parents_sigterm, args=(os.getppid(),), daemon=True,
                             name="sigterm-from-parent").start()
        if self.inner is not None:
            self.inner(worker_id)


def _end_on_parents_sigterm(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == parent:
            os._exit(0)  # as torch's worker does on its parent's SIGTERM


def workers_ignore_stop_signals(loader: Any) -> None:
    """Make the workers of ``loader`` (a DataLoader, or a prefetching wrapper of one) ignore SIGTERM / SIGINT;
    call it before the workers start."""
    inner = getattr(loader, "loader", loader)
    if isinstance(inner, DataLoader) and not isinstance(inner.worker_init_fn, _WorkerIgnoresStopSignals):
        inner.worker_init_fn = _WorkerIgnoresStopSignals(inner.worker_init_fn)
