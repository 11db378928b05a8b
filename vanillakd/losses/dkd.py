"""Decoupled KD (Zhao et al., CVPR 2022): target-class and non-target-class KL terms."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._common import TEMPERATURE
from .registry import MethodFlag, register_kd_loss


def hard_target(target: torch.Tensor) -> torch.Tensor:
    """Class ids from ``(B,)`` ids or ``(B, K)`` soft / mixup targets (argmax)."""
    return target.argmax(dim=1) if target.ndim == 2 else target


def _kl_rows(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """``sum_b sum_k q (log q - log p)``; a term with q == 0 counts as 0, as F.kl_div does."""
    q = log_q.exp()
    return torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q)).sum()


def dkd_loss(z_s: torch.Tensor, z_t: torch.Tensor, target: torch.Tensor,
             alpha: float, beta: float, temperature: float) -> torch.Tensor:
    T = temperature
    z_s, z_t = z_s.float() / T, z_t.float() / T
    gt = F.one_hot(hard_target(target), z_s.shape[1]).to(torch.bool)
    batch = z_s.shape[0]

    def binary_log_probs(z: torch.Tensor) -> torch.Tensor:
        # log [p_target, 1 - p_target] computed in log space (logsumexp), so that a class probability
        # that underflows in half precision does not turn into log(0) = -inf
        log_p = F.log_softmax(z, dim=1)
        log_gt = log_p.masked_fill(~gt, float("-inf")).logsumexp(dim=1)
        log_other = log_p.masked_fill(gt, float("-inf")).logsumexp(dim=1)
        return torch.stack([log_gt, log_other], dim=1)

    tckd = _kl_rows(binary_log_probs(z_t), binary_log_probs(z_s)) * T ** 2 / batch
    # the -1000 mask is the original's way of removing the target class; kept for identical numbers
    mask = 1000.0 * gt.to(z_s.dtype)
    nckd = _kl_rows(F.log_softmax(z_t - mask, dim=1), F.log_softmax(z_s - mask, dim=1)) * T ** 2 / batch
    return alpha * tckd + beta * nckd


@register_kd_loss("dkd", needs={"logits"}, flags=(
    TEMPERATURE,
    MethodFlag("--dkd-alpha", "alpha", float, 1.0),
    MethodFlag("--dkd-beta", "beta", float, 2.0),
))
class DKD(nn.Module):
    def __init__(self, alpha: float = 1.0, beta: float = 2.0, temperature: float = 1.0):
        super().__init__()
        self.alpha, self.beta, self.temperature = alpha, beta, temperature

    def forward(self, z_s: torch.Tensor, z_t: torch.Tensor, target: torch.Tensor, **kwargs) -> torch.Tensor:
        return dkd_loss(z_s, z_t, target, self.alpha, self.beta, self.temperature)
