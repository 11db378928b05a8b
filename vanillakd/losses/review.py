"""ReviewKD (Chen et al., CVPR 2021): attention-based fusion (ABF) of the student's stage features, deepest
first, matched to the teacher's stages by the hierarchical context loss.

Channel counts and map sizes come from the two models at run time (``from_shapes``), so any pair of timm
models works; each ABF output is sized to its teacher map.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .registry import FeatureKDLoss, MethodFlag, register_kd_loss


def hcl_loss(fs_list: Sequence[torch.Tensor], ft_list: Sequence[torch.Tensor]) -> torch.Tensor:
    """Hierarchical context loss: MSE of each map pair plus halving-weight MSEs of 4x4, 2x2, 1x1 poolings."""
    total = 0.0
    for fs, ft in zip(fs_list, ft_list):
        fs, ft = fs.float(), ft.float()
        h = fs.shape[2]
        loss = F.mse_loss(fs, ft)
        weight, norm = 1.0, 1.0
        for s in (4, 2, 1):
            if s >= h:
                continue
            weight /= 2.0
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(fs, (s, s)), F.adaptive_avg_pool2d(ft, (s, s)))
            norm += weight
        total = total + loss / norm
    return total


class ABF(nn.Module):
    def __init__(self, in_channel: int, mid_channel: int, out_channel: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channel, mid_channel, kernel_size=1, bias=False),
                                   nn.BatchNorm2d(mid_channel))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channel, out_channel, kernel_size=3, stride=1, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channel))
        self.att_conv = nn.Sequential(nn.Conv2d(mid_channel * 2, 2, kernel_size=1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None,
                out_shape: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.conv1(x)
        if self.att_conv is not None:
            y = F.interpolate(y, size=x.shape[-2:], mode="nearest")
            z = self.att_conv(torch.cat([x, y], dim=1))
            x = x * z[:, 0:1] + y * z[:, 1:2]
        if out_shape is not None and tuple(x.shape[-2:]) != tuple(out_shape):
            x = F.interpolate(x, size=tuple(out_shape), mode="nearest")
        return self.conv2(x), x


def _as_map(f: torch.Tensor) -> torch.Tensor:
    return f if f.ndim == 4 else f.reshape(f.shape[0], -1, 1, 1)


@register_kd_loss("review", needs={"features"}, preact="--review-preact", flags=(
    MethodFlag("--review-warmup-epochs", "warmup_epochs", float, 1.0,
               help="ReviewKD's weight ramps up as min(epoch / this, 1)", positive=True),
    MethodFlag("--review-preact", "preact", bool, False,
               help="ReviewKD on ResNets takes the pre-activation stage maps (residual sums before the last ReLU): "
                    "the ReviewKD paper's intent, not the VanillaKD baseline, which took the post-ReLU stage "
                    "outputs (the default)"),
))
class ReviewKD(FeatureKDLoss):
    """``in_channels`` / ``out_channels``: student / teacher channels of each feature, shallow to deep, the
    pooled feature last; ``out_shapes``: the teacher's (H, W) for each (the pooled one is (1, 1)).

    ``preact``: take a ResNet's pre-activation stage maps (the residual sums before each stage's last ReLU,
    the ReviewKD paper's intent) instead of the usual post-ReLU stage outputs. Off by default, as in the
    VanillaKD baseline: it kept each residual sum as the map, but the block's in-place ReLU then overwrote that
    tensor, so what ReviewKD got was post-ReLU.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: Sequence[int],
                 out_shapes: Sequence[tuple[int, int]], mid_channel: int | None = None, warmup_epochs: float = 1.0,
                 preact: bool = False):
        super().__init__()
        self.preact = preact
        if not (len(in_channels) == len(out_channels) == len(out_shapes)):
            raise ValueError("ReviewKD needs one channel count and teacher shape per feature")
        mid = mid_channel or min(512, in_channels[-1])
        n = len(in_channels)
        self.abfs = nn.ModuleList(ABF(c_in, mid, c_out, fuse=i < n - 1)
                                  for i, (c_in, c_out) in enumerate(zip(in_channels, out_channels)))
        self.out_shapes = [tuple(s) for s in out_shapes]
        self.warmup_epochs = warmup_epochs

    @classmethod
    def from_shapes(cls, student_shapes, teacher_shapes, num_data: int, **kwargs) -> ReviewKD:
        s, t = student_shapes, teacher_shapes
        n = min(len(s.channels), len(t.channels))  # the deepest n stages of each
        return cls(s.channels[-n:] + [s.pooled], t.channels[-n:] + [t.pooled], list(t.sizes[-n:]) + [(1, 1)],
                   **kwargs)

    def forward(self, feature_student: Sequence[torch.Tensor], feature_teacher: Sequence[torch.Tensor],
                epoch: float | None = None, **kwargs) -> torch.Tensor:
        n = len(self.abfs)
        fs = [_as_map(f) for f in feature_student[-n:]]
        ft = [_as_map(f) for f in feature_teacher[-n:]]
        dtype = self.abfs[0].conv1[0].weight.dtype
        fs = [f if torch.is_autocast_enabled(f.device.type) else f.to(dtype) for f in fs]
        out, residual = self.abfs[-1](fs[-1], out_shape=self.out_shapes[-1])
        results = [out]
        for i in range(n - 2, -1, -1):
            out, residual = self.abfs[i](fs[i], residual, out_shape=self.out_shapes[i])
            results.insert(0, out)
        factor = 1.0 if epoch is None else min(epoch / self.warmup_epochs, 1.0)
        return factor * hcl_loss(results, ft)
