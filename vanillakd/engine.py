"""The epoch loops: method-agnostic, one teacher pass per batch shared by every student, and no host
synchronisation per step (running sums stay on the device until a log line needs them)."""
from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from timm.utils import distribute_bn
from torch import nn

from .checkpoint import atomic_save
from .config import RunConfig
from .data.loader import set_epoch
from .distributed import DistInfo, all_reduce_sum
from .features import Features
from .precision import Precision
from .stop import RunStopped, StopVote, signal_name
from .student import MicroStep
from .teachers.base import Teacher

log = logging.getLogger("vanillakd")


class Progress:
    """A tqdm bar with ETA when wanted, else nothing; log lines carry the ETA either way."""

    def __init__(self, total: int, desc: str, enabled: bool | None):
        if enabled is None:
            enabled = sys.stderr.isatty()
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def show(self, **values: Any) -> None:
        """Values beside the bar (the loss, img/s), refreshed at log points only: reading them syncs."""
        if self.bar is not None:
            self.bar.set_postfix(values, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def tag(student, students: Sequence) -> str:
    """`` [model-method]`` at the end of a student's lines when several students train together (with its
    index when two students share model and method, e.g. differing in --lr only)."""
    if len(students) <= 1:
        return ""
    shared = sum(s.setting.tag == student.setting.tag for s in students) > 1
    return f" [{student.setting.tag}" + (f" #{student.index}]" if shared else "]")


def hms(seconds: float) -> str:
    """``h:mm:ss``, for ETAs and run times."""
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


def train_one_epoch(epoch: int, loader: Iterable, teacher: Teacher | None, students: Sequence,
                    precision: Precision, channels_last: bool = False, log_interval: int = 50,
                    max_steps: int | None = None, progress: bool | None = None, start_step: int = 0,
                    after_step: Callable[[int, int], None] | None = None,
                    accum_steps: int = 1, epochs_after: int = 0) -> list[dict[str, float]]:
    """One pass over ``loader`` (which yields the epoch's batches from ``start_step`` on, for a resumed
    epoch); ``after_step(done, total)`` runs after each step. With ``accum_steps`` N, each N batches (one
    teacher pass each) make one optimizer update. ``epochs_after``: epochs the run has after this one, for
    the run's ETA. Returns each student's mean losses."""
    for s in students:
        s.train(keep_sums=start_step > 0)
    total = start_step + len(loader)
    if max_steps is not None:
        total = min(total, max_steps)
    bar = Progress(total, f"train {epoch}", progress)
    try:
        _train_steps(epoch, loader, teacher, students, precision, channels_last, log_interval, total, bar,
                     start_step, after_step, accum_steps, epochs_after)
    finally:
        bar.close()  # also when a step raises (a stop, a non-finite loss): no bar left on the screen
    return [s.train_metrics() for s in students]


def _train_steps(epoch: int, loader: Iterable, teacher: Teacher | None, students: Sequence, precision: Precision,
                 channels_last: bool, log_interval: int, total: int, bar: Progress, start_step: int,
                 after_step: Callable[[int, int], None] | None, accum_steps: int, epochs_after: int) -> None:
    bar.update(start_step)
    start = time.perf_counter()
    batch_size = None
    for step, batch in enumerate(loader, start=start_step):
        if step >= total:
            break
        x, target = batch[0], batch[1]
        extras = batch[2] if len(batch) > 2 else None  # per-sample extras, e.g. CRD's indices
        batch_size = x.shape[0]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        teacher_out = None
        if teacher is not None:
            with precision.autocast():
                teacher_out = teacher.batch_output(x, target, epoch, step)
        micro = MicroStep.at(step, accum_steps, total)
        for s in students:
            s.train_step(x, target, teacher_out, extras, epoch, micro)
        bar.update()
        done = step + 1
        if done % log_interval == 0 or done == total:
            elapsed = time.perf_counter() - start
            rate = (done - start_step) * batch_size / max(elapsed, 1e-9)
            per_step = elapsed / (done - start_step)
            eta = f"ETA {hms(per_step * (total - done))}" + (
                f", run {hms(per_step * (total - done + epochs_after * total))} (training only)" if epochs_after
                else "")
            if teacher is not None:
                teacher.check()  # a teacher cache verifies here that it served this stream's batches
            for s in students:
                m = s.train_metrics()
                s.log.info(f"Train {epoch} [{done:>4d}/{total}] loss {m['loss']:.4f} (base {m['base_loss']:.4f} "
                           f"kd {m['kd_loss']:.4f}) lr {s.lr():.3e} {rate:.1f} img/s {eta}" + tag(s, students))
            bar.show(loss=f"{m['loss']:.4f}", img_s=f"{rate:.1f}")
        if after_step is not None:
            after_step(done, total)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, precision: Precision, channels_last: bool = False,
             teacher: nn.Module | None = None, progress: bool | None = False,
             max_steps: int | None = None, teacher_preds: list[torch.Tensor] | None = None,
             collect_top1: list | None = None) -> dict[str, float]:
    """Top-1 / top-5 / cross-entropy loss, and top-1 agreement with the teacher when ``teacher`` (run here)
    or ``teacher_preds`` (the teacher's ``collect_top1`` from an earlier pass over the same loader) is given.
    ``collect_top1``: a list that receives the model's top-1 class of each batch."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums = torch.zeros(5, device=device, dtype=torch.float64)  # loss, top1, top5, agreement, count
    total = len(loader) if max_steps is None else min(len(loader), max_steps)
    bar = Progress(total, "eval", progress)
    for step, (x, target) in enumerate(loader):
        if step >= total:
            break
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with precision.autocast():
            logits = model(x)
            t_logits = teacher(x) if teacher is not None else None
        if isinstance(logits, Features):
            logits = logits.logits
        if isinstance(t_logits, Features):
            t_logits = t_logits.logits
        t_top1 = t_logits.float().argmax(1) if t_logits is not None else (
            teacher_preds[step] if teacher_preds is not None else None)
        logits = logits.float()
        loss = nn.functional.cross_entropy(logits, target, reduction="sum")
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct = top5.eq(target[:, None])
        if collect_top1 is not None:
            collect_top1.append(top5[:, 0])
        agree = (t_top1 == top5[:, 0]).sum() if t_top1 is not None else 0
        sums += torch.stack([loss.double(), correct[:, 0].sum().double(), correct.any(1).sum().double(),
                             torch.as_tensor(agree, device=device).double(),
                             torch.tensor(float(x.shape[0]), device=device, dtype=torch.float64)])
        bar.update()
    bar.close()
    model.train(was_training)
    loss, top1, top5, agreement, n = all_reduce_sum(sums).tolist()
    n = max(n, 1.0)
    out = {"loss": loss / n, "top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n}
    if teacher is not None or teacher_preds is not None:
        out["agreement"] = 100.0 * agreement / n
    return out


def should_evaluate(epoch: int, num_epochs: int, interval: int, interval_end: float) -> bool:
    """The seed's schedule (every ``interval`` epochs, then every epoch past ``interval_end`` of the run),
    plus always the last epoch so a run always ends with its final accuracy."""
    return epoch % interval == 0 or epoch > interval_end * num_epochs or epoch == num_epochs - 1


def evaluated_with(ema: nn.Module, model: nn.Module) -> bool:
    """Whether an EMA copy is evaluated with its student: only on the student's device, where the eval batches
    are. A copy kept elsewhere (``--model-ema-force-cpu`` on an accelerator) is not, as in timm ("Disables EMA
    validation"): moving each batch back to the CPU would make a real validation set cost more than the epoch."""
    return next(ema.parameters()).device == next(model.parameters()).device


@dataclass
class FitPlan:
    """What the epoch loop runs: the students (built), the teacher or its cache, both loaders, where to start,
    and how to get the teacher's val predictions once (``teacher_val``: None when there is no teacher)."""
    cfg: RunConfig
    info: DistInfo
    precision: Precision
    students: Sequence
    teacher: Teacher | None
    train_loader: Any
    eval_loader: Any
    start_epoch: int = 0
    start_step: int = 0
    teacher_val: Callable[[], list[torch.Tensor] | None] = lambda: None
    external: Any = None
    stop: StopVote | None = None


def fit(plan: FitPlan) -> None:
    """The epoch loop: train, average BN statistics over ranks, evaluate, save, step the schedules."""
    cfg, info, students = plan.cfg, plan.info, plan.students
    num_epochs = students[0].num_epochs
    for epoch in range(plan.start_epoch, num_epochs):
        first = plan.start_step if epoch == plan.start_epoch else 0
        set_epoch(plan.train_loader, epoch, first)
        t0 = time.perf_counter()
        train_metrics = train_one_epoch(
            epoch, plan.train_loader, plan.teacher, students, plan.precision, bool(cfg.speed.channels_last),
            cfg.loop.log_interval, cfg.loop.max_train_steps, cfg.loop.progress if info.primary else False,
            start_step=first, after_step=_after_step(plan, epoch), accum_steps=cfg.optim.grad_accum_steps,
            epochs_after=num_epochs - epoch - 1)
        train_time = time.perf_counter() - t0
        if info.distributed and cfg.dist.dist_bn:
            for st in students:  # ranks saw different batches: make their BN statistics agree
                distribute_bn(st.model, info.world_size, reduce=cfg.dist.dist_bn == "reduce")
        do_eval = should_evaluate(epoch, num_epochs, cfg.loop.eval_interval, cfg.loop.eval_interval_end)
        teacher_preds = plan.teacher_val() if do_eval else None
        for st, tm in zip(students, train_metrics):
            row = {"epoch": epoch, "lr": st.lr(), "train_loss": tm["loss"], "train_base_loss": tm["base_loss"],
                   "train_kd_loss": tm["kd_loss"], "eval_loss": "", "eval_top1": "", "eval_top5": "",
                   "train_time": round(train_time, 2)}
            _evaluate_and_save(st, epoch, cfg, row, plan, do_eval, teacher_preds)
            if plan.external is not None:
                plan.external.log(st.setting.tag if len(students) > 1 else "", row, epoch)
        signum = plan.stop.poll() if plan.stop is not None else None
        if signum is not None and epoch + 1 < num_epochs:
            raise RunStopped(_stopped_line(plan, signum, f"epoch {epoch}", None), signum)


def _after_step(plan: FitPlan, epoch: int) -> Callable[[int, int], None]:
    """After each step: ``--recovery-interval N``'s mid-epoch checkpoint every N steps, and the stop on
    SIGTERM / SIGINT (agreed by every rank), both only between optimizer updates: the gradients of a
    half-done accumulation are not saved."""
    cfg = plan.cfg
    interval, accum = cfg.checkpoint.recovery_interval, cfg.optim.grad_accum_steps

    def after(done: int, total: int) -> None:
        signum = plan.stop.poll() if plan.stop is not None else None
        if done % accum or done >= total:
            return  # mid-accumulation, or the epoch's end (saved, and a stop there taken, by fit)
        if signum is not None:
            recovery = _save_recovery(plan, epoch, done)
            raise RunStopped(_stopped_line(plan, signum, f"epoch {epoch}, step {done}/{total}", recovery), signum)
        if interval and done % interval == 0:
            _save_recovery(plan, epoch, done)
    return after


def _save_recovery(plan: FitPlan, epoch: int, done: int) -> Path | None:
    """``recovery.pth.tar`` of every student at ``done`` batches into ``epoch`` (rank 0 writes)."""
    if not plan.info.primary:
        return None
    for st in plan.students:
        st.check_finite()  # never save non-finite weights
        atomic_save(st.checkpoint(epoch, plan.cfg.flags, None, step=done), st.out_dir / "recovery.pth.tar")
    return plan.students[0].out_dir / "recovery.pth.tar"


def _stopped_line(plan: FitPlan, signum: int, where: str, saved: Path | None) -> str:
    """One line: where the run stopped, what it saved, and the command that continues it."""
    c, loop = plan.cfg.checkpoint, plan.cfg.loop
    run_dir = plan.students[0].out_dir if len(plan.students) == 1 else plan.students[0].out_dir.parent
    if c.resume == "auto":
        how = "run the same command again"
    elif loop.experiment:
        how = "run the same command with --resume auto"
    else:
        how = f"run the same command with --resume {run_dir}"
    if saved is None:
        what = f"checkpoints in {run_dir}"
    else:
        what = f"saved {saved}" if len(plan.students) == 1 else f"saved each student's {saved.name} in {run_dir}"
    return f"stopped by {signal_name(signum)} after {where} ({what}); to continue, {how}"


def _evaluate_and_save(st, epoch: int, cfg: RunConfig, row: dict, plan: FitPlan, do_eval: bool,
                       teacher_preds: list[torch.Tensor] | None) -> None:
    """Evaluate the student (and its EMA copies), write last / best checkpoints, the summary row; step the
    schedule."""
    metric, key, channels_last = None, cfg.loop.eval_metric, bool(cfg.speed.channels_last)
    if do_eval:
        em = evaluate(st.model, plan.eval_loader, plan.precision, channels_last, teacher_preds=teacher_preds)
        row.update(eval_loss=em["loss"], eval_top1=em["top1"], eval_top5=em["top5"])
        if "agreement" in em:
            row["eval_agreement"] = em["agreement"]
        metric = em[key]
        st.log.info(f"Eval {epoch}: top1 {em['top1']:.2f} top5 {em['top5']:.2f} loss {em['loss']:.4f}"
                    + tag(st, plan.students))
        for i, ema in enumerate(st.emas):
            if not evaluated_with(ema.module, st.model):
                continue  # --model-ema-force-cpu on an accelerator: said once when the run starts
            name = st.ema_name(i)
            emm = evaluate(ema.module, plan.eval_loader, plan.precision, channels_last)
            row.update({f"{name}_top1": emm["top1"], f"{name}_top5": emm["top5"], f"{name}_loss": emm["loss"]})
            st.log.info(f"Eval {epoch} {name}: top1 {emm['top1']:.2f} top5 {emm['top5']:.2f}" + tag(st, plan.students))
            # the EMA's best file holds its weights as the plain student 'state_dict'
            st.ema_savers[i].save_best(
                lambda emm=emm, ema=ema: st.checkpoint(epoch, cfg.flags, emm[key], weights=ema.module.state_dict()),
                epoch, emm[key], f"model_best_{name}")
    # the best first, so that every checkpoint of this epoch records the best including this epoch
    st.saver.save_best(lambda: st.checkpoint(epoch, cfg.flags, metric), epoch, metric, "model_best")
    st.saver.save_last(st.checkpoint(epoch, cfg.flags, metric), epoch, cfg.checkpoint.checkpoint_hist)
    st.summary.add(row)
    st.end_epoch(epoch, metric)
