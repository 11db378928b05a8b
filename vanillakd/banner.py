"""The start-up lines of a run: the resolved recipe of each student, and what in it looks unintended."""
from __future__ import annotations

import logging
from collections.abc import Sequence

from .config import NO_KD, RunConfig, StudentSetting
from .losses import get_kd_loss_entry

log = logging.getLogger("vanillakd")


def method_text(s: StudentSetting, cfg: RunConfig) -> str:
    """``kd (kd weight 1, base weight 1, temperature 4)``: the method, its weights and its own flags."""
    if s.kd_loss == NO_KD:
        return f"no distillation (base weight {s.ori_loss_weight:g})"
    own = [f"{f.option.removeprefix('--')} {cfg.method_args.get(f.dest, f.default)}"
           for f in get_kd_loss_entry(s.kd_loss).flags]
    return f"{s.kd_loss} (kd weight {s.kd_loss_weight:g}, base weight {s.ori_loss_weight:g}" + \
        "".join(f", {o}" for o in own) + ")"


def augmentation_text(cfg: RunConfig) -> str:
    a = cfg.aug
    if a.no_aug:
        return "none (--no-aug)"
    parts = [f"aa {a.aa}" if a.aa else "", f"mixup {a.mixup:g}" if a.mixup else "",
             f"cutmix {a.cutmix:g}" if a.cutmix else "", f"reprob {a.reprob:g}" if a.reprob else "",
             f"aug-repeats {a.aug_repeats}" if a.aug_repeats else ""]
    return ", ".join(["random-resized crop", *filter(None, parts)])


def recipe_lines(cfg: RunConfig, students: Sequence, world_size: int, precision: str, teacher: str) -> list[str]:
    """One line per student: model, teacher, method, optimizer, batch, schedule, augmentation, precision,
    pipeline, output folder."""
    batch, accum, sch = cfg.data.batch_size, cfg.optim.grad_accum_steps, cfg.schedule
    per_update = batch * world_size * accum
    lines = []
    for st in students:
        s = st.setting
        lines.append(
            f"student {st.index} {s.model} <- {teacher if s.uses_teacher else 'no teacher'}: {method_text(s, cfg)}; "
            f"{s.opt} lr {s.lr:g} wd {s.weight_decay:g}, smoothing {s.smoothing:g}; batch {batch} x {world_size} "
            f"process(es) x {accum} accumulation = {per_update} per update; {st.num_epochs} epochs "
            f"({sch.warmup_epochs} warm-up, {sch.sched}); augmentation: {augmentation_text(cfg)}; {precision}; "
            f"data pipeline {cfg.data.data_pipeline}; outputs in {st.out_dir}")
    return lines


def log_recipe(cfg: RunConfig, students: Sequence, world_size: int, precision: str, teacher: str) -> None:
    for line in recipe_lines(cfg, students, world_size, precision, teacher):
        log.info(line)
    sch = cfg.schedule
    if sch.warmup_epochs and sch.warmup_epochs >= sch.epochs:
        log.warning(f"--warmup-epochs {sch.warmup_epochs} is not shorter than --epochs {sch.epochs}: the lr "
                    "never reaches --lr (lower --warmup-epochs)")
