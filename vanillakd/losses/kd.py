"""Vanilla KD (Hinton et al.) and its binary-cross-entropy variant, as the seed computes them."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._common import TEMPERATURE
from .registry import register_kd_loss


@register_kd_loss("kd", needs={"logits"}, flags=(TEMPERATURE,))
class KLDiv(nn.Module):
    """``T^2 * mean_b KL(softmax(z_t/T) || softmax(z_s/T))``."""

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = temperature

    def forward(self, z_s: torch.Tensor, z_t: torch.Tensor, **kwargs) -> torch.Tensor:
        T = self.temperature
        # float32 inside whatever the autocast dtype: half-precision softmax over 1000 classes underflows
        log_p_s = F.log_softmax(z_s.float() / T, dim=1)
        log_p_t = F.log_softmax(z_t.float() / T, dim=1)
        # log_target avoids log(0) where the teacher's probability underflows; equal to kl_div(log_p_s, p_t)
        return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * T ** 2


@register_kd_loss("bkd", needs={"logits"})
class BinaryKLDiv(nn.Module):
    """Per-class BCE against the teacher's softmax, mean over batch and classes (no temperature)."""

    def forward(self, z_s: torch.Tensor, z_t: torch.Tensor, **kwargs) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(z_s.float(), z_t.float().softmax(dim=1))
