"""What a training run and a teacher-cache run set up alike: logging, processes and device, precision and
speed switches, the data splits, timm's data config and the teacher."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import timm
import torch
from timm.data import resolve_data_config

from .checkpoint import load_file, recorded_arch
from .config import RunConfig
from .data.folder import SplitDataset, drop_bad_images, take_fraction
from .data.prefetch import channel_stats
from .data.sources import build_train_val_any, image_mode
from .data.stream import seed_all
from .distributed import DistInfo, check_sync_bn, init_distributed
from .errors import UserError
from .features import FeatureModel, FeatureShapes, probe_shapes, resized
from .losses import get_kd_loss_entry
from .outputs import setup_console_logging
from .precision import Precision, resolve_device
from .speed import resolve_speed
from .teachers.live import FrozenTeacher, create_teacher

log = logging.getLogger("vanillakd")


@dataclass(frozen=True)
class RunEnv:
    """Where the run executes: its process in the job, its device and its precision."""
    info: DistInfo
    device: torch.device
    precision: Precision


def start_run(cfg: RunConfig) -> tuple[RunConfig, RunEnv]:
    """Console logging, the process group, the device; the config with its auto speed switches decided for
    that device; seeds. Rank 0 alone prints progress."""
    logger = setup_console_logging()
    want_cuda = cfg.speed.device.startswith("cuda") if cfg.speed.device else None
    info = init_distributed(cfg.dist.local_rank, want_cuda, cfg.dist.dist_timeout)
    device = resolve_device(cfg.speed.device, info.local_rank)
    check_sync_bn(cfg.dist.sync_bn, device)
    if not info.primary:
        logger.setLevel(logging.WARNING)
    speed, turned_on = resolve_speed(cfg.speed, device, cfg.models)
    if turned_on:
        log.info(f"on by default for {device.type}: {', '.join(turned_on)} (each has a --no-... flag)")
    cfg = cfg.with_speed(speed)
    seed_all(cfg.loop.seed + info.rank)
    return cfg, RunEnv(info, device, Precision.create(device, bool(speed.amp), speed.amp_dtype))


def load_training_data(cfg: RunConfig) -> tuple[SplitDataset, SplitDataset, int]:
    """(train split, val split, number of classes), bad images handled and the train fraction taken."""
    d = cfg.data
    mode = image_mode(d.input_img_mode, d.in_chans, d.input_size)
    train_split, val_split, num_classes = build_train_val_any(
        d.data_dir, d.dataset, d.train_split, d.val_split, d.class_map, d.num_classes, download=d.dataset_download,
        input_img_mode=mode)
    for split in (train_split, val_split):
        drop_bad_images(split, d.bad_images, d.workers, log.info)
    take_fraction(train_split, d.train_fraction, d.train_subset_seed)
    return train_split, val_split, num_classes


def data_config(cfg: RunConfig, model_name: str) -> dict:
    """timm's data config of ``model_name`` (input size, crop, normalisation) with the flags' overrides, fitted
    to the channel count the flags ask for (``--in-chans`` / ``--input-size``)."""
    pretrained_cfg = timm.models.get_pretrained_cfg(model_name)
    resolved = resolve_data_config(dict(cfg.data.geometry()),
                                   pretrained_cfg=pretrained_cfg.to_dict() if pretrained_cfg else None)
    channels = cfg.data.input_size[0] if cfg.data.input_size else cfg.data.in_chans
    return resolved if channels is None else _fit_channels(resolved, channels, model_name)


def _fit_channels(data_cfg: dict, channels: int, model_name: str) -> dict:
    """timm keeps the model's 3-channel input size and RGB mean / std when only the channel count changes
    (``--in-chans 1``: input (3, H, W), and a 3-value fill colour for RandAugment on greyscale images, which
    PIL refuses). Here the input size gets ``channels`` and the mean / std the values timm's loaders would
    normalise with anyway (``prefetch.channel_stats``: the RGB values' average per channel), logged."""
    out = dict(data_cfg, input_size=(channels, *tuple(data_cfg["input_size"])[1:]))
    for key, flag in (("mean", "--mean"), ("std", "--std")):
        values = tuple(out[key])
        if len(values) == channels:
            continue
        out[key] = channel_stats(values, channels)
        if len(values) > 1:  # a 1-value --mean / --std is repeated, as timm does: nothing to say
            shown = ", ".join(f"{v:.4g}" for v in out[key])
            log.info(f"{channels}-channel input: {key} ({shown}), the average of {model_name}'s {key} {values} "
                     f"(timm's rule); {flag} sets it")
    return out


def log_left_out(train_split: SplitDataset) -> None:
    """Streamed shards: say how many samples each epoch leaves out (the lanes take whole batches only)."""
    if train_split.streaming and train_split.dataset.left_out():
        ds = train_split.dataset
        log.info(f"shards: {ds.left_out()} of {ds.epoch_samples()} training samples are left out of each epoch "
                 f"(each of {ds.world_size} process(es) x {ds.lanes} worker lane(s) takes whole batches of a "
                 "contiguous range); which ones changes every epoch")


def val_identity(val_split: SplitDataset, workers: int) -> str:
    """The val split and, for shards, the worker count that fixes the eval loader's order."""
    return val_split.identity() + (f":workers={workers}" if val_split.streaming else "")


def _saved_arch(path: str | None, trust: bool) -> str | None:
    """The architecture a training checkpoint names (ours: 'arch'; timm's and the seed's: args.model)."""
    if not path:
        return None
    try:
        ckpt = load_file(path, trust=trust)
    except UserError:
        return None
    return recorded_arch(ckpt)


def build_teacher(cfg: RunConfig, kd_losses: list[str], num_classes: int, device: torch.device,
                  data_cfg: dict, classes: Sequence[str] | None = None) -> tuple[FrozenTeacher | None,
                                                                             FeatureShapes | None]:
    """The frozen teacher for the students distilling with ``kd_losses`` (None when there are none), with
    feature extraction when one of the methods needs features, and then the teacher's feature shapes."""
    if not kd_losses:
        return None, None
    entries = [get_kd_loss_entry(name) for name in kd_losses]
    t = cfg.teacher
    try:
        teacher = create_teacher(t.name, num_classes, t.weights, t.resize, trust=cfg.checkpoint.trust_checkpoint,
                                 log=log.info, in_chans=int(data_cfg["input_size"][0]),
                                 student_config=data_cfg if t.norm == "auto" else None, classes=classes)
    except UserError as e:
        if not (t.weights and "does not fit" in str(e)):
            raise
        saved = _saved_arch(t.weights, cfg.checkpoint.trust_checkpoint)
        if saved and saved.split(".")[0] != t.name.split(".")[0]:  # most often: --teacher left at its default
            raise UserError(f"{e}; the file is a checkpoint of {saved}: pass --teacher {saved}") from None
        if t.weights:
            raise UserError(f"{e}; --teacher is {t.name}: if the file holds another architecture, pass "
                            "--teacher ARCH") from None
        raise
    shapes = None
    if any(e.uses_features for e in entries):
        preact = any(e.wants_preact(cfg.method_args) for e in entries)
        teacher.model = FeatureModel(teacher.model, preact=preact, name=t.name)
        teacher.eval()  # the new wrapper starts in training mode; the teacher never is
        size = resized(tuple(data_cfg["input_size"]), teacher.resize)
        shapes = probe_shapes(teacher.model.to(device), size, device)
    teacher.to(device)
    if cfg.speed.channels_last:
        teacher.to(memory_format=torch.channels_last)
    if cfg.speed.compile:
        teacher.compile_forward(cfg.speed.compile_mode)
    return teacher, shapes
