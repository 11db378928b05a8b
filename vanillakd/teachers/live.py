"""The live teacher: a frozen timm model run on every batch, with its input adapted to its own normalisation
and resolution (``teachers.cache`` answers the same calls from disk)."""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

import timm
import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import load_file
from ..errors import UserError
from ..models import _create, check_model_name
from ..resume_check import class_change
from ..weights import load_weights


class FrozenTeacher(nn.Module):
    """The teacher: frozen, always in eval mode, run without autograd, optionally on a resized batch.

    ``model`` may be a ``features.FeatureModel``, for feature methods: the forward then returns ``Features``.
    """

    def __init__(self, model: nn.Module, resize: int | None = None,
                 renorm: tuple[tuple, tuple, tuple, tuple] | None = None):
        """``renorm``: (student mean, student std, teacher mean, teacher std): the batch arrives normalised for
        the student and is re-normalised so the teacher sees its own normalisation of the raw image."""
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.resize = resize
        self.renorm = None
        if renorm is not None:
            mean_s, std_s, mean_t, std_t = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in renorm)
            # x_t = (x_s * std_s + mean_s - mean_t) / std_t, as one multiply-add
            self.register_buffer("_scale", std_s / std_t, persistent=False)
            self.register_buffer("_shift", (mean_s - mean_t) / std_t, persistent=False)
            self.renorm = renorm

    def train(self, mode: bool = True) -> FrozenTeacher:
        # whatever the caller asks (e.g. a parent module's .train()), BN / dropout stay in inference mode
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # inference mode skips autograd and version-counter bookkeeping; its tensors may not be saved for a
        # backward pass, so the outputs (logits or Features) are cloned into ordinary tensors for the losses
        with torch.inference_mode():
            if self.renorm is not None:
                x = torch.addcmul(self._shift.to(x.dtype), x, self._scale.to(x.dtype))
            if self.resize is not None and x.shape[-1] != self.resize:
                x = resize_batch(x, self.resize)
            out = self.run(x)
        return _clone_tensors(out)

    def batch_output(self, x: torch.Tensor, target: torch.Tensor, epoch: int, step: int) -> torch.Tensor:
        """The teacher's output for batch ``step`` of ``epoch`` (a cache answers the same call from disk)."""
        return self(x)

    def check(self) -> None:
        """Nothing to verify for a live teacher (a cache checks its batches here)."""

    def compile_forward(self, mode: str | None = None) -> None:
        """Compile the forward only: the saved / loaded ``model`` keeps its plain state-dict keys (the compiled
        wrapper shares its parameters and is kept out of the module tree)."""
        object.__setattr__(self, "_compiled", torch.compile(self.model, mode=mode))

    def run(self, x: torch.Tensor):
        # not `compiled or self.model`: torch.compile's wrapper forwards len() to the module, which a ResNet lacks
        compiled = self.__dict__.get("_compiled")
        return (self.model if compiled is None else compiled)(x)


def _clone_tensors(out):
    if isinstance(out, torch.Tensor):
        return out.clone()
    if dataclasses.is_dataclass(out):
        return type(out)(**{f.name: _clone_tensors(getattr(out, f.name)) for f in dataclasses.fields(out)})
    if isinstance(out, (list, tuple)):
        return type(out)(_clone_tensors(v) for v in out)
    return out


