"""Wiring of a distillation run: data, teacher, students, the epoch loop and its outputs.

train-kd.py, train-fd.py and train-crd.py parse their flags and call ``run``; nothing here knows which
KD method runs.
"""
from __future__ import annotations

import argparse
import logging
import time
from datetime import datetime
from pathlib import Path

import timm
import torch
import torch.distributed as dist
from timm.data import resolve_data_config
from timm.utils import distribute_bn

from .checkpoint import atomic_save, load_file, plain, set_rng_state
from .data.folder import SplitDataset, drop_bad_images, take_fraction
from .data.sources import build_train_val_any, dataset_kind, image_mode
from .data.loader import build_eval_loader, build_train_loader, set_epoch
from .data.stream import seed_all
from .distributed import DistInfo, check_sync_bn, init_distributed, replicas_in_sync, teardown
from .engine import evaluate, evaluated_with, should_evaluate, train_one_epoch
from .errors import UserError
from .export import export_checkpoint
from .external_log import ExternalLoggers
from .features import FeatureModel, probe_shapes, resized
from .losses import get_kd_loss_entry
from .models import FrozenTeacher, check_model_name, check_teacher_name, create_teacher
from .outputs import add_log_file, make_output_dir, setup_console_logging, unique_dir, write_args
from .precision import Precision, resolve_device
from .speed import resolve_speed_flags
from .student import NO_KD, StudentRun, student_settings
from .teacher_cache import open_cache, stream_description, teacher_description

log = logging.getLogger("vanillakd")


def _check_args(args: argparse.Namespace, settings: list) -> None:
    dataset_kind(args.dataset)
    if getattr(args, "grad_accum_steps", 1) < 1:
        raise UserError(f"--grad-accum-steps must be >= 1, got {args.grad_accum_steps}")
    if args.workers < 0:
        raise UserError(f"--workers must be >= 0, got {args.workers}")
    for name in args.model:
        check_model_name(name, "model")
    for name in args.kd_loss:
        if name != NO_KD:
            get_kd_loss_entry(name)
    if any(s.uses_teacher for s in settings):
        check_teacher_name(args.teacher)
    if getattr(args, "review_preact", False) and "review" not in args.kd_loss:
        raise UserError("--review-preact applies to --kd-loss review only")
    total = args.epochs + getattr(args, "cooldown_epochs", 0)
    start = getattr(args, "start_epoch", None)
    if not getattr(args, "resume", None) and start and start >= total:
        raise UserError(f"--start-epoch {start} leaves nothing to train: the run has {total} epochs")


def _data_config(args: argparse.Namespace, model_name: str) -> dict:
    pretrained_cfg = timm.models.get_pretrained_cfg(model_name)
    flags = {k: getattr(args, k) for k in ("input_size", "img_size", "crop_pct", "mean", "std", "interpolation",
                                           "in_chans")}
    return resolve_data_config(flags, pretrained_cfg=pretrained_cfg.to_dict() if pretrained_cfg else None)


def _run_dir(args: argparse.Namespace) -> Path:
    root = Path(args.output or "./output/train")
    if args.resume == "auto":
        if not args.experiment:
            raise UserError("--resume auto needs --experiment NAME to find the run to continue")
        return root / args.experiment
    if args.resume:
        resume = Path(args.resume)
        if not resume.exists():
            raise UserError(f"--resume {resume} does not exist")
        return resume if resume.is_dir() else resume.parent
    if args.experiment:
        return root / args.experiment
    name = "-".join([datetime.now().strftime("%Y%m%d-%H%M%S"), args.model[0], "kd"])
    return unique_dir(root, name)


def run_argv(argv: list[str], loss_kind: str = "logits") -> list[dict]:
    """``run`` from a train-kd command line (the demo and the comparison harness drive runs this way)."""
    from .cli.train_args import build_train_parser, parse_train_args
    return run(parse_train_args(build_train_parser("train-kd.py", ""), argv), loss_kind)


