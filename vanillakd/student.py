"""A student being trained: model, objective, optimizer, schedule, EMA copies and its own output folder.

Several students can share one teacher pass; each owns everything that decides its own future.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3

from .checkpoint import load_file, load_state_strict, plain, rng_state, writable_folder
from .config import NO_KD, RunConfig, ScheduleConfig, StudentSetting
from .distributed import DistInfo, all_reduce_mean
from .errors import UserError
from .features import FeatureModel, Features, FeatureShapes, probe_shapes, resized
from .losses import create_kd_loss_for, get_kd_loss_entry
from .models import create_student
from .objective import KDObjective, create_base_loss
from .outputs import CheckpointWriter, Summary, add_log_file, writes_to
from .precision import Precision
from .speed import maybe_compile, optimizer_speed_kwargs

__all__ = ["NO_KD", "MicroStep", "StudentContext", "StudentRun", "StudentSetting", "build_scheduler"]


@dataclass(frozen=True)
class MicroStep:
    """Where a batch stands in a gradient accumulation (``--grad-accum-steps``): the first micro-batch clears
    the gradients, the last one steps the optimizer; ``size`` micro-batches make the update."""
    first: bool = True
    last: bool = True
    size: int = 1

    @classmethod
    def at(cls, step: int, accum: int, total: int) -> MicroStep:
        """Micro-batch ``step`` of an epoch of ``total``; the epoch's last accumulation may be shorter."""
        start = step - step % accum
        size = min(accum, total - start)
        return cls(step == start, step == start + size - 1, size)


@dataclass(frozen=True)
class StudentContext:
    """What every student of a run shares: where it runs and what the data and the teacher look like.

    ``loss_kind``: 'logits' (train-kd: logit methods only) or 'features' (train-fd / train-crd: any method);
    feature methods need ``teacher_shapes``, the training-set size ``num_data`` and the ``input_size``."""
    device: torch.device
    precision: Precision
    num_classes: int
    updates_per_epoch: int
    input_size: tuple[int, int, int] | None = None
    num_data: int = 0
    teacher_shapes: FeatureShapes | None = None
    dist: DistInfo = DistInfo()
    loss_kind: str = "logits"


def _optimizer(model: torch.nn.Module, s: StudentSetting, cfg: RunConfig,
               device: torch.device) -> torch.optim.Optimizer:
    kwargs: dict[str, Any] = dict(optimizer_speed_kwargs(s.opt, device, cfg.speed.fused_opt))
    if cfg.optim.opt_eps is not None:
        kwargs["eps"] = cfg.optim.opt_eps
    if cfg.optim.opt_betas is not None:
        kwargs["betas"] = tuple(cfg.optim.opt_betas)
    try:
        return create_optimizer_v2(model, opt=s.opt, lr=s.lr, weight_decay=s.weight_decay,
                                   momentum=cfg.optim.momentum, layer_decay=cfg.optim.layer_decay, **kwargs)
    except (AssertionError, ValueError, KeyError) as e:
        raise UserError(f"--opt {s.opt}: {e or 'unknown optimizer'}") from None