def resize_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of a normalised NCHW batch to ``size`` x ``size`` (``--teacher-resize``)."""
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def check_teacher_name(name: str) -> None:
    """A timm name, or a timm ``hf-hub:`` / ``local-dir:`` source."""
    if not name.startswith(("hf-hub:", "local-dir:")):
        check_model_name(name.split(".")[0] if not timm.is_model(name) else name, "teacher")


def teacher_input_adapter(model: nn.Module, student_config: dict, resize: int | None,
                          log=None) -> tuple[int | None, tuple | None]:
    """(resize, renorm) so that the teacher gets its own normalisation and, when its input size is fixed and
    differs from the student's (and ``--teacher-resize`` is not given), its own resolution."""
    from timm.data import resolve_data_config

    from ..data.prefetch import channel_stats
    cfg = resolve_data_config({}, model=model)
    # the teacher's stats for the batch's channels (an RGB teacher on greyscale input: timm's average)
    channels = int(student_config["input_size"][0])
    cfg["mean"], cfg["std"] = channel_stats(tuple(cfg["mean"]), channels), channel_stats(tuple(cfg["std"]), channels)
    renorm = None
    if tuple(cfg["mean"]) != tuple(student_config["mean"]) or tuple(cfg["std"]) != tuple(student_config["std"]):
        renorm = (tuple(student_config["mean"]), tuple(student_config["std"]), tuple(cfg["mean"]), tuple(cfg["std"]))
        if log:
            log(f"teacher normalisation mean {tuple(cfg['mean'])} std {tuple(cfg['std'])} differs from the "
                f"student's: the batch is re-normalised for the teacher")
    fixed = getattr(model, "pretrained_cfg", {}).get("fixed_input_size", False)
    size = cfg["input_size"][-1]
    if resize is None and fixed and size != student_config["input_size"][-1]:
        resize = size
        if log:
            log(f"teacher takes a fixed {size}px input: the batch is resized for it (set --teacher-resize to choose)")
    return resize, renorm


def create_teacher(name: str, num_classes: int, weights: str | None, resize: int | None = None,
                   trust: bool = False, student_config: dict | None = None, log=None,
                   in_chans: int = 3, classes: Sequence[str] | None = None) -> FrozenTeacher:
    """The teacher from a weights file, or from timm's pretrained weights / hub tag when no file is given.

    ``in_chans``: the channels of the batch it shares with the students (an RGB teacher's first conv is
    adapted to greyscale input, as timm's loaders do). ``classes``: the data's, compared with those a weights
    file records (a teacher trained with this project records them)."""
    check_teacher_name(name)
    if weights:
        if not os.path.exists(weights):
            raise UserError(f"teacher checkpoint {weights} does not exist")
        if classes is not None:
            check_file_classes(weights, classes)
        model = _create(name, False, num_classes=num_classes, in_chans=in_chans)
        load_weights(model, weights, what="teacher", use_ema=True, trust=trust)
    else:
        model = _pretrained_teacher(name, num_classes, in_chans)
    renorm = None
    if student_config is not None:
        resize, renorm = teacher_input_adapter(model, student_config, resize, log)
    return FrozenTeacher(model, resize, renorm)


def check_file_classes(path: str | os.PathLike, classes: Sequence[str]) -> None:
    """A teacher file that records its class list must have been trained on the data's classes, in the same
    order: a renamed or reordered class would silently permute what the teacher teaches."""
    try:  # memory-mapped: only the small entries are read
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - torch's legacy format cannot be mapped: read it whole
        try:
            ckpt = load_file(path)
        except UserError:
            return  # a file that cannot be read is reported by load_weights, with its reason
    saved = ckpt.get("classes") if isinstance(ckpt, Mapping) else None
    if isinstance(saved, list) and saved and all(isinstance(c, str) for c in saved):
        change = class_change(saved, classes)
        if change:
            raise UserError(f"teacher checkpoint {path} was trained on other classes than the data's: {change}")


def _pretrained_teacher(name: str, num_classes: int, in_chans: int = 3) -> nn.Module:
    """timm's pretrained weights (a name, ``name.tag``, or an ``hf-hub:`` / ``local-dir:`` source)."""
    if not name.startswith(("hf-hub:", "local-dir:")):
        cfg = timm.models.get_pretrained_cfg(name.split(".")[0] if "." in name else name)
        hub_classes = getattr(cfg, "num_classes", None)
        if hub_classes is not None and hub_classes != num_classes:
            raise UserError(f"timm's pretrained {name} has {hub_classes} classes but the data has {num_classes}; "
                            "pass --teacher-pretrained with a teacher trained on your classes")
    if os.environ.get("HF_HUB_OFFLINE") == "1" and not name.startswith("local-dir:"):
        raise UserError(f"HF_HUB_OFFLINE is set, so timm's pretrained weights for teacher {name} cannot be "
                        "fetched; pass --teacher-pretrained PATH (a .pth / .safetensors file)")
    return _create(name, True, num_classes=num_classes, in_chans=in_chans)
