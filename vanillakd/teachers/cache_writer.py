"""``vanillakd cache-teacher``: run the teacher once over the exact training stream a later train-kd run will
see, and store its outputs (see cache.py for the format and the top-k error).

It takes train-kd's flags, so the usual way is to copy the training command and add ``--cache-dir``. Under
torchrun each rank writes its own part, with the world size recorded. Re-running the same command continues
an interrupted cache from its first unfinished epoch.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint import remove_stale_temps, writable_folder
from ..config import CacheConfig, RunConfig
from ..data.loader import build_eval_loader, build_train_loader, set_epoch
from ..distributed import teardown
from ..engine import Progress, evaluate
from ..errors import UserError
from ..losses import get_kd_loss_entry
from ..run_setup import RunEnv, build_teacher, data_config, load_training_data, log_left_out, start_run, val_identity
from ..student import build_scheduler
from .cache import (
    FORMAT_VERSION,
    EpochWriter,
    Storage,
    describe_difference,
    disk_bytes,
    epoch_dir,
    epoch_problem,
    human_bytes,
    input_fingerprint,
    read_manifest,
    reconstruction_l1,
    save_val_predictions,
    stream_description,
    teacher_description,
    teacher_difference,
    val_problem,
    write_manifest,
)

log = logging.getLogger("vanillakd")


def _num_epochs(cfg: RunConfig, steps: int) -> int:
    """The epoch count a training run with these flags has (timm's schedule adds cooldown epochs)."""
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.students[0].lr)
    return build_scheduler(dummy, cfg.schedule, steps, cfg.loop.seed, cfg.loop.eval_metric)[1]


def _storage(cache: CacheConfig, num_classes: int, batch_size: int, steps: int) -> Storage:
    if cache.cache_topk < 0:
        raise UserError(f"--cache-topk must be >= 0 (0 = full logits), got {cache.cache_topk}")
    full = cache.cache_topk == 0 or cache.cache_topk >= num_classes
    dtype = cache.cache_dtype if cache.cache_dtype != "auto" else ("float32" if full else "float16")
    return Storage(topk=0 if full else cache.cache_topk, dtype=dtype, num_classes=num_classes,
                   batch_size=batch_size, steps=steps)


def write_cache(cfg: RunConfig) -> dict:
    """Write (or continue) the cache of ``cfg.cache``; return its manifest."""
    if cfg.cache is None:
        raise ValueError("write_cache needs a config with a cache section (--cache-dir)")
    if not cfg.uses_teacher:
        raise UserError("--kd-loss none trains without a teacher: there is nothing to cache")
    feature = [s.kd_loss for s in cfg.students if s.uses_teacher and get_kd_loss_entry(s.kd_loss).uses_features]
    if feature:
        raise UserError(f"--kd-loss {feature[0]} needs the teacher's features at every step: the cache holds its "
                        "logits only (cache for a logit method: kd, bkd, dkd, dist)")
    cfg, env = start_run(cfg)
    info = env.info
    train_split, val_split, num_classes = load_training_data(cfg)
    data_cfg = data_config(cfg, cfg.students[0].model)
    distiller = [s.kd_loss for s in cfg.students if s.uses_teacher][:1]  # logits only, whatever methods follow
    teacher, _ = build_teacher(cfg, distiller, num_classes, env.device, data_cfg, train_split.classes)
    loader = build_train_loader(train_split.dataset, data_cfg, cfg, num_classes, env.device,
                                world_size=info.world_size, rank=info.rank)
    log_left_out(train_split)
    steps = len(loader) if cfg.loop.max_train_steps is None else min(len(loader), cfg.loop.max_train_steps)
    num_epochs = _num_epochs(cfg, steps)
    storage = _storage(cfg.cache, num_classes, cfg.data.batch_size, steps)
    manifest = {
        "version": FORMAT_VERSION,
        "stream": stream_description(cfg.flags, data_cfg, train_split.identity(), len(train_split.dataset),
                                     info.world_size, steps, num_classes, train_split.streaming),
        "teacher": {**teacher_description(cfg.teacher), "precision": str(env.precision)},
        "storage": {"topk": storage.topk, "dtype": storage.dtype, "bytes_per_sample": storage.bytes_per_sample()},
        "epochs_done": [], "error": {},
    }
    root = cfg.cache.cache_dir
    epoch_bytes = disk_bytes(steps * cfg.data.batch_size * info.world_size, 1, storage)
    manifest, lock = _shared_manifest(root, manifest, info, epoch_bytes, num_epochs)
    if info.primary and not info.distributed and "val" not in manifest:
        _cache_val_predictions(root, manifest, teacher, val_split, data_cfg, cfg, env)
    todo = [e for e in range(num_epochs) if e not in manifest["epochs_done"]]
    images = steps * cfg.data.batch_size * info.world_size
    log.info(f"caching {storage.topk and f'top-{storage.topk}' or 'full'} {storage.dtype} teacher outputs of "
             f"{len(todo)} epoch(s) ({num_epochs} in all) x {steps} steps into {root}: "
             f"{human_bytes(disk_bytes(images, len(todo), storage))} to write")
    for epoch in todo:
        _cache_epoch(cfg, env, teacher, loader, epoch, steps, storage, num_classes, manifest)
    teardown(info)
    if lock is not None:
        os.close(lock)
    return manifest