def _add_kd_param_groups(optimizer: torch.optim.Optimizer, kd_loss: torch.nn.Module, s: StudentSetting) -> None:
    """The KD parts' own parameters (embeddings, ABFs) learn with the student, under its lr and schedule and
    timm's weight-decay rule for the student's parameters: biases, norm weights and other 1-D parameters get
    none. (The seed made them submodules of the student, so timm's optimizer factory grouped them so.)"""
    skip = getattr(kd_loss, "no_weight_decay", lambda: set())()
    for group in param_groups_weight_decay(kd_loss, weight_decay=s.weight_decay, no_weight_decay_list=skip):
        if group["params"]:
            optimizer.add_param_group({**group, "lr": s.lr})


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: ScheduleConfig, updates_per_epoch: int,
                    seed: int = 42, eval_metric: str = "top1"):
    """timm's scheduler for the flags; returns (scheduler, number of epochs including cooldown)."""
    c = schedule
    return create_scheduler_v2(
        optimizer, sched=c.sched, num_epochs=c.epochs, decay_epochs=c.decay_epochs,
        decay_milestones=list(c.decay_milestones), cooldown_epochs=c.cooldown_epochs,
        patience_epochs=c.patience_epochs, decay_rate=c.decay_rate, min_lr=c.min_lr,
        warmup_lr=c.warmup_lr, warmup_epochs=c.warmup_epochs, warmup_prefix=c.warmup_prefix,
        noise=list(c.lr_noise) if c.lr_noise is not None else None, noise_pct=c.lr_noise_pct,
        noise_std=c.lr_noise_std, noise_seed=seed, cycle_mul=c.lr_cycle_mul, cycle_decay=c.lr_cycle_decay,
        cycle_limit=c.lr_cycle_limit, k_decay=c.lr_k_decay, plateau_mode="min" if eval_metric == "loss" else "max",
        step_on_epochs=not c.sched_on_updates, updates_per_epoch=updates_per_epoch)


class NonFiniteLoss(UserError):
    """The loss went NaN / inf: the run stops before anything non-finite is saved."""


def _wrap_ddp(objective: torch.nn.Module, device: torch.device, broadcast_buffers: bool, rank_local_buffers: bool):
    """DDP around the whole objective, so the student and its trainable KD parts (embeddings, ABFs) are
    synchronised together, whatever forward the method uses. Memory banks that each rank updates with
    gathered samples (CRD, ``rank_local_buffers``) are not broadcast from rank 0."""
    from torch.nn.parallel import DistributedDataParallel
    kd = objective.kd_loss
    ignore = [f"kd_loss.{name}" for name, _ in kd.named_buffers()] if rank_local_buffers else []
    if ignore:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(objective, ignore)
    return DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None,
                                   broadcast_buffers=broadcast_buffers)


