"""A distillation run: set-up -> students -> fit -> export.

train-kd.py, train-fd.py and train-crd.py parse their flags into a ``RunConfig`` and call ``run``; nothing
here knows which KD method runs.
"""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .banner import log_recipe
from .checkpoint import load_file, plain, set_rng_state, training_flags
from .config import RunConfig, StudentSetting
from .data.folder import SplitDataset
from .data.loader import build_eval_loader, build_train_loader, start_workers, workers_ignore_stop_signals
from .distributed import DistInfo, replicas_in_sync, teardown
from .engine import FitPlan, evaluate, evaluated_with, fit, hms
from .errors import UserError
from .export import export_checkpoint
from .external_log import ExternalLoggers
from .losses import get_kd_loss_entry
from .outputs import add_log_file, write_args
from .resume_check import check_resume, run_record
from .run_folder import CHECKPOINT_GLOBS, LOCK_NAME, RunLock, open_run_folder
from .run_setup import RunEnv, build_teacher, data_config, load_training_data, log_left_out, start_run, val_identity
from .stop import RunStopped, StopSignals, StopVote
from .student import StudentContext, StudentRun
from .teachers.cache import file_digest, open_cache, stream_description, teacher_description
from .teachers.live import FrozenTeacher

log = logging.getLogger("vanillakd")


def run(cfg: RunConfig, loss_kind: str = "logits") -> list[dict]:
    """Train every student the config describes; return their best / final metrics.

    ``loss_kind``: 'logits' (train-kd: logit methods only) or 'features' (train-fd / train-crd: any method)."""
    if cfg.teacher.cache and loss_kind != "logits" and cfg.uses_teacher:
        raise UserError("--teacher-cache holds the teacher's logits; feature methods (train-fd.py, train-crd.py) "
                        "need its features at every step, so they run the teacher live")
    started = time.perf_counter()
    cfg, env = start_run(cfg)
    logger = logging.getLogger("vanillakd")
    train_split, val_split, num_classes = load_training_data(cfg)
    cfg, run_dir, lock, new_folder = _shared_run_dir(cfg, env.info)
    root_log = add_log_file(logger, run_dir / "log.txt") if env.info.primary else None
    students: list[StudentRun] = []
    finished = trained = False
    signals = StopSignals()
    try:
        plan = _prepare(cfg, env, train_split, val_split, num_classes, run_dir, loss_kind, students)
        # from here on SIGTERM / SIGINT stop the run where it can continue (Ctrl-C while it sets up aborts it)
        plan.stop = StopVote(signals.install(), env.info.distributed)
        trained = True  # from here on the log holds training: it is kept whatever happens
        _fit_or_stop(plan)
        if plan.external is not None:
            plan.external.close()
        results = [_finish(st, cfg, env.info, time.perf_counter() - started) for st in students]
        teardown(env.info)
        finished = True
        return results
    finally:
        signals.restore()
        for st in students:
            st.close()
        if root_log is not None:
            logger.removeHandler(root_log)
            root_log.close()
        logger.setLevel(logging.INFO)
        if not finished and not trained and new_folder:
            _remove_if_nothing_saved(run_dir, lock)
        if lock is not None:
            lock.release()


def _fit_or_stop(plan: FitPlan) -> None:
    """``fit``; a stop on SIGTERM / SIGINT is logged (it says how to continue) and ends the run."""
    try:
        fit(plan)
    except RunStopped as e:
        if plan.info.primary:  # every rank stopped after the same step; one says so
            log.warning(str(e))
        if plan.external is not None:
            plan.external.close()
        teardown(plan.info)
        raise
    finally:
        plan.stop.close()


def _remove_if_nothing_saved(run_dir: Path, lock: RunLock | None) -> None:
    """A run that failed while setting up (before its first step) leaves no folder holding only its log and
    args files; only a folder this run created, and anything else in it keeps it."""
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    if all(p.name in ("log.txt", "args.yaml", LOCK_NAME) for p in files):
        if lock is not None:
            lock.release()
        shutil.rmtree(run_dir, ignore_errors=True)


def _shared_run_dir(cfg: RunConfig, info: DistInfo) -> tuple[RunConfig, Path, RunLock | None, bool]:
    """The run folder, chosen, made and locked by rank 0 (its name may hold a timestamp) and told to the other
    ranks; the config with ``--resume auto`` dropped when there is nothing to resume yet; the lock (rank 0);
    and whether this run created the folder (rank 0)."""
    lock, created, resumable, path = None, False, bool(cfg.checkpoint.resume), None
    if info.primary:
        path, lock, created, resumable = open_run_folder(cfg)
    shared = [str(path) if path is not None else None, resumable]
    if info.distributed:
        dist.broadcast_object_list(shared, src=0)
    if cfg.checkpoint.resume and not shared[1]:
        cfg = replace(cfg, checkpoint=replace(cfg.checkpoint, resume=""))
    return cfg, Path(shared[0]), lock, created