def _cache_epoch(cfg: RunConfig, env: RunEnv, teacher, loader, epoch: int, steps: int, storage: Storage,
                 num_classes: int, manifest: dict) -> None:
    """One epoch of the stream through the teacher into the cache; rank 0 lists it as done when every rank's
    part is in place, with the top-k reconstruction error."""
    info, root = env.info, cfg.cache.cache_dir
    temps = sorted({1.0, float(cfg.method_args.get("temperature", 1.0))})
    t0 = time.perf_counter()
    set_epoch(loader, epoch)
    writer = EpochWriter(root, epoch, info.rank, storage)
    errors: dict[float, list[torch.Tensor]] = {t: [] for t in temps}
    bar = Progress(steps, f"cache {epoch}", cfg.loop.progress if info.primary else False)
    for step, batch in enumerate(loader):
        if step >= steps:
            break
        x, target = batch[0], batch[1]
        if cfg.speed.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with env.precision.autocast():
            logits = teacher.batch_output(x, target, epoch, step)
        stored = writer.add(step, logits, input_fingerprint(x, target))
        if not storage.full:
            for t, e in reconstruction_l1(logits, stored, num_classes, tuple(temps)).items():
                errors[t].append(e)
        bar.update()
    bar.close()
    writer.commit()
    if info.distributed:
        dist.barrier()  # every rank's part of the epoch is in place before it is listed as done
    if info.primary:
        manifest["epochs_done"] = sorted(set(manifest["epochs_done"]) | {epoch})
        if errors[1.0]:
            manifest["error"][str(epoch)] = {
                f"l1_T{t:g}": {"mean": float(torch.cat(e).mean()), "max": float(torch.cat(e).max())}
                for t, e in errors.items()}
        write_manifest(root, manifest)
    error = manifest["error"].get(str(epoch)) if info.primary and errors[1.0] else None
    log.info(f"epoch {epoch}: cached {steps} batches in {time.perf_counter() - t0:.1f}s"
             + (f"; top-{storage.topk} L1 error of the teacher's probabilities (T=1) mean "
                f"{error['l1_T1']['mean']:.2e} max {error['l1_T1']['max']:.2e}" if error else ""))


def _shared_manifest(root, manifest: dict, info, epoch_bytes: int, num_epochs: int) -> tuple[dict, int | None]:
    """The manifest to continue from, and rank 0's lock on the folder. Rank 0 alone creates or checks the
    folder (ranks doing it together would see each other's files), checks that the epochs still to write fit
    on its disk, and hands the outcome, or its refusal, to the others."""
    outcome, lock = None, None
    if info.primary:
        try:
            outcome = _continue(root, manifest, info.world_size)
            _check_space(root, epoch_bytes * sum(e not in outcome["epochs_done"] for e in range(num_epochs)))
            lock = _lock(root)
            _remove_leftovers(root)
        except UserError as e:
            outcome = e
    if info.distributed:
        shared = [outcome]
        dist.broadcast_object_list(shared, src=0)
        outcome = shared[0]
    if isinstance(outcome, UserError):
        raise UserError(str(outcome))
    return outcome, lock