def run(args: argparse.Namespace, loss_kind: str = "logits") -> list[dict]:
    """Train every student the flags describe; return their best / final metrics."""
    logger = setup_console_logging()
    settings = student_settings(args)
    _check_args(args, settings)
    want_cuda = args.device.startswith("cuda") if args.device else None
    info = init_distributed(args.local_rank, want_cuda, args.dist_timeout)
    device = resolve_device(args.device, info.local_rank)
    check_sync_bn(args.sync_bn, device)
    if not info.primary:
        logger.setLevel(logging.WARNING)  # rank 0 alone prints progress
    precision = setup_speed(args, device)
    seed_all(args.seed + info.rank)
    if args.teacher_cache and loss_kind != "logits" and any(s.uses_teacher for s in settings):
        raise UserError("--teacher-cache holds the teacher's logits; feature methods (train-fd.py, train-crd.py) "
                        "need its features at every step, so they run the teacher live")
    train_split, val_split, num_classes = load_training_data(args)
    run_dir = _shared_run_dir(args, info)
    root_log = add_log_file(logger, run_dir / "log.txt") if info.primary else None
    students: list[StudentRun] = []
    try:
        results = _run(args, settings, device, precision, train_split, val_split, num_classes, run_dir, loss_kind,
                       students, info)
        teardown(info)
        return results
    finally:
        for st in students:
            st.close()
        if root_log is not None:
            logger.removeHandler(root_log)
            root_log.close()
        logger.setLevel(logging.INFO)


def setup_speed(args: argparse.Namespace, device: torch.device) -> Precision:
    """Resolve the auto speed flags for ``device`` and return the run's precision."""
    turned_on = resolve_speed_flags(args, device, list(args.model))
    if turned_on:
        log.info(f"on by default for {device.type}: {', '.join(turned_on)} (each has a --no-... flag)")
    return Precision.create(device, args.amp, args.amp_dtype)


def load_training_data(args: argparse.Namespace):
    """(train split, val split, number of classes), bad images handled and the train fraction taken."""
    train_split, val_split, num_classes = build_train_val_any(
        args.data_dir, args.dataset, args.train_split, args.val_split, args.class_map, args.num_classes,
        download=getattr(args, "dataset_download", False), input_img_mode=image_mode(getattr(args, "input_img_mode", None), args.in_chans, args.input_size))
    for split in (train_split, val_split):
        drop_bad_images(split, args.bad_images, args.workers, log.info)
    take_fraction(train_split, args.train_fraction, args.train_subset_seed)
    return train_split, val_split, num_classes


def log_left_out(train_split: SplitDataset) -> None:
    """Streamed shards: say how many samples each epoch leaves out (the lanes take whole batches only)."""
    if train_split.streaming and train_split.dataset.left_out():
        ds = train_split.dataset
        log.info(f"shards: {ds.left_out()} of {ds.epoch_samples()} training samples are left out of each epoch "
                 f"(each of {ds.world_size} process(es) x {ds.lanes} worker lane(s) takes whole batches of a "
                 "contiguous range); which ones changes every epoch")


def val_identity(val_split: SplitDataset, args: argparse.Namespace) -> str:
    """The val split and, for shards, the worker count that fixes the eval loader's order."""
    return val_split.identity() + (f":workers={args.workers}" if val_split.streaming else "")


def _shared_run_dir(args: argparse.Namespace, info: DistInfo) -> Path:
    """The run folder, chosen by rank 0 (its name may hold a timestamp) and made by rank 0 alone."""
    run_dir = [str(make_output_dir(_run_dir(args)))] if info.primary else [None]
    if info.distributed:
        dist.broadcast_object_list(run_dir, src=0)
    return Path(run_dir[0])


