"""Device and mixed-precision choice: bfloat16 autocast where supported (CPU included), float16 + loss
scaling on GPUs without bfloat16, full precision without ``--amp``."""
from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from timm.utils import NativeScaler, dispatch_clip_grad

from .errors import UserError


def resolve_device(name: str | None, local_rank: int = 0) -> torch.device:
    if name is None:
        name = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


@dataclass
class Precision:
    device_type: str
    dtype: torch.dtype | None  # None: full precision

    @classmethod
    def create(cls, device: torch.device, amp: bool, amp_dtype: str = "auto") -> Precision:
        if not amp:
            return cls(device.type, None)
        if amp_dtype == "auto":
            bf16_ok = device.type != "cuda" or torch.cuda.is_bf16_supported()
            amp_dtype = "bfloat16" if bf16_ok else "float16"
        if device.type == "cpu" and amp_dtype == "float16":
            raise UserError("--amp-dtype float16 is not supported on the CPU; use bfloat16")
        return cls(device.type, getattr(torch, amp_dtype))

    @property
    def needs_scaler(self) -> bool:
        return self.dtype == torch.float16

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler(self.device_type) if self.needs_scaler else None

    def loss_scaler(self) -> NativeScaler | UnscaledStep:
        """timm's ``NativeScaler`` (backward, unscale, clip, step, with ``need_update`` for accumulation) for
        float16; the same call without scaling otherwise, as timm's train.py does without a scaler."""
        return NativeScaler(self.device_type) if self.needs_scaler else UnscaledStep()

    def __str__(self) -> str:
        return "float32" if self.dtype is None else f"{str(self.dtype).removeprefix('torch.')} autocast"


class UnscaledStep:
    """``NativeScaler``'s call for full precision and bfloat16: backward, then clip and step on an update."""
    scaled = False

    def __call__(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, clip_grad: float | None = None,
                 clip_mode: str = "norm", parameters: Iterable[torch.nn.Parameter] | None = None,
                 need_update: bool = True) -> None:
        loss.backward()
        if need_update:
            if clip_grad is not None:
                dispatch_clip_grad(parameters, clip_grad, mode=clip_mode)
            optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
