"""The fast-step defaults: what ``auto`` means for mixed precision, channels_last, pinned memory, fused /
foreach optimizer steps and ``torch.compile``, decided once per run from the device and the models.

Every switch has an explicit on / off flag; ``auto`` (the default) turns on what is safe and faster on a GPU
and keeps the CPU path as it always was (bfloat16 on CPUs without native support is slower, and channels_last
helps oneDNN little).
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import replace

import timm
import torch
from timm.optim import get_optimizer_class
from torch import nn

from .config import SpeedConfig

log = logging.getLogger("vanillakd")


def is_conv_net(name: str) -> bool:
    """More than one Conv2d in the model (a ViT's patch embedding alone does not make a conv net).

    Built on the meta device: no memory and no weights are touched."""
    try:
        with torch.device("meta"):
            model = timm.create_model(name, num_classes=10)
    except Exception:  # an unusual model that will not build on meta: keep the safe NCHW default
        return False
    return sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 1


def resolve_speed(speed: SpeedConfig, device: torch.device, model_names: list[str]) -> tuple[SpeedConfig, list[str]]:
    """``speed`` with its ``None`` (auto) values of ``--amp``, ``--channels-last`` and ``--pin-mem`` decided for
    ``device``; and what auto turned on, for the log."""
    cuda = device.type == "cuda"
    amp = cuda if speed.amp is None else speed.amp
    channels_last = speed.channels_last
    if channels_last is None:
        channels_last = cuda and any(is_conv_net(n) for n in model_names)
    pin_mem = cuda if speed.pin_mem is None else speed.pin_mem
    choices = (("amp", speed.amp, amp), ("channels_last", speed.channels_last, channels_last),
               ("pin_mem", speed.pin_mem, pin_mem))
    turned_on = [name for name, auto, value in choices if auto is None and value]
    return replace(speed, amp=amp, channels_last=channels_last, pin_mem=pin_mem), turned_on


def optimizer_speed_kwargs(opt: str, device: torch.device, fused: bool | None = None) -> dict[str, bool]:
    """``fused=True`` for torch optimizers that have a fused CUDA kernel (AdamW, Adam, SGD, ...), else
    ``foreach=True`` (one multi-tensor kernel per group) where the class takes it.

    ``fused``: None = auto (on CUDA only), False = neither, True = also on the CPU (foreach there). The choice
    never changes the arithmetic beyond floating-point summation order."""
    if fused is False or (fused is None and device.type != "cuda"):
        return {}
    name = opt.lower().split("_")[-1]
    try:
        cls = get_optimizer_class(name, bind_defaults=False)
    except (KeyError, ValueError, ImportError, AssertionError):
        # unknown here (create_optimizer_v2 says so), or an optional backend (bitsandbytes, apex) that is
        # missing or needs CUDA: leave its arguments alone
        return {}
    params = inspect.signature(cls.__init__).parameters
    if "fused" in params and device.type == "cuda":
        return {"fused": True}
    if "foreach" in params:
        return {"foreach": True}
    return {}


def maybe_compile(module: nn.Module, enabled: bool, mode: str | None = None) -> nn.Module:
    """``torch.compile(module)`` when asked; the original module keeps its plain state-dict keys because
    callers compile only the module they run, and save the one they built."""
    if not enabled:
        return module
    return torch.compile(module, mode=mode)
