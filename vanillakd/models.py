"""Student and teacher models from timm by name, with the errors a user can act on."""
from __future__ import annotations

import difflib
import os

import timm
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import load_weights
from .errors import UserError


def check_model_name(name: str, role: str = "model") -> None:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(f"unknown {role} {name!r}: not a timm model{hint}")


def create_student(name: str, num_classes: int, pretrained: bool = False, initial_checkpoint: str = "",
                   trust: bool = False, **kwargs) -> nn.Module:
    """A timm model; ``kwargs`` with value None keep timm's defaults (drop rates, pooling, BN settings)."""
    check_model_name(name, "model")
    model = _create(name, pretrained, num_classes=num_classes, **kwargs)
    if initial_checkpoint:
        load_weights(model, initial_checkpoint, what="initial", trust=trust)
    return model


def _create(name: str, pretrained: bool, **kwargs) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as e:  # e.g. a drop_path_rate the architecture does not take
        raise UserError(f"cannot build {name}: {e}") from None
    except (OSError, RuntimeError) as e:
        if pretrained:
            offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
            raise UserError(f"could not fetch pretrained weights for {name}{offline}: "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}; "
                            "pass a weights file instead") from None
        raise


class FrozenTeacher(nn.Module):
    """The teacher: frozen, always in eval mode, run without autograd, optionally on a resized batch.

    ``model`` may be a ``features.FeatureModel``, for feature methods: the forward then returns ``Features``.
    """

    def __init__(self, model: nn.Module, resize: int | None = None):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.resize = resize

    @property
    def input_resize(self) -> int | None:
        return self.resize

    def train(self, mode: bool = True) -> "FrozenTeacher":
        # whatever the caller asks (e.g. a parent module's .train()), BN / dropout stay in inference mode
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.resize is not None and x.shape[-1] != self.resize:
            x = resize_batch(x, self.resize)
        return self.model(x)


def resize_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of a normalised NCHW batch to ``size`` x ``size`` (``--teacher-resize``)."""
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def create_teacher(name: str, num_classes: int, weights: str | None, resize: int | None = None,
                   trust: bool = False) -> FrozenTeacher:
    """The teacher from a weights file, or from timm's pretrained weights when no file is given."""
    check_model_name(name, "teacher")
    if weights:
        if not os.path.exists(weights):
            raise UserError(f"teacher checkpoint {weights} does not exist")
        model = _create(name, False, num_classes=num_classes)
        load_weights(model, weights, what="teacher", use_ema=True, trust=trust)
    else:
        cfg = timm.models.get_pretrained_cfg(name)
        hub_classes = getattr(cfg, "num_classes", None)
        if hub_classes is not None and hub_classes != num_classes:
            raise UserError(f"timm's pretrained {name} has {hub_classes} classes but the data has {num_classes}; "
                            "pass --teacher-pretrained with a teacher trained on your classes")
        model = _create(name, True, num_classes=num_classes)
    return FrozenTeacher(model, resize)
