"""DIST (Huang et al., NeurIPS 2022): inter- and intra-class Pearson correlation of probabilities."""
from __future__ import annotations

import torch
from torch import nn

from ._common import TEMPERATURE
from .registry import MethodFlag, register_kd_loss


def _cosine(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b``."""
    return _cosine(a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True), eps)


@register_kd_loss("dist", needs={"logits"}, flags=(
    TEMPERATURE.feeding("tau"),
    MethodFlag("--dist-beta", "beta", float, 1.0, minimum=0.0),
    MethodFlag("--dist-gamma", "gamma", float, 1.0, minimum=0.0),
))
class DIST(nn.Module):
    def __init__(self, beta: float = 1.0, gamma: float = 1.0, tau: float = 1.0):
        super().__init__()
        self.beta, self.gamma, self.tau = beta, gamma, tau

    def forward(self, z_s: torch.Tensor, z_t: torch.Tensor, **kwargs) -> torch.Tensor:
        y_s = (z_s.float() / self.tau).softmax(dim=1)
        y_t = (z_t.float() / self.tau).softmax(dim=1)
        inter = 1 - pearson_rows(y_s, y_t).mean()
        intra = 1 - pearson_rows(y_s.t(), y_t.t()).mean()
        return self.tau ** 2 * (self.beta * inter + self.gamma * intra)