class StudentRun:
    def __init__(self, index: int, s: StudentSetting, cfg: RunConfig, ctx: StudentContext, out_dir: Path):
        self.index, self.setting, self.device, self.precision = index, s, ctx.device, ctx.precision
        self.entry = None if s.kd_loss == NO_KD else get_kd_loss_entry(s.kd_loss)
        if self.entry is not None and self.entry.uses_features and ctx.loss_kind != "features":
            raise UserError(f"--kd-loss {s.kd_loss} distils features; use train-fd.py or train-crd.py")
        self.model = self._build_model(cfg, ctx)
        self.kd_loss, forward_model = self._build_kd_loss(cfg, ctx)
        self._build_objective(cfg, ctx, forward_model)
        self.optimizer = _optimizer(self.model, s, cfg, ctx.device)
        if self.kd_loss is not None:
            _add_kd_param_groups(self.optimizer, self.kd_loss, s)
        self.scheduler, self.num_epochs = build_scheduler(self.optimizer, cfg.schedule, ctx.updates_per_epoch,
                                                          cfg.loop.seed, cfg.loop.eval_metric)
        self.updates_per_epoch = ctx.updates_per_epoch
        self.loss_scaler = ctx.precision.loss_scaler()
        cpu = torch.device("cpu") if cfg.model.model_ema_force_cpu else None
        self.emas = [ModelEmaV3(self.model, decay=d, device=cpu) for d in s.ema_decays]
        self._clip_mode = cfg.optim.clip_mode
        self.meta: dict[str, Any] = {}  # data_config, class names: what export and validate need later
        self.num_updates = 0
        self._build_outputs(out_dir, cfg.loop.higher_is_better, ctx.dist)
        self._sums = torch.zeros(3, device=ctx.device)
        self._steps = 0
        # first non-finite step of the run and which terms were non-finite there, kept on the device
        self._bad = torch.full((3,), -1, dtype=torch.int64, device=ctx.device)  # step, base bad, kd bad
        self._max_nonfinite = cfg.checkpoint.max_nonfinite
        self._skipped_in_a_row = 0
        self._discard_update = False

    def _build_model(self, cfg: RunConfig, ctx: StudentContext) -> torch.nn.Module:
        s, m = self.setting, cfg.model
        # the same seed before each student: a student trained beside others starts from the weights it
        # would have had alone
        torch.manual_seed(cfg.loop.seed)
        model = create_student(
            s.model, ctx.num_classes, pretrained=m.pretrained, initial_checkpoint=m.initial_checkpoint,
            initial_ema=not m.no_ema_checkpoint, trust=cfg.checkpoint.trust_checkpoint, drop_rate=s.drop,
            drop_path_rate=s.drop_path, drop_block_rate=m.drop_block, global_pool=m.gp, bn_momentum=m.bn_momentum,
            bn_eps=m.bn_eps, in_chans=cfg.data.in_chans).to(ctx.device)
        if cfg.dist.sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if cfg.speed.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def _build_kd_loss(self, cfg: RunConfig, ctx: StudentContext):
        """The method's module (None without a teacher) and the module the objective runs: the student, or
        a feature wrapper around it for feature methods."""
        entry, forward_model = self.entry, self.model
        if entry is None:
            return None, forward_model
        if entry.uses_features:
            forward_model = FeatureModel(self.model, preact=entry.wants_preact(cfg.method_args),
                                         name=self.setting.model)
            student_shapes = probe_shapes(forward_model, resized(ctx.input_size, cfg.model.student_resize),
                                          ctx.device)
            kd_loss = create_kd_loss_for(self.setting.kd_loss, cfg.method_args, student_shapes, ctx.teacher_shapes,
                                         ctx.num_data)
        else:
            kd_loss = create_kd_loss_for(self.setting.kd_loss, cfg.method_args)
        kd_loss.to(ctx.device)
        if cfg.speed.channels_last:
            kd_loss.to(memory_format=torch.channels_last)
        return kd_loss, forward_model

    def _build_objective(self, cfg: RunConfig, ctx: StudentContext, forward_model: torch.nn.Module) -> None:
        s, mixing = self.setting, cfg.aug.mixup_active
        base_loss = create_base_loss(mixing, s.smoothing, bool(s.bce_loss), cfg.aug.bce_target_thresh)
        # the objective runs the compiled module; self.model (saved, evaluated, EMA-tracked) stays the plain one
        forward_model = maybe_compile(forward_model, cfg.speed.compile, cfg.speed.compile_mode)
        preact = self.entry is not None and self.entry.wants_preact(cfg.method_args)
        self.objective = KDObjective(forward_model, self.kd_loss, base_loss, s.ori_loss_weight, s.kd_loss_weight,
                                     smoothing=s.smoothing if mixing else 0.0, student_resize=cfg.model.student_resize,
                                     preact=preact)
        self.forward = self.objective
        if ctx.dist.distributed:
            self.forward = _wrap_ddp(self.objective, ctx.device, broadcast_buffers=not cfg.dist.no_ddp_bb,
                                     rank_local_buffers=self.entry is not None and self.entry.uses_contrast)

    def _build_outputs(self, out_dir: Path, higher: bool, info: DistInfo) -> None:
        # rank 0 alone writes; the others keep the same bookkeeping in memory
        self.out_dir = writable_folder(out_dir, "output dir") if info.primary else Path(out_dir)
        self.summary = Summary(self.out_dir / "summary.csv", write=info.primary)
        self.saver = CheckpointWriter(self.out_dir, higher, write=info.primary)
        self.ema_savers = [CheckpointWriter(self.out_dir, higher, write=info.primary) for _ in self.emas]
        self.log = logging.getLogger(f"vanillakd.student{self.index}")
        # the run's own log.txt already receives these lines when the student's folder is the run's folder
        own_file = info.primary and not writes_to(logging.getLogger("vanillakd"), self.out_dir / "log.txt")
        self._log_file = add_log_file(self.log, self.out_dir / "log.txt") if own_file else None

    def resume(self, ckpt: dict[str, Any], path: str, load_optimizer: bool = True) -> tuple[int, int]:
        """Restore everything that decides this student's future from ``ckpt``; return the (epoch, step)
        to continue from."""
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "epoch" not in ckpt:
            raise UserError(f"--resume {path} holds no training state (weights only): --initial-checkpoint {path} "
                            "starts a new run from its weights")
        arch = ckpt.get("arch")
        if arch != self.setting.model:
            raise UserError(f"--resume {path} is a checkpoint of {arch!r}, not of --model {self.setting.model}")
        load_state_strict(self.model, ckpt["state_dict"], path, "student")
        if self.kd_loss is not None and "kd_state" in ckpt:
            load_state_strict(self.kd_loss, ckpt["kd_state"], path, f"--kd-loss {self.setting.kd_loss} part")
        elif self.kd_loss is not None and self.kd_loss.state_dict():
            raise UserError(f"--resume {path} holds no state for --kd-loss {self.setting.kd_loss}")
        for i, ema in enumerate(self.emas):
            saved = ckpt.get("state_dicts_ema", {}).get(self.ema_name(i))
            if saved is None and i == 0:
                saved = ckpt.get("state_dict_ema")
            # an EMA the checkpoint lacks (e.g. --model-ema added on resume) starts from the student
            ema.module.load_state_dict(saved if saved is not None else self.model.state_dict())
        if load_optimizer:
            try:
                self.optimizer.load_state_dict(ckpt["optimizer"])
            except (ValueError, KeyError) as e:
                raise UserError(f"--resume {path}: its optimizer state does not fit this run "
                                f"({self._group_mismatch(ckpt) or e}); pass --no-resume-opt to start a fresh "
                                "optimizer") from None
            if self.loss_scaler.state_dict() and "scaler" in ckpt:
                self.loss_scaler.load_state_dict(ckpt["scaler"])
        self._load_scheduler(ckpt["scheduler"], path)
        self.num_updates = int(ckpt.get("num_updates", 0))
        best = ckpt.get("best") or self._best_on_disk()
        self.saver.best, self.saver.best_epoch = best.get("metric"), best.get("epoch")
        for w, (metric, epoch) in zip(self.ema_savers, best.get("ema", [])):
            w.best, w.best_epoch = metric, epoch
        epoch, step = int(ckpt["epoch"]), ckpt.get("step")
        if step is not None:  # mid-epoch: continue the epoch's running sums and its batches
            sums = ckpt.get("train_sums", {})
            self._sums.copy_(sums.get("sums", torch.zeros(3)))
            self._steps = int(sums.get("steps", 0))
            self.summary.load(keep=lambda row: int(row["epoch"]) < epoch)
            if not load_optimizer:  # a fresh optimizer holds the initial lr, not this epoch's
                self._move_schedule(epoch)
            return epoch, int(step)
        # the checkpoint was written before the epoch-end schedule step: take that step now
        self.end_epoch(epoch, ckpt.get("metric"))
        if not load_optimizer:
            self._move_schedule(epoch + 1)
        self.summary.load(keep=lambda row: int(row["epoch"]) <= epoch)
        return epoch + 1, 0

    def _group_mismatch(self, ckpt: dict[str, Any]) -> str:
        """Why a saved optimizer state does not load, when it is the number of parameter groups (checkpoints
        from before the KD parts' 1-D parameters were exempt from weight decay had one KD group)."""
        groups = (ckpt.get("optimizer") or {}).get("param_groups")
        ours = len(self.optimizer.param_groups)
        return f"it has {len(groups)} parameter groups, this run {ours}" if groups and len(groups) != ours else ""

    def _load_scheduler(self, state: dict[str, Any], path: str) -> None:
        """The saved schedule, unless it was saved for another number of parameter groups: timm's schedulers
        keep per-group lists and would silently leave the extra groups unscheduled, so keep the one built
        from this run's flags."""
        if len(state.get("base_values", self.scheduler.base_values)) == len(self.optimizer.param_groups):
            self.scheduler.load_state_dict(state)
        else:
            self.log.warning(f"--resume {path}: its lr schedule was saved for "
                             f"{len(state['base_values'])} parameter groups, this run has "
                             f"{len(self.optimizer.param_groups)}; using the schedule from this run's flags")

    def start_at(self, epoch: int) -> None:
        """``--start-epoch N`` without ``--resume``: start the schedule and the update count (per-update
        schedules, EMA warm-up) where epoch N starts, as timm's train.py does."""
        self.num_updates = epoch * self.updates_per_epoch
        self._move_schedule(epoch)

    def _move_schedule(self, epoch: int) -> None:
        # one of the two applies: per-epoch schedules ignore step_update, per-update ones ignore step
        self.scheduler.step(epoch)
        self.scheduler.step_update(num_updates=self.num_updates)

    def close(self) -> None:
        if self._log_file is not None:
            self.log.removeHandler(self._log_file)
            self._log_file.close()

    def ema_name(self, i: int) -> str:
        return "ema" if len(self.emas) == 1 else f"ema{self.setting.ema_decays[i]:g}"

    def train(self, keep_sums: bool = False) -> None:
        """Training mode; the epoch's running loss sums restart unless a resumed epoch continues them."""
        self.objective.train()
        if not keep_sums:
            self._sums.zero_()
            self._steps = 0

    def train_step(self, x: torch.Tensor, target: torch.Tensor, teacher_out: torch.Tensor | Features | None,
                   extras: dict | None = None, epoch: int | None = None, micro: MicroStep | None = None) -> None:
        """Forward and backward of one (micro-)batch; on the last micro-batch of an accumulation the optimizer,
        schedule and EMA updates. No host synchronisation."""
        micro = micro or MicroStep()
        if micro.first:
            self.optimizer.zero_grad(set_to_none=True)
            self._discard_update = False
        # DDP averages gradients over ranks on the last micro-batch's backward only
        no_sync = getattr(self.forward, "no_sync", None)
        with no_sync() if no_sync is not None and not micro.last else contextlib.nullcontext():
            with self.precision.autocast():
                out = self.forward(x, target, teacher_out, extras, epoch)
            loss = out["loss"]
            terms = torch.stack([out["base_loss"].float(), out["kd_loss"].float()])
            if self._max_nonfinite > 0 and self._skip_nonfinite(loss, terms):
                self._discard_update = True  # the whole accumulated update is skipped
            else:
                self._record_nonfinite(loss, terms)
                scaled = loss / micro.size if micro.size > 1 else loss  # the mean over the update's samples
                # timm's loss scaler: backward, and on the update's last micro-batch unscale, clip and step
                update = micro.last and not self._discard_update
                self.loss_scaler(scaled, self.optimizer, clip_grad=self.setting.clip_grad, clip_mode=self._clip_mode,
                                 parameters=self._trained_params(), need_update=update)
                # running sums stay on the device; read only at log intervals
                self._sums += torch.stack([loss.detach().float(), out["base_loss"].float(), out["kd_loss"].float()])
                self._steps += 1
                if update:
                    self._after_update()

    def _after_update(self) -> None:
        """The schedule and EMA count optimizer updates."""
        self.num_updates += 1
        self.scheduler.step_update(num_updates=self.num_updates)
        for ema in self.emas:
            ema.update(self.model, step=self.num_updates)

    def _record_nonfinite(self, loss: torch.Tensor, terms: torch.Tensor) -> None:
        """Remember the first non-finite step on the device (read by ``check_finite`` at log points)."""
        bad_terms = (~torch.isfinite(terms)).long()
        first = (self._bad[0] < 0) & ~torch.isfinite(loss)
        here = torch.cat([torch.full((1,), self.num_updates, dtype=torch.int64, device=self._bad.device), bad_terms])
        self._bad.copy_(torch.where(first, here, self._bad))

    def _skip_nonfinite(self, loss: torch.Tensor, terms: torch.Tensor) -> bool:
        """``--max-nonfinite N``: one host read per step; skip a non-finite step, stop after N in a row."""
        if bool(torch.isfinite(loss)):
            self._skipped_in_a_row = 0
            return False
        self._skipped_in_a_row += 1
        self.optimizer.zero_grad(set_to_none=True)
        if self._skipped_in_a_row > self._max_nonfinite:
            self._record_nonfinite(loss, terms)
            self.check_finite()
        self.log.warning(f"skipped step {self.num_updates}: non-finite loss ({self._skipped_in_a_row} in a row)")
        return True

    def check_finite(self) -> None:
        """Stop with the step and the loss term that went non-finite, if any did (one host read)."""
        step, base_bad, kd_bad = self._bad.tolist()
        if step < 0:
            return
        terms = [name for name, bad in (("base", base_bad), (f"kd ({self.setting.kd_loss})", kd_bad)) if bad]
        raise NonFiniteLoss(f"non-finite loss at update {step} of {self.setting.tag}: the "
                            f"{' and '.join(terms) or 'total'} term{'s' if len(terms) > 1 else ''} went NaN/inf; "
                            f"stopped without saving it (last good checkpoint: {self.out_dir / 'last.pth.tar'})")

    def _trained_params(self) -> list[torch.nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def train_metrics(self) -> dict[str, float]:
        """Mean losses since ``train()``, averaged over ranks (one host sync); stops a non-finite run."""
        self.check_finite()
        loss, base, kd = all_reduce_mean(self._sums / max(self._steps, 1)).tolist()
        return {"loss": loss, "base_loss": base, "kd_loss": kd}

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def end_epoch(self, epoch: int, metric: float | None) -> None:
        self.scheduler.step(epoch + 1, metric)

    def _best_on_disk(self) -> dict[str, Any]:
        """The best of a checkpoint that does not record it (timm's, the seed's, older files): the metric and
        epoch the run's ``model_best.pth.tar`` holds, so a worse epoch never replaces it."""
        path = self.out_dir / "model_best.pth.tar"
        if not path.is_file():
            return {}
        try:
            saved = load_file(path)
        except UserError as e:
            self.log.warning(f"the run's best so far is unknown ({e}): the next evaluated epoch replaces {path}")
            return {}
        metric = saved.get("metric") if isinstance(saved, dict) else None
        return {"metric": float(metric), "epoch": saved.get("epoch")} if isinstance(metric, (int, float)) else {}

    def checkpoint(self, epoch: int, flags: Mapping[str, Any], metric: float | None,
                   weights: dict[str, torch.Tensor] | None = None, step: int | None = None) -> dict[str, Any]:
        """Everything needed to validate or continue this student; tensors and plain containers only.

        ``step``: batches done in ``epoch`` for a mid-epoch recovery checkpoint (None: the epoch is complete)."""
        state = {
            "version": 1, "arch": self.setting.model, "epoch": epoch, "step": step, "num_updates": self.num_updates,
            "train_sums": {"sums": self._sums.detach().cpu(), "steps": self._steps},
            "state_dict": weights if weights is not None else self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": plain(self.scheduler.state_dict()),
            "args": plain(dict(flags)), "setting": plain(asdict(self.setting)), "metric": metric,
            "best": {"metric": self.saver.best, "epoch": self.saver.best_epoch,
                     "ema": [[w.best, w.best_epoch] for w in self.ema_savers]},
            "rng": rng_state(), **self.meta,
        }
        if self.loss_scaler.state_dict():  # float16's loss scale (full precision and bfloat16 have none)
            state["scaler"] = self.loss_scaler.state_dict()
        if self.kd_loss is not None and self.kd_loss.state_dict():
            # trainable KD parts and memories, apart from the student so 'state_dict' stays a plain timm checkpoint
            state["kd_state"] = self.kd_loss.state_dict()
        if self.emas:
            state["state_dict_ema"] = self.emas[0].module.state_dict()
            state["state_dicts_ema"] = {self.ema_name(i): e.module.state_dict() for i, e in enumerate(self.emas)}
        return state
