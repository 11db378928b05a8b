"""Correlation congruence KD as the seed computes it: trainable embeddings of both pooled features, then the
batch-neighbour product of their absolute difference."""
from __future__ import annotations

import torch
from torch import nn

from ._common import FEAT_DIM, full_precision, last_feature
from .registry import FeatureKDLoss, register_kd_loss


@register_kd_loss("correlation", needs={"features"}, flags=(FEAT_DIM,))
class Correlation(FeatureKDLoss):
    def __init__(self, feat_s_channel: int, feat_t_channel: int, feat_dim: int = 128):
        super().__init__()
        self.embed_s = nn.Linear(feat_s_channel, feat_dim)
        self.embed_t = nn.Linear(feat_t_channel, feat_dim)  # trained too, as in the seed

    @classmethod
    def from_shapes(cls, student_shapes, teacher_shapes, num_data: int, **kwargs) -> Correlation:
        return cls(student_shapes.pooled, teacher_shapes.pooled, **kwargs)

    def forward(self, feature_student: list[torch.Tensor], feature_teacher: list[torch.Tensor],
                **kwargs) -> torch.Tensor:
        f_s, f_t = last_feature(feature_student), last_feature(feature_teacher)
        with full_precision(f_s):
            delta = torch.abs(self.embed_s(f_s) - self.embed_t(f_t))
            return 0.02 * (delta[:-1] * delta[1:]).sum(1).mean()
