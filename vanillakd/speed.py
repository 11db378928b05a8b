"""The fast-step defaults: what ``auto`` means for mixed precision, channels_last, pinned memory, fused /
foreach optimizer steps and ``torch.compile``, decided once per run from the device and the models.

Every switch has an explicit on / off flag; ``auto`` (the default) turns on what is safe and faster on a GPU
and keeps the CPU path as it always was (bfloat16 on CPUs without native support is slower, and channels_last
helps oneDNN little).
"""
from __future__ import annotations

import argparse
import inspect
import logging

import timm
import torch
from torch import nn

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


def resolve_speed_flags(args: argparse.Namespace, device: torch.device, model_names: list[str]) -> list[str]:
    """Replace the ``None`` (auto) values of ``--amp``, ``--channels-last`` and ``--pin-mem`` by the choice for
    ``device``; return what auto turned on, for the log."""
    cuda = device.type == "cuda"
    turned_on = []
    if getattr(args, "amp", None) is None:
        args.amp = cuda
        turned_on += ["amp"] if cuda else []
    if getattr(args, "channels_last", None) is None:
        args.channels_last = cuda and any(is_conv_net(n) for n in model_names)
        turned_on += ["channels_last"] if args.channels_last else []
    if getattr(args, "pin_mem", None) is None:
        args.pin_mem = cuda
        turned_on += ["pin_mem"] if cuda else []
    return turned_on


def optimizer_speed_kwargs(opt: str, device: torch.device, fused: bool | None = None) -> dict[str, bool]:
    """``fused=True`` for torch optimizers that have a fused CUDA kernel (AdamW, Adam, SGD, ...), else
    ``foreach=True`` (one multi-tensor kernel per group) where the class takes it.

    ``fused``: None = auto (on CUDA only), False = neither, True = also on the CPU (foreach there). The choice
    never changes the arithmetic beyond floating-point summation order."""
    if fused is False or (fused is None and device.type != "cuda"):
        return {}
    from timm.optim._optim_factory import default_registry
    name = opt.lower().split("_")[-1]
    try:
        cls = default_registry.get_optimizer_info(name).opt_class
    except (KeyError, ValueError):
        return {}
    if isinstance(cls, str):  # lazily-imported optional backends (bitsandbytes, apex): leave them alone
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
