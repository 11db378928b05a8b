"""Parsed training flags -> the typed ``RunConfig`` the core takes (the one boundary between argparse and it)."""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

from PIL import Image

from ..config import (
    NO_KD,
    AugConfig,
    CacheConfig,
    CheckpointConfig,
    DataConfig,
    DistConfig,
    LoopConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
    SpeedConfig,
    StudentSetting,
    TeacherConfig,
)
from ..data.sources import dataset_kind, image_mode
from ..errors import UserError
from ..losses import get_kd_loss_entry
from ..models import check_model_name
from ..teachers.live import check_teacher_name
from .method_flags import method_args_from
from .train_args import build_train_parser, check_list_lengths, parse_train_args, setting


def _frozen(value: Any) -> Any:
    """Lists from argparse become tuples, so a config can be neither changed nor aliased."""
    return tuple(value) if isinstance(value, list) else value


def _section(cls, args: argparse.Namespace, **names: str):
    """``cls`` filled from the flags of the same names (``names`` maps a field to a differently named flag)."""
    return cls(**{f.name: _frozen(getattr(args, names.get(f.name, f.name))) for f in fields(cls)})


def student_settings(args: argparse.Namespace) -> tuple[StudentSetting, ...]:
    """One setting per position of the list-valued flags; settings that differ only in
    ``--model-ema-decay`` become one student with several EMA copies."""
    groups: dict[tuple, list[float]] = {}
    for i in range(check_list_lengths(args)):
        values = setting(args, i)
        decay = values.pop("model_ema_decay")
        groups.setdefault(tuple(values.items()), []).append(decay)
    return tuple(StudentSetting(**dict(key), ema_decays=tuple(dict.fromkeys(decays)) if args.model_ema else ())
                 for key, decays in groups.items())


def run_config(args: argparse.Namespace) -> RunConfig:
    """The typed configuration of a parsed training (or cache-teacher) command line."""
    cache = _section(CacheConfig, args) if hasattr(args, "cache_dir") else None
    return RunConfig(
        data=_section(DataConfig, args), aug=_section(AugConfig, args), model=_section(ModelConfig, args),
        teacher=_section(TeacherConfig, args, name="teacher", weights="teacher_pretrained", resize="teacher_resize",
                         norm="teacher_norm", cache="teacher_cache"),
        optim=_section(OptimConfig, args), schedule=_section(ScheduleConfig, args),
        speed=_section(SpeedConfig, args), checkpoint=_section(CheckpointConfig, args),
        loop=_section(LoopConfig, args), dist=_section(DistConfig, args), students=student_settings(args),
        method_args=MappingProxyType(method_args_from(args)), flags=MappingProxyType(dict(vars(args))), cache=cache)


def _ordered(flag: str, pair: Sequence[float] | None, strict: bool = False) -> None:
    if pair and (pair[0] >= pair[1] if strict else pair[0] > pair[1]):
        rule = "<" if strict else "<="
        raise UserError(f"{flag} {pair[0]:g} {pair[1]:g}: the first value must be {rule} the second")


def _check_ranges(cfg: RunConfig) -> None:
    """Ranges given as several values: ordered, and of the right count."""
    _ordered("--scale", cfg.aug.scale)
    _ordered("--ratio", cfg.aug.ratio)
    _ordered("--cutmix-minmax", cfg.aug.cutmix_minmax, strict=True)  # timm draws the box side in [min, max)
    noise = cfg.schedule.lr_noise
    if noise is not None and len(noise) > 2:
        raise UserError(f"--lr-noise takes 1 value (noise from that fraction of the epochs on) or 2 (between "
                        f"them), got {len(noise)}")
    if noise is not None and len(noise) == 2:
        _ordered("--lr-noise", noise)
    milestones = cfg.schedule.decay_milestones
    if list(milestones) != sorted(milestones):
        raise UserError(f"--decay-milestones must be ascending, got {' '.join(map(str, milestones))}")
    if cfg.schedule.sched == "plateau" and cfg.schedule.decay_rate >= 1:
        raise UserError(f"--sched plateau needs --decay-rate < 1 (the factor that lowers the lr), got "
                        f"{cfg.schedule.decay_rate:g}")


def input_channels(d: DataConfig) -> int | None:
    """The channel count the flags ask for (``--input-size`` wins over ``--in-chans``, as in timm), or None."""
    return d.input_size[0] if d.input_size else d.in_chans


