"""The typed run configuration: what a training run (or a cache-writing run) was asked to do.

``cli/`` parses and validates the flags once into these frozen dataclasses; the core reads them and never sees
argparse. Field names follow the flags' names (``--warmup-epochs`` -> ``schedule.warmup_epochs``) so a value
is found where the flag says. ``RunConfig.flags`` keeps every flag as a plain value: it is what ``args.yaml``
and the checkpoints' ``args`` hold, so runs resume and old checkpoints stay readable.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

# --kd-loss none: the student trains on its labels alone (the "from scratch" baseline), no teacher pass
NO_KD = "none"


@dataclass(frozen=True)
class DataConfig:
    """Which data, how it is read and batched, and the input geometry flags timm's data config resolves."""
    data_dir: str
    dataset: str
    dataset_download: bool
    train_split: str
    val_split: str
    class_map: str
    input_img_mode: str | None
    train_fraction: float
    train_subset_seed: int
    epoch_repeats: float
    data_pipeline: str
    bad_images: str
    num_classes: int | None
    workers: int
    batch_size: int
    validation_batch_size: int | None
    input_size: tuple[int, int, int] | None
    img_size: int | None
    in_chans: int | None
    crop_pct: float | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    interpolation: str

    @property
    def eval_batch_size(self) -> int:
        return self.validation_batch_size or self.batch_size

    def geometry(self) -> dict[str, Any]:
        """The flags timm's ``resolve_data_config`` reads, by its names."""
        return {k: getattr(self, k) for k in ("input_size", "img_size", "crop_pct", "mean", "std", "interpolation",
                                              "in_chans")}


@dataclass(frozen=True)
class AugConfig:
    """Training augmentation and mixing (timm's flags)."""
    no_aug: bool
    scale: tuple[float, float]
    ratio: tuple[float, float]
    hflip: float
    vflip: float
    color_jitter: float
    aa: str | None
    aug_repeats: int
    reprob: float
    remode: str
    recount: int
    mixup: float
    cutmix: float
    cutmix_minmax: tuple[float, float] | None
    mixup_prob: float
    mixup_switch_prob: float
    mixup_mode: str
    mixup_off_epoch: int
    train_interpolation: str
    bce_target_thresh: float | None

    @property
    def mixup_active(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0 or self.cutmix_minmax is not None


@dataclass(frozen=True)
class ModelConfig:
    """How every student is built (the per-student choices are in ``StudentSetting``)."""
    pretrained: bool
    initial_checkpoint: str
    no_ema_checkpoint: bool
    gp: str | None
    drop_block: float | None
    bn_momentum: float | None
    bn_eps: float | None
    model_ema: bool
    model_ema_force_cpu: bool
    student_resize: int | None


@dataclass(frozen=True)
class TeacherConfig:
    name: str
    weights: str | None
    resize: int | None
    norm: str
    cache: str | None


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer flags shared by every student (``--opt``, ``--lr``, ... are per student)."""
    opt_eps: float | None
    opt_betas: tuple[float, ...] | None
    momentum: float
    clip_mode: str
    grad_accum_steps: int
    layer_decay: float | None


@dataclass(frozen=True)
class ScheduleConfig:
    """timm's learning-rate schedule flags."""
    sched: str
    sched_on_updates: bool
    lr_noise: tuple[float, ...] | None
    lr_noise_pct: float
    lr_noise_std: float
    lr_cycle_mul: float
    lr_cycle_decay: float
    lr_cycle_limit: int
    lr_k_decay: float
    warmup_lr: float
    min_lr: float
    epochs: int
    start_epoch: int | None
    decay_epochs: float
    decay_milestones: tuple[int, ...]
    warmup_epochs: int
    warmup_prefix: bool
    cooldown_epochs: int
    patience_epochs: int
    decay_rate: float


@dataclass(frozen=True)
class SpeedConfig:
    """The fast-step switches; None means auto until ``speed.resolve_speed`` decides for the device."""
    device: str | None
    amp: bool | None
    amp_dtype: str
    pin_mem: bool | None
    fused_opt: bool | None
    channels_last: bool | None
    compile: bool
    compile_mode: str | None


@dataclass(frozen=True)
class CheckpointConfig:
    resume: str
    no_resume_opt: bool
    save_safetensors: bool
    max_nonfinite: int
    recovery_interval: int
    checkpoint_hist: int
    trust_checkpoint: bool


@dataclass(frozen=True)
class LoopConfig:
    """The epoch loop: seeding, evaluation schedule, logging and where outputs go."""
    seed: int
    log_interval: int
    output: str
    experiment: str
    eval_metric: str
    eval_interval: int
    eval_interval_end: float
    progress: bool | None
    log_tensorboard: bool
    log_wandb: bool
    max_train_steps: int | None

    @property
    def higher_is_better(self) -> bool:
        return self.eval_metric != "loss"


@dataclass(frozen=True)
class DistConfig:
    local_rank: int
    dist_bn: str
    sync_bn: bool
    no_ddp_bb: bool
    dist_timeout: int


@dataclass(frozen=True)
class StudentSetting:
    """One student: the values of the list-valued flags at its position."""
    model: str
    kd_loss: str
    kd_loss_weight: float
    ori_loss_weight: float
    opt: str
    clip_grad: float | None
    lr: float
    weight_decay: float
    drop: float
    drop_path: float | None
    smoothing: float
    bce_loss: int
    ema_decays: tuple[float, ...] = ()

    @property
    def tag(self) -> str:
        return f"{self.model}-{self.kd_loss}"

    @property
    def uses_teacher(self) -> bool:
        return self.kd_loss != NO_KD and self.kd_loss_weight != 0


@dataclass(frozen=True)
class CacheConfig:
    """``cache-teacher``: where the teacher's outputs go and how they are stored."""
    cache_dir: str
    cache_topk: int
    cache_dtype: str


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig
    aug: AugConfig
    model: ModelConfig
    teacher: TeacherConfig
    optim: OptimConfig
    schedule: ScheduleConfig
    speed: SpeedConfig
    checkpoint: CheckpointConfig
    loop: LoopConfig
    dist: DistConfig
    students: tuple[StudentSetting, ...]
    # the KD methods' own flags by dest (--temperature, --dkd-alpha, ...), declared by the methods
    method_args: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    # every flag as a plain value (lists as given): args.yaml and the checkpoints' 'args'
    flags: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    cache: CacheConfig | None = None

    @property
    def models(self) -> list[str]:
        return [s.model for s in self.students]

    @property
    def uses_teacher(self) -> bool:
        return any(s.uses_teacher for s in self.students)

    def with_speed(self, speed: SpeedConfig) -> RunConfig:
        """The config with resolved speed switches; ``flags`` records them too, as the run's args.yaml did."""
        resolved = {k: getattr(speed, k) for k in ("amp", "channels_last", "pin_mem")}
        return replace(self, speed=speed, flags=MappingProxyType({**self.flags, **resolved}))

    def plain_flags(self) -> dict[str, Any]:
        return dict(self.flags)