def _contrast_k(cfg: RunConfig) -> int | None:
    """How many contrast indices per sample the loader must draw (CRD), or None."""
    if any(s.uses_teacher and get_kd_loss_entry(s.kd_loss).uses_contrast for s in cfg.students):
        return int(cfg.method_args["nce_k"])
    return None


def _prepare(cfg: RunConfig, env: RunEnv, train_split: SplitDataset, val_split: SplitDataset, num_classes: int,
             run_dir: Path, loss_kind: str, students: list[StudentRun]) -> FitPlan:
    """Teacher, loaders and students (appended to ``students`` as they are built, so that a failure closes
    those already made); the point to start from; the args files."""
    info, device = env.info, env.device
    log.info(f"data: {len(train_split.dataset)} train / {len(val_split.dataset)} val images, {num_classes} classes;"
             f" device {device}, {env.precision}")
    # input size, crop and normalisation follow the first student's timm config unless flags override
    data_cfg = data_config(cfg, cfg.students[0].model)
    cached = bool(cfg.teacher.cache) and cfg.uses_teacher
    distillers = [] if cached else [s.kd_loss for s in cfg.students if s.uses_teacher]
    teacher, teacher_shapes = build_teacher(cfg, distillers, num_classes, device, data_cfg, train_split.classes)
    train_loader, eval_loader, steps = _loaders(cfg, env, train_split, val_split, num_classes, data_cfg)
    record = run_record(train_split.classes, train_split.identity(), info.world_size, _teacher_digest(cfg))
    ctx = StudentContext(device, env.precision, num_classes, -(-steps // cfg.optim.grad_accum_steps),
                         tuple(data_cfg["input_size"]), len(train_split.dataset), teacher_shapes, info, loss_kind)
    for i, s in enumerate(cfg.students):
        out_dir = run_dir if len(cfg.students) == 1 else run_dir / f"student{i}-{s.tag}"
        students.append(StudentRun(i, s, cfg, ctx, out_dir))
        students[-1].meta = {"data_config": plain(data_cfg), **record}
    _say_ema_not_evaluated(students, device)
    if cached:
        teacher = _open_teacher_cache(cfg, env, data_cfg, train_split, record["data_digest"], steps, num_classes,
                                      students[0].num_epochs)
    start_epoch, start_step = _start_point(cfg, students, train_split.streaming)
    _write_args_files(cfg, students, run_dir, len(train_split.dataset), info)
    log.info(f"training {len(students)} student(s) for {students[0].num_epochs} epochs of {steps} steps, batch "
             f"{cfg.data.batch_size}" + (f" x {info.world_size} processes" if info.distributed else "") +
             f", input {tuple(data_cfg['input_size'])}; teacher {cfg.teacher.name if teacher is not None else 'none'}"
             f"; outputs in {run_dir}")
    if info.primary:
        log_recipe(cfg, students, info.world_size, str(env.precision), cfg.teacher.name)
    return FitPlan(cfg, info, env.precision, students, teacher, train_loader, eval_loader, start_epoch, start_step,
                   teacher_val=_teacher_val(cfg, env, teacher, eval_loader, val_split, cached),
                   external=ExternalLoggers(cfg, run_dir, enabled=info.primary))


def _teacher_digest(cfg: RunConfig) -> str | None:
    """The ``--teacher-pretrained`` file's digest, which resume compares (the file may move, not change)."""
    weights = cfg.teacher.weights
    return file_digest(weights) if cfg.uses_teacher and weights and Path(weights).is_file() else None


def _loaders(cfg: RunConfig, env: RunEnv, train_split: SplitDataset, val_split: SplitDataset, num_classes: int,
             data_cfg: dict) -> tuple[Any, Any, int]:
    """The replayable training stream, the fixed-order eval loader, and the steps of an epoch."""
    info, contrast_k = env.info, _contrast_k(cfg)
    labels = train_split.labels("CRD's contrast sampling") if contrast_k else None
    train_loader = build_train_loader(train_split.dataset, data_cfg, cfg, num_classes, env.device,
                                      world_size=info.world_size, rank=info.rank, contrast_k=contrast_k,
                                      labels=labels)
    log_left_out(train_split)
    eval_loader = build_eval_loader(val_split.dataset, data_cfg, cfg.data.eval_batch_size, cfg.data.workers,
                                    env.device, distributed=info.distributed, pin_memory=bool(cfg.speed.pin_mem))
    for loader in (train_loader, eval_loader):
        workers_ignore_stop_signals(loader)
    start_workers(eval_loader)
    steps = len(train_loader)
    if cfg.loop.max_train_steps is not None:
        steps = min(steps, cfg.loop.max_train_steps)
    return train_loader, eval_loader, steps


def _say_ema_not_evaluated(students: list[StudentRun], device: torch.device) -> None:
    if any(not evaluated_with(e.module, st.model) for st in students for e in st.emas):
        log.info(f"--model-ema-force-cpu: the EMA is kept on the CPU and, as in timm, not evaluated on {device} (no "
                 "EMA metrics, no model_best_ema); its weights are in every checkpoint: `vanillakd validate DATA "
                 "--model ARCH --checkpoint RUN/last.pth.tar --use-ema` evaluates them")


def _open_teacher_cache(cfg: RunConfig, env: RunEnv, data_cfg: dict, train_split: SplitDataset, train_files: str,
                        steps: int, num_classes: int, num_epochs: int):
    """The teacher cache for this run's stream (``train_files``: the training split's identity, computed once)."""
    info = env.info
    stream = stream_description(cfg.flags, data_cfg, train_files, len(train_split.dataset),
                                info.world_size, steps, num_classes, train_split.streaming)
    teacher = open_cache(cfg.teacher.cache, stream, teacher_description(cfg.teacher), num_epochs, info.rank,
                         env.device, explicit_weights=bool(cfg.teacher.weights))
    log.info(f"teacher outputs from the cache {cfg.teacher.cache} ({teacher.describe()}); the teacher does not run")
    cached_precision = teacher.manifest.get("teacher", {}).get("precision")
    if cached_precision and cached_precision != str(env.precision):
        log.info(f"note: the cache's teacher ran in {cached_precision}, this run's students in {env.precision}")
    return teacher


def _teacher_val(cfg: RunConfig, env: RunEnv, teacher, eval_loader, val_split: SplitDataset, cached: bool):
    """The teacher's top-1 per val batch, computed (or read from its cache) at the first evaluation only:
    the teacher is frozen and the val set's order fixed."""
    memo: dict[str, list[torch.Tensor] | None] = {}

    def predictions() -> list[torch.Tensor] | None:
        if "preds" not in memo:
            memo["preds"] = None
            if cached and not env.info.distributed:
                memo["preds"] = teacher.val_predictions(val_identity(val_split, cfg.data.workers),
                                                        cfg.data.eval_batch_size)
            elif isinstance(teacher, FrozenTeacher):
                memo["preds"] = []
                t = evaluate(teacher, eval_loader, env.precision, bool(cfg.speed.channels_last),
                             collect_top1=memo["preds"])
                log.info(f"teacher: top1 {t['top1']:.2f} top5 {t['top5']:.2f} on the val set")
        return memo["preds"]
    return predictions


def _write_args_files(cfg: RunConfig, students: list[StudentRun], run_dir: Path, train_images: int,
                      info: DistInfo) -> None:
    if not info.primary:
        return
    for st in students:
        write_args(st.out_dir, {**student_flags(cfg, st.setting), "train_images": train_images})
    if len(students) > 1:
        write_args(run_dir, dict(cfg.flags))  # the run's folder keeps the whole command line


def student_flags(cfg: RunConfig, s: StudentSetting) -> dict[str, Any]:
    """The run's flags with the list-valued ones holding this student's values alone (one-item lists, as
    argparse gives them), so each student's args.yaml describes that student."""
    own = {f.name: [getattr(s, f.name)] for f in fields(s) if f.name != "ema_decays" and f.name in cfg.flags}
    if s.ema_decays:
        own["model_ema_decay"] = list(s.ema_decays)
    return {**cfg.flags, **own}


def _start_point(cfg: RunConfig, students: list[StudentRun], streaming: bool) -> tuple[int, int]:
    """``--resume``'s (epoch, step), or ``--start-epoch``'s with the schedule moved there, or the start."""
    if cfg.checkpoint.resume:
        return _resume(cfg, students, streaming)
    start_epoch = cfg.schedule.start_epoch or 0
    if start_epoch > 0:
        for st in students:  # as timm's train.py: the schedule starts where epoch N does, not at its warm-up
            st.start_at(start_epoch)
    return start_epoch, 0


def _finish(st: StudentRun, cfg: RunConfig, info: DistInfo, seconds: float) -> dict:
    """The replicas' agreement, the optional export, the student's result line and record."""
    if info.distributed:
        synced = replicas_in_sync(st.model)
        (st.log.info if synced else st.log.warning)(
            f"replicas {'in sync' if synced else 'DIFFER'}: student weights compared on {info.world_size} ranks")
    best = st.saver.best
    if cfg.checkpoint.save_safetensors and info.primary:
        best_file = st.out_dir / "model_best.pth.tar"
        source = best_file if best_file.is_file() else st.out_dir / "last.pth.tar"
        st.log.info(f"exported {source.name} to {export_checkpoint(source, st.out_dir / 'export')}")
    best_file = st.out_dir / "model_best.pth.tar"
    st.log.info(f"done in {hms(seconds)}: best {cfg.loop.eval_metric} "
                f"{best if best is None else round(best, 3)} at epoch {st.saver.best_epoch}"
                + (f", {best_file}" if best is not None else "") + f"; outputs in {st.out_dir}")
    return {"tag": st.setting.tag, "out_dir": str(st.out_dir), "best_metric": best,
            "best_epoch": st.saver.best_epoch, "last": st.summary.rows[-1] if st.summary.rows else {}}


def _checkpoint_candidates(folder: Path) -> list[Path]:
    return [p for pattern in CHECKPOINT_GLOBS for p in folder.glob(pattern) if p.is_file()]


def _position(ckpt: dict) -> tuple[int, float]:
    """Where a checkpoint stands: (epoch, batches done), a finished epoch counting as all of it."""
    step = ckpt.get("step")
    return int(ckpt.get("epoch", -1)), float("inf") if step is None else float(step)


def _newest_valid(folder: Path, trust: bool) -> tuple[Path, dict]:
    """The newest checkpoint in ``folder`` that loads; damaged ones are skipped with a warning."""
    best = None
    for path in _checkpoint_candidates(folder):
        try:
            ckpt = load_file(path, trust=trust)
        except UserError as e:
            log.warning(f"--resume auto: skipping {path}: {e}")
            continue
        if not isinstance(ckpt, dict) or "epoch" not in ckpt:
            log.warning(f"--resume auto: skipping {path}: not a training checkpoint")
            continue
        if best is None or _position(ckpt) > _position(best[1]):
            best = (path, ckpt)
    if best is None:
        raise UserError(f"--resume: no valid checkpoint in {folder} to continue from")
    return best


def _check_resume_stream(ckpt: dict, workers: int, path) -> None:
    """Shards: the epoch's order depends on the worker count, so a mid-epoch resume must keep it."""
    saved = training_flags(ckpt).get("workers")
    if ckpt.get("step") is not None and saved is not None and saved != workers:
        raise UserError(f"--resume {path}: stopped mid-epoch with --workers {saved}; over wds/ shards the "
                        f"epoch's order depends on it, so continue with --workers {saved} (not {workers})")


def _resume(cfg: RunConfig, students: list[StudentRun], streaming: bool = False) -> tuple[int, int]:
    """Load each student's checkpoint (``--resume``); return the (epoch, step) to continue from."""
    c = cfg.checkpoint
    path = Path(c.resume) if c.resume != "auto" else None
    if path is not None and path.is_file() and len(students) > 1:
        raise UserError("with several students, --resume takes the run folder (or 'auto'), not one file")
    positions, rng = [], None
    for st in students:
        if path is not None and path.is_file():
            ckpt_path, ckpt = path, load_file(path, trust=c.trust_checkpoint)
        else:
            ckpt_path, ckpt = _newest_valid(st.out_dir, c.trust_checkpoint)
        check_resume(ckpt, str(ckpt_path), cfg.flags, st.meta, say_allowed=st is students[0])
        if streaming:
            _check_resume_stream(ckpt, cfg.data.workers, ckpt_path)
        positions.append(st.resume(ckpt, str(ckpt_path), load_optimizer=not c.no_resume_opt))
        rng = rng or ckpt.get("rng")
        log.info(f"resuming {st.setting.tag} from {ckpt_path}")
    if len(set(positions)) > 1:
        raise UserError(f"--resume: the students' checkpoints stand at different points ({sorted(set(positions))})")
    if rng is not None:
        set_rng_state(rng)
    epoch, step = positions[0]
    log.info(f"continuing at epoch {epoch}" + (f", step {step}" if step else ""))
    if epoch >= students[0].num_epochs:
        log.warning(f"--resume: the run has already trained {epoch} epochs and this one has "
                    f"{students[0].num_epochs}: nothing is left to train (a later --epochs continues it)")
    return epoch, step