def _build_teacher(args, settings, num_classes: int, device: torch.device, data_config: dict):
    """The frozen teacher (None when no student distils), with feature extraction when a student's method
    needs features, and then the teacher's feature shapes."""
    users = [s for s in settings if s.uses_teacher]
    if not users:
        return None, None
    entries = [get_kd_loss_entry(s.kd_loss) for s in users]
    teacher = create_teacher(args.teacher, num_classes, args.teacher_pretrained, args.teacher_resize,
                             trust=args.trust_checkpoint, log=log.info, in_chans=int(data_config["input_size"][0]),
                             student_config=data_config if args.teacher_norm == "auto" else None)
    shapes = None
    if any(e.needs == "features" for e in entries):
        preact = any(e.wants_preact(args) for e in entries)
        teacher.model = FeatureModel(teacher.model, preact=preact, name=args.teacher)
        teacher.eval()  # the new wrapper starts in training mode; the teacher never is
        input_size = tuple(data_config["input_size"])
        size = resized(input_size, teacher.resize)
        shapes = probe_shapes(teacher.model.to(device), size, device)
    teacher.to(device)
    if args.channels_last:
        teacher.to(memory_format=torch.channels_last)
    if args.compile:
        teacher.compile_forward(args.compile_mode)
    return teacher, shapes


def _contrast_k(args, settings) -> int | None:
    """How many contrast indices per sample the loader must draw (CRD), or None."""
    if any(s.uses_teacher and getattr(get_kd_loss_entry(s.kd_loss).cls, "needs_contrast", False) for s in settings):
        return args.nce_k
    return None


def _evaluate_and_save(st: StudentRun, epoch: int, args, row: dict, eval_loader, precision, do_eval: bool,
                       teacher_preds=None):
    """Evaluate the student (and its EMA copies), write last / best checkpoints, the summary row; step the
    schedule."""
    metric = None
    if do_eval:
        em = evaluate(st.model, eval_loader, precision, args.channels_last, teacher_preds=teacher_preds)
        row.update(eval_loss=em["loss"], eval_top1=em["top1"], eval_top5=em["top5"])
        if "agreement" in em:
            row["eval_agreement"] = em["agreement"]
        metric = em[args.eval_metric]
        st.log.info(f"Eval {epoch}: top1 {em['top1']:.2f} top5 {em['top5']:.2f} loss {em['loss']:.4f}")
        for i, ema in enumerate(st.emas):
            if not evaluated_with(ema.module, st.model):
                continue  # --model-ema-force-cpu on an accelerator: said once when the run starts
            name = st.ema_name(i)
            emm = evaluate(ema.module, eval_loader, precision, args.channels_last)
            row.update({f"{name}_top1": emm["top1"], f"{name}_top5": emm["top5"], f"{name}_loss": emm["loss"]})
            st.log.info(f"Eval {epoch} {name}: top1 {emm['top1']:.2f} top5 {emm['top5']:.2f}")
            # the EMA's best file holds its weights as the plain student 'state_dict'
            st.ema_savers[i].save_best(
                lambda: st.checkpoint(epoch, args, emm[args.eval_metric], weights=ema.module.state_dict()),
                epoch, emm[args.eval_metric], f"model_best_{name}")
    state = st.checkpoint(epoch, args, metric)
    st.saver.save_last(state, epoch, args.checkpoint_hist)
    st.saver.save_best(lambda: state, epoch, metric, "model_best")
    st.summary.add(row)
    st.end_epoch(epoch, metric)


def _checkpoint_candidates(folder: Path) -> list[Path]:
    return [p for p in [folder / "last.pth.tar", folder / "recovery.pth.tar",
                        *folder.glob("checkpoint-*.pth.tar")] if p.is_file()]


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


def _check_resume_stream(ckpt: dict, args: argparse.Namespace, path) -> None:
    """Shards: the epoch's order depends on the worker count, so a mid-epoch resume must keep it."""
    saved = (ckpt.get("args") or {}).get("workers")
    if ckpt.get("step") is not None and saved is not None and saved != args.workers:
        raise UserError(f"--resume {path}: stopped mid-epoch with --workers {saved}; over wds/ shards the "
                        f"epoch's order depends on it, so continue with --workers {saved} (not {args.workers})")


