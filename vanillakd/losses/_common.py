"""Helpers shared by the feature losses."""
from __future__ import annotations

import contextlib

import torch


def last_feature(features: list[torch.Tensor]) -> torch.Tensor:
    """The pooled pre-logit feature (last entry), flattened to (B, D), in float32."""
    return features[-1].flatten(1).float()


def full_precision(t: torch.Tensor):
    """Autocast off for arithmetic that must stay in float32 (small-norm differences, exp of scores)."""
    return torch.autocast(device_type=t.device.type, enabled=False) if t.device.type in ("cuda", "cpu") \
        else contextlib.nullcontext()
