"""Contrastive representation distillation (Tian et al., ICLR 2020) with its memory banks and NCE loss, as
RepDistiller computes it. The dataset supplies ``index`` and ``contrastive_index`` (see data/contrast.py)."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..distributed import all_gather_cat, all_reduce_mean
from ._common import FEAT_DIM, full_precision, last_feature
from .registry import FeatureKDLoss, MethodFlag, register_kd_loss


class Embed(nn.Module):
    """Linear projection then L2 normalisation."""

    def __init__(self, dim_in: int, dim_out: int = 128):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        return x / x.pow(2).sum(1, keepdim=True).pow(0.5)


def nce_loss(x: torch.Tensor, num_data: int, eps: float = 1e-7) -> torch.Tensor:
    """NCE of a score matrix (B, k+1): column 0 the positive, the rest noise samples."""
    batch, m = x.shape[0], x.shape[1] - 1
    noise = m / num_data
    log_pos = torch.log(x[:, 0] / (x[:, 0] + noise + eps))
    log_neg = torch.log(noise / (x[:, 1:] + noise + eps))
    return -(log_pos.sum() + log_neg.sum()) / batch


@register_kd_loss("crd", needs={"features", "contrast"}, flags=(
    FEAT_DIM,
    MethodFlag("--nce-k", "k", int, 16384, help="CRD: contrast samples per image", positive=True),
    MethodFlag("--nce-t", "temperature", float, 0.07, help="CRD: temperature", positive=True),
    MethodFlag("--nce-mom", "momentum", float, 0.5, help="CRD: memory momentum", minimum=0.0,
               maximum=1.0),
))
class CRD(FeatureKDLoss):
    def __init__(self, feat_s_channel: int, feat_t_channel: int, feat_dim: int = 128, num_data: int = 0,
                 k: int = 16384, momentum: float = 0.5, temperature: float = 0.07):
        super().__init__()
        if num_data <= 0:
            raise ValueError("CRD needs num_data, the size of the training set")
        self.embed_s = Embed(feat_s_channel, feat_dim)
        self.embed_t = Embed(feat_t_channel, feat_dim)
        self.num_data, self.k, self.momentum, self.temperature = num_data, k, momentum, temperature
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        self.register_buffer("memory_s", torch.rand(num_data, feat_dim).mul_(2 * stdv).add_(-stdv))  # M_1
        self.register_buffer("memory_t", torch.rand(num_data, feat_dim).mul_(2 * stdv).add_(-stdv))  # M_2
        # normalisation constants Z_s, Z_t, fixed on the first call (-1: not yet)
        self.register_buffer("z", torch.full((2,), -1.0))

    @classmethod
    def from_shapes(cls, student_shapes, teacher_shapes, num_data: int, **kwargs) -> CRD:
        return cls(student_shapes.pooled, teacher_shapes.pooled, num_data=num_data, **kwargs)

    def forward(self, feature_student: list[torch.Tensor], feature_teacher: list[torch.Tensor],
                index: torch.Tensor, contrastive_index: torch.Tensor, **kwargs) -> torch.Tensor:
        f_s, f_t = last_feature(feature_student), last_feature(feature_teacher)
        with full_precision(f_s):
            v_s, v_t = self.embed_s(f_s), self.embed_t(f_t)
            batch, dim = v_s.shape
            idx = contrastive_index.reshape(-1)
            w_s = self.memory_s.index_select(0, idx).view(batch, -1, dim)
            w_t = self.memory_t.index_select(0, idx).view(batch, -1, dim)
            out_t = torch.exp(torch.bmm(w_s, v_t.unsqueeze(2)).squeeze(2) / self.temperature)
            out_s = torch.exp(torch.bmm(w_t, v_s.unsqueeze(2)).squeeze(2) / self.temperature)
            with torch.no_grad():  # fixed on the first call, without reading it back to the host
                first = all_reduce_mean(torch.stack([out_s.mean(), out_t.mean()])) * self.num_data
                self.z.copy_(torch.where(self.z < 0, first, self.z))
            out_s, out_t = out_s / self.z[0], out_t / self.z[1]
            with torch.no_grad():
                # under DDP every rank applies every rank's updates, so the memories stay identical
                index_all = all_gather_cat(index)
                self._update(self.memory_s, index_all, all_gather_cat(v_s.detach()))
                self._update(self.memory_t, index_all, all_gather_cat(v_t.detach()))
            return nce_loss(out_s, self.num_data) + nce_loss(out_t, self.num_data)

    def _update(self, memory: torch.Tensor, index: torch.Tensor, v: torch.Tensor) -> None:
        pos = memory.index_select(0, index) * self.momentum + v.detach() * (1 - self.momentum)
        memory.index_copy_(0, index, pos / pos.pow(2).sum(1, keepdim=True).pow(0.5))