def _resume(args: argparse.Namespace, students: list[StudentRun], streaming: bool = False) -> tuple[int, int]:
    """Load each student's checkpoint (``--resume``); return the (epoch, step) to continue from."""
    path = Path(args.resume) if args.resume != "auto" else None
    if path is not None and path.is_file() and len(students) > 1:
        raise UserError("with several students, --resume takes the run folder (or 'auto'), not one file")
    positions, rng = [], None
    for st in students:
        if path is not None and path.is_file():
            ckpt_path, ckpt = path, load_file(path, trust=args.trust_checkpoint)
        else:
            ckpt_path, ckpt = _newest_valid(st.out_dir, args.trust_checkpoint)
        if streaming:
            _check_resume_stream(ckpt, args, ckpt_path)
        positions.append(st.resume(ckpt, str(ckpt_path), load_optimizer=not args.no_resume_opt))
        rng = rng or ckpt.get("rng")
        log.info(f"resuming {st.setting.tag} from {ckpt_path}")
    if len(set(positions)) > 1:
        raise UserError(f"--resume: the students' checkpoints stand at different points ({sorted(set(positions))})")
    if rng is not None:
        set_rng_state(rng)
    epoch, step = positions[0]
    log.info(f"continuing at epoch {epoch}" + (f", step {step}" if step else ""))
    return epoch, step


