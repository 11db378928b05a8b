"""Relational KD (Park et al., CVPR 2019): distance and angle relations between samples' pooled features."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import full_precision, last_feature
from .registry import FeatureKDLoss, MethodFlag, register_kd_loss


def pdist(e: torch.Tensor, squared: bool = False, eps: float = 1e-12) -> torch.Tensor:
    sq = e.pow(2).sum(dim=1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps)
    if not squared:
        d = d.sqrt()
    return d * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))  # zero diagonal, keeps the graph


def _angles(e: torch.Tensor) -> torch.Tensor:
    u = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)  # u[i, j] = normalize(e_j - e_i)
    return torch.bmm(u, u.transpose(1, 2)).view(-1)


@register_kd_loss("rkd", needs={"features"}, flags=(
    MethodFlag("--rkd-distance-weight", "distance_weight", float, 25.0, minimum=0.0),
    MethodFlag("--rkd-angle-weight", "angle_weight", float, 50.0, minimum=0.0),
))
class RKD(FeatureKDLoss):
    def __init__(self, distance_weight: float = 25, angle_weight: float = 50, eps: float = 1e-12,
                 squared: bool = False):
        super().__init__()
        self.distance_weight, self.angle_weight, self.eps, self.squared = distance_weight, angle_weight, eps, squared

    def forward(self, feature_student: list[torch.Tensor], feature_teacher: list[torch.Tensor],
                **kwargs) -> torch.Tensor:
        f_s, f_t = last_feature(feature_student), last_feature(feature_teacher)
        with full_precision(f_s):
            with torch.no_grad():
                t_d = pdist(f_t, self.squared, self.eps)
                t_d = t_d / t_d[t_d > 0].mean()
                t_angle = _angles(f_t)
            d = pdist(f_s, self.squared, self.eps)
            d = d / d[d > 0].mean()
            loss_d = F.smooth_l1_loss(d, t_d)
            loss_a = F.smooth_l1_loss(_angles(f_s), t_angle)
        return self.distance_weight * loss_d + self.angle_weight * loss_a