# 8-bit modes timm's transforms handle (P, 1, I, F, I;16 stop them at the first batch)
TRAINABLE_MODES = frozenset({"L", "LA", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"})


def _check_names(cfg: RunConfig) -> None:
    """Names and files that would otherwise fail only after the data is listed (minutes on a large folder)."""
    from timm.optim import get_optimizer_class
    for s in cfg.students:
        name = s.opt.lower()
        try:  # timm's create_optimizer_v2 takes 'lookahead_<name>' too
            get_optimizer_class(name.split("_", 1)[1] if name.startswith("lookahead_") else name)
        except Exception:  # noqa: BLE001 - timm raises ValueError or AssertionError, by version
            raise UserError(f"--opt {s.opt}: not an optimizer timm knows (e.g. sgd, adamw, lamb, lion)") from None
    betas = cfg.optim.opt_betas
    if betas is not None and len(betas) not in (2, 3):
        raise UserError(f"--opt-betas takes 2 values (3 for adan), got {len(betas)}")
    for flag, path, kind in (("--teacher-pretrained: teacher checkpoint",
                              cfg.teacher.weights if cfg.uses_teacher else None, "file"),
                             ("--initial-checkpoint", cfg.model.initial_checkpoint, "file"),
                             ("--class-map", cfg.data.class_map, "file"),
                             ("--teacher-cache", cfg.teacher.cache if cfg.uses_teacher else None, "dir")):
        if path and not (Path(path).is_dir() if kind == "dir" else Path(path).is_file()):
            raise UserError(f"{flag} {path} " + ("does not exist" if not Path(path).exists() else
                                                 f"is not a {'folder' if kind == 'dir' else 'file'}"))
    if cfg.aug.aa and not cfg.aug.no_aug:
        _check_auto_augment(cfg.aug.aa)


def _check_auto_augment(aa: str) -> None:
    from timm.data import create_transform
    try:
        create_transform(32, is_training=True, auto_augment=aa)
    except Exception as e:  # noqa: BLE001 - timm's parsers assert or raise KeyError / ValueError
        raise UserError(f"--aa {aa}: not an augmentation policy timm reads (e.g. rand-m9-mstd0.5, augmix-m5, "
                        f"original, v0; {str(e).strip() or type(e).__name__})") from None


def check_channels(d: DataConfig | argparse.Namespace) -> None:
    """--mean / --std: 1 value or one per input channel; the image mode must give that many channels."""
    channels = input_channels(d)
    where = ("--input-size " + " ".join(map(str, d.input_size)) if d.input_size else f"--in-chans {d.in_chans}") \
        if channels is not None else "--in-chans / --input-size not given"
    count = channels or 3
    for flag, values in (("--mean", d.mean), ("--std", d.std)):
        if values is not None and len(values) not in (1, count):
            raise UserError(f"{flag} has {len(values)} values but the input has {count} channel(s) ({where}): "
                            f"give {'1 value' if count == 1 else f'1 value or {count}'}")
    mode = image_mode(d.input_img_mode, d.in_chans, d.input_size)
    try:
        bands = Image.getmodebands(mode)
    except (KeyError, ValueError):
        raise UserError(f"--input-img-mode {mode}: not a PIL image mode (e.g. RGB, L, RGBA)") from None
    if mode not in TRAINABLE_MODES:  # PIL has them, but timm's transforms cannot turn them into tensors
        raise UserError(f"--input-img-mode {mode}: images in this mode cannot be augmented and normalised; use one "
                        f"of {', '.join(sorted(TRAINABLE_MODES))}")
    if bands != count:
        raise UserError(f"--input-img-mode {mode} gives {bands} channel(s) but the input has {count} ({where}): "
                        "give --input-img-mode with as many bands (L: 1, RGB: 3, RGBA: 4)")


def check_run_config(cfg: RunConfig) -> None:
    """What argparse cannot check alone: names that must exist, and flags that must agree with each other."""
    dataset_kind(cfg.data.dataset)
    for s in cfg.students:
        check_model_name(s.model, "model")
        if s.kd_loss != NO_KD:
            get_kd_loss_entry(s.kd_loss)
    if cfg.uses_teacher:
        check_teacher_name(cfg.teacher.name)
    if cfg.method_args.get("review_preact") and all(s.kd_loss != "review" for s in cfg.students):
        raise UserError("--review-preact applies to --kd-loss review only")
    total = cfg.schedule.epochs + cfg.schedule.cooldown_epochs
    start = cfg.schedule.start_epoch
    if not cfg.checkpoint.resume and start and start >= total:
        raise UserError(f"--start-epoch {start} leaves nothing to train: the run has {total} epochs")
    _check_ranges(cfg)
    check_channels(cfg.data)
    _check_names(cfg)


def parse_run_config(argv: Sequence[str] | None, prog: str = "train-kd.py", default_loss: str = "kd",
                     description: str = "") -> RunConfig:
    """A training command line (``--config`` YAML included) parsed, checked and typed."""
    args = parse_train_args(build_train_parser(prog, description, default_loss), argv)
    cfg = run_config(args)
    check_run_config(cfg)
    return cfg


def run_train_argv(argv: Sequence[str], loss_kind: str = "logits") -> list[dict]:
    """``train.run`` from a train-kd command line (the demo, the comparison harness and benchmarks drive
    training runs this way)."""
    from ..train import run
    return run(parse_run_config(list(argv)), loss_kind)