def _run(args, settings, device, precision, train_split, val_split, num_classes, run_dir, loss_kind, students,
         info: DistInfo = DistInfo()):
    log.info(f"data: {len(train_split.dataset)} train / {len(val_split.dataset)} val images, {num_classes} classes;"
             f" device {device}, {precision}")
    # input size, crop and normalisation follow the first student's timm config unless flags override
    data_config = _data_config(args, settings[0].model)
    input_size = tuple(data_config["input_size"])
    cached = bool(args.teacher_cache) and any(s.uses_teacher for s in settings)
    teacher, teacher_shapes = (None, None) if cached else _build_teacher(args, settings, num_classes, device,
                                                                          data_config)
    contrast_k = _contrast_k(args, settings)
    train_loader = build_train_loader(train_split.dataset, data_config, args, num_classes, device,
                                      world_size=info.world_size, rank=info.rank, contrast_k=contrast_k,
                                      labels=train_split.labels("CRD's contrast sampling") if contrast_k else None)
    log_left_out(train_split)
    eval_loader = build_eval_loader(val_split.dataset, data_config, args.validation_batch_size or args.batch_size,
                                    args.workers, device, distributed=info.distributed, pin_memory=args.pin_mem)
    steps = len(train_loader) if args.max_train_steps is None else min(len(train_loader), args.max_train_steps)
    accum = args.grad_accum_steps
    updates = -(-steps // accum)  # a last, shorter accumulation takes the epoch's remaining micro-batches

    for i, s in enumerate(settings):
        out_dir = run_dir if len(settings) == 1 else run_dir / f"student{i}-{s.tag}"
        students.append(StudentRun(i, s, args, num_classes, device, precision, updates, out_dir, loss_kind,
                                   teacher_shapes=teacher_shapes, num_data=len(train_split.dataset),
                                   input_size=input_size, dist_info=info))
    for st in students:
        st.meta = {"data_config": plain(data_config), "classes": list(train_split.classes)}
    if any(not evaluated_with(e.module, st.model) for st in students for e in st.emas):
        log.info(f"--model-ema-force-cpu: the EMA is kept on the CPU and, as in timm, not evaluated on {device} (no "
                 "EMA metrics, no model_best_ema); its weights are in every checkpoint: `vanillakd validate DATA "
                 "--model ARCH --checkpoint RUN/last.pth.tar --use-ema` evaluates them")
    if cached:
        stream = stream_description(args, data_config, train_split.identity(), len(train_split.dataset),
                                    info.world_size, steps, num_classes, train_split.streaming)
        teacher = open_cache(args.teacher_cache, stream, teacher_description(args), students[0].num_epochs,
                             info.rank, device, explicit_weights=bool(args.teacher_pretrained))
        log.info(f"teacher outputs from the cache {args.teacher_cache} ({teacher.describe()}); the teacher does "
                 "not run")
        cached_precision = teacher.manifest.get("teacher", {}).get("precision")
        if cached_precision and cached_precision != str(precision):
            log.info(f"note: the cache's teacher ran in {cached_precision}, this run's students in {precision}")
    start_epoch, start_step = _resume(args, students, train_split.streaming) if args.resume else \
        (args.start_epoch or 0, 0)
    if not args.resume and start_epoch > 0:
        for st in students:  # as timm's train.py: the schedule starts where epoch N does, not at its warm-up
            st.start_at(start_epoch)
    if info.primary:
        for st in students:
            write_args(st.out_dir, {**vars(args), "train_images": len(train_split.dataset)})
        if len(students) > 1:
            write_args(run_dir, vars(args))
    num_epochs = students[0].num_epochs
    log.info(f"training {len(students)} student(s) for {num_epochs} epochs of {steps} steps, batch "
             f"{args.batch_size}" + (f" x {info.world_size} processes" if info.distributed else "") +
             f", input {input_size}; "
             f"teacher {args.teacher if teacher is not None else 'none'}; outputs in {run_dir}")

    teacher_preds = None
    external = ExternalLoggers(args, run_dir, enabled=info.primary)
    for epoch in range(start_epoch, num_epochs):
        first = start_step if epoch == start_epoch else 0
        set_epoch(train_loader, epoch, first)
        t0 = time.perf_counter()

        def save_recovery(done: int, total: int, epoch: int = epoch) -> None:
            # only between optimizer updates: gradients of a half-done accumulation are not saved
            if args.recovery_interval and done % args.recovery_interval == 0 and done % accum == 0 \
                    and done < total and info.primary:
                for st in students:
                    st.check_finite()  # never save non-finite weights
                    atomic_save(st.checkpoint(epoch, args, None, step=done), st.out_dir / "recovery.pth.tar")

        train_metrics = train_one_epoch(epoch, train_loader, teacher, students, precision, args.channels_last,
                                        args.log_interval, args.max_train_steps,
                                        args.progress if info.primary else False, start_step=first,
                                        after_step=save_recovery, accum_steps=accum)
        train_time = time.perf_counter() - t0
        if info.distributed and args.dist_bn:
            for st in students:  # ranks saw different batches: make their BN statistics agree
                distribute_bn(st.model, info.world_size, reduce=args.dist_bn == "reduce")
        do_eval = should_evaluate(epoch, num_epochs, args.eval_interval, args.eval_interval_end)
        if do_eval and cached and teacher_preds is None and not info.distributed:
            teacher_preds = teacher.val_predictions(val_identity(val_split, args),
                                                    args.validation_batch_size or args.batch_size)
        if do_eval and isinstance(teacher, FrozenTeacher) and teacher_preds is None:
            # the teacher is frozen: its predictions on the (fixed-order) val set are computed once
            teacher_preds = []
            t = evaluate(teacher, eval_loader, precision, args.channels_last, collect_top1=teacher_preds)
            log.info(f"teacher: top1 {t['top1']:.2f} top5 {t['top5']:.2f} on the val set")
        for st, tm in zip(students, train_metrics):
            row = {"epoch": epoch, "lr": st.lr(), "train_loss": tm["loss"], "train_base_loss": tm["base_loss"],
                   "train_kd_loss": tm["kd_loss"], "eval_loss": "", "eval_top1": "", "eval_top5": "",
                   "train_time": round(train_time, 2)}
            _evaluate_and_save(st, epoch, args, row, eval_loader, precision, do_eval, teacher_preds)
            external.log(st.setting.tag if len(students) > 1 else "", row, epoch)
    external.close()
    results = []
    for st in students:
        if info.distributed:
            synced = replicas_in_sync(st.model)
            (st.log.info if synced else st.log.warning)(
                f"replicas {'in sync' if synced else 'DIFFER'}: student weights compared on {info.world_size} ranks")
        best = st.saver.best
        if args.save_safetensors and info.primary:
            best_file = st.out_dir / "model_best.pth.tar"
            source = best_file if best_file.is_file() else st.out_dir / "last.pth.tar"
            st.log.info(f"exported {source.name} to {export_checkpoint(source, st.out_dir / 'export')}")
        st.log.info(f"done: best {args.eval_metric} {best if best is None else round(best, 3)} "
                    f"(epoch {st.saver.best_epoch}); outputs in {st.out_dir}")
        results.append({"tag": st.setting.tag, "out_dir": str(st.out_dir), "best_metric": best,
                        "best_epoch": st.saver.best_epoch, "last": st.summary.rows[-1] if st.summary.rows else {}})
    return results
