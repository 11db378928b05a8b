"""The epoch loops: method-agnostic, one teacher pass per batch shared by every student, and no host
synchronisation per step (running sums stay on the device until a log line needs them)."""
from __future__ import annotations

import logging
import sys
import time
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from .distributed import all_reduce_sum
from .features import Features
from .precision import Precision
from .student import MicroStep

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

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _eta(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


def train_one_epoch(epoch: int, loader: Iterable, teacher: nn.Module | None, students: Sequence,
                    precision: Precision, channels_last: bool = False, log_interval: int = 50,
                    max_steps: int | None = None, progress: bool | None = None, start_step: int = 0,
                    after_step: Callable[[int, int], None] | None = None,
                    accum_steps: int = 1) -> list[dict[str, float]]:
    """One pass over ``loader`` (which yields the epoch's batches from ``start_step`` on, for a resumed
    epoch); ``after_step(done, total)`` runs after each step. With ``accum_steps`` N, each N batches (one
    teacher pass each) make one optimizer update. Returns each student's mean losses."""
    for s in students:
        s.train(keep_sums=start_step > 0)
    total = start_step + len(loader)
    if max_steps is not None:
        total = min(total, max_steps)
    bar = Progress(total, f"train {epoch}", progress)
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
            eta = _eta(elapsed / (done - start_step) * (total - done))
            if teacher is not None:
                teacher.check()  # a teacher cache verifies here that it served this stream's batches
            for s in students:
                m = s.train_metrics()
                s.log.info(f"Train {epoch} [{done:>4d}/{total}] loss {m['loss']:.4f} (base {m['base_loss']:.4f} "
                           f"kd {m['kd_loss']:.4f}) lr {s.lr():.3e} {rate:.1f} img/s ETA {eta}"
                           + (f" [{s.setting.tag}]" if len(students) > 1 else ""))
        if after_step is not None:
            after_step(done, total)
    bar.close()
    return [s.train_metrics() for s in students]


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