def _check_space(root, needed: int) -> None:
    """Refuse, before the teacher runs, a cache the disk cannot hold (space is reserved per epoch as it is
    written, so a smaller shortfall later is still one line)."""
    try:
        st = os.statvfs(root)
    except OSError:
        return
    free = st.f_bavail * st.f_frsize
    if st.f_blocks and needed > free:
        raise UserError(f"--cache-dir {root}: the epochs still to cache take {human_bytes(needed)} but only "
                        f"{human_bytes(free)} is free there; free some space or choose another folder")


def _remove_leftovers(root) -> None:
    """What killed writers left (temp files of the manifest or val predictions, half-written epoch folders);
    only under the folder's lock, when no other writer can be using them."""
    stale = remove_stale_temps(root)
    for partial in Path(root).glob("epoch*-rank*.partial"):
        if partial.is_dir() and not partial.is_symlink():
            shutil.rmtree(partial, ignore_errors=True)
            stale.append(partial)
    if stale:
        log.info(f"removed {len(stale)} leftover(s) of an interrupted cache write in {root}")


def _lock(root) -> int:
    """An exclusive lock on the cache folder: two writers of one cache would interleave its manifest."""
    import fcntl
    fd = os.open(root, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"--cache-dir {root}: another `vanillakd cache-teacher` is writing this cache") from None
    return fd


def _cache_val_predictions(root, manifest: dict, teacher, val_split, data_cfg: dict, cfg: RunConfig,
                           env: RunEnv) -> None:
    """The teacher's top-1 class on the val set, so runs with the cache still report agreement."""
    preds: list[torch.Tensor] = []
    loader = build_eval_loader(val_split.dataset, data_cfg, cfg.data.eval_batch_size, cfg.data.workers, env.device,
                               pin_memory=bool(cfg.speed.pin_mem))
    metrics = evaluate(teacher, loader, env.precision, bool(cfg.speed.channels_last), collect_top1=preds)
    save_val_predictions(root, torch.cat(preds))
    manifest["val"] = {"files": val_identity(val_split, cfg.data.workers),
                       "images": len(val_split.dataset), "teacher_top1": metrics["top1"]}
    write_manifest(root, manifest)
    log.info(f"teacher: top1 {metrics['top1']:.2f} on the val set (its predictions are cached for agreement)")


def _continue(root, manifest: dict, world_size: int) -> dict:
    """A new cache folder, or the manifest of the same cache to continue (anything else is refused)."""
    folder = Path(root)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--cache-dir {root} is a file")
    if not (folder / "manifest.json").exists():
        if folder.exists() and any(folder.iterdir()):
            raise UserError(f"--cache-dir {root} is not empty and holds no teacher cache; choose a new folder")
        writable_folder(folder, "--cache-dir")
        write_manifest(folder, manifest)
        return manifest
    old = read_manifest(folder)
    diff = describe_difference(old["stream"], manifest["stream"])
    diff += [f"{k}: cache {old['storage'].get(k)}, run {manifest['storage'][k]}" for k in ("topk", "dtype")
             if old["storage"].get(k) != manifest["storage"][k]]
    diff += teacher_difference(old["teacher"], manifest["teacher"])
    if diff:
        raise UserError(f"--cache-dir {root} holds a cache of another stream or teacher ({'; '.join(diff)}); "
                        "choose a new folder")
    writable_folder(folder, "--cache-dir")
    done = [e for e in old.get("epochs_done", []) if _epoch_intact(folder, old, e, world_size)]
    log.info(f"continuing the cache in {root}: {len(done)} epoch(s) already done")
    old = {**old, "epochs_done": done}
    problem = val_problem(folder, old)
    if problem:
        log.info(f"{problem}: the val predictions are cached again")
        old.pop("val")
    return old


def _epoch_intact(folder: Path, manifest: dict, epoch: int, world_size: int) -> bool:
    """Whether every rank's part of a finished epoch is in place and whole (a damaged one is cached again)."""
    for rank in range(world_size):
        part = epoch_dir(folder, epoch, rank)
        problem = epoch_problem(part, manifest) if part.is_dir() else f"{part.name} is missing"
        if problem:
            log.info(f"epoch {epoch} is cached again: {problem}")
            return False
    return True
