"""Helpers and flags shared by several methods (a shared flag is declared by each method using it)."""
from __future__ import annotations

import contextlib

import torch

from .registry import MethodFlag

# kd, dkd and dist (DIST's tau: ``TEMPERATURE.feeding("tau")``)
TEMPERATURE = MethodFlag("--temperature", "temperature", float, 1.0, help="KD / DKD temperature, DIST tau",
                         positive=True)
# correlation and crd
FEAT_DIM = MethodFlag("--feat-dim", "feat_dim", int, 128, help="embedding size of Correlation and CRD", positive=True)


def last_feature(features: list[torch.Tensor]) -> torch.Tensor:
    """The pooled pre-logit feature (last entry), flattened to (B, D), in float32."""
    return features[-1].flatten(1).float()


def full_precision(t: torch.Tensor):
    """Autocast off for arithmetic that must stay in float32 (small-norm differences, exp of scores)."""
    return torch.autocast(device_type=t.device.type, enabled=False) if t.device.type in ("cuda", "cpu") \
        else contextlib.nullcontext()
