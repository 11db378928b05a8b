"""One student's training objective: ``ori_w * base(student(x), y) + kd_w * kd(z_s, z_t, y)`` (seed semantics).

The teacher runs outside, once per batch, so that several students share its output.
"""
from __future__ import annotations

import torch
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from .features import Features
from .teachers.live import resize_batch


def create_base_loss(soft_targets: bool, smoothing: float, bce: bool, bce_target_thresh: float | None) -> nn.Module:
    """The seed's (timm's) choice of supervised loss.

    With mixup/cutmix the targets arrive soft and already smoothed by ``KDObjective``, so only the
    BCE target threshold applies; otherwise the loss itself smooths hard labels.
    """
    if soft_targets:
        return BinaryCrossEntropy(target_threshold=bce_target_thresh) if bce else SoftTargetCrossEntropy()
    if smoothing:
        if bce:
            return BinaryCrossEntropy(smoothing=smoothing, target_threshold=bce_target_thresh)
        return LabelSmoothingCrossEntropy(smoothing=smoothing)
    return nn.CrossEntropyLoss()


class KDObjective(nn.Module):
    """``student`` is a plain timm model, or a ``FeatureModel`` around one when the KD loss needs features.

    The teacher's output arrives as logits or as ``Features``; what the KD loss gets is chosen here, by
    keyword, so the loop never knows the method: ``z_s, z_t, target, feature_student, feature_teacher,
    epoch`` and the batch extras (``index``, ``contrastive_index``).
    """

    def __init__(self, student: nn.Module, kd_loss: nn.Module | None, base_loss: nn.Module,
                 ori_loss_weight: float = 1.0, kd_loss_weight: float = 1.0, smoothing: float = 0.0,
                 student_resize: int | None = None, preact: bool = False):
        """``preact``: the method takes a ResNet's pre-activation stage maps (its registry entry says)."""
        super().__init__()
        self.student = student
        self.preact = preact
        self.kd_loss = kd_loss
        self.base_loss = base_loss
        self.ori_loss_weight = ori_loss_weight
        self.kd_loss_weight = kd_loss_weight
        self.smoothing = smoothing
        self.student_resize = student_resize

    def forward(self, x: torch.Tensor, target: torch.Tensor, teacher_out: torch.Tensor | Features | None,
                extras: dict | None = None, epoch: int | None = None) -> dict[str, torch.Tensor]:
        if self.student_resize is not None and x.shape[-1] != self.student_resize:
            x = resize_batch(x, self.student_resize)
        out = self.student(x)
        feat_s = feat_t = None
        if isinstance(out, Features):
            z_s, feat_s = out.logits, out.as_list(self.preact)
        else:
            z_s = out
        if isinstance(teacher_out, Features):
            z_t, feat_t = teacher_out.logits, teacher_out.as_list(self.preact)
        else:
            z_t = teacher_out
        if target.ndim == 2 and self.smoothing:
            # identical to timm's mixup_target(..., smoothing) applied before mixing
            target = target * (1.0 - self.smoothing) + self.smoothing / target.shape[1]
        base = self.base_loss(z_s, target)
        if self.kd_loss is None or self.kd_loss_weight == 0 or z_t is None:
            kd = torch.zeros((), device=z_s.device, dtype=base.dtype)
        else:
            kd = self.kd_loss(z_s=z_s, z_t=z_t, target=target, feature_student=feat_s, feature_teacher=feat_t,
                              epoch=epoch, **(extras or {}))
        loss = self.ori_loss_weight * base + self.kd_loss_weight * kd
        return {"loss": loss, "output": z_s, "base_loss": base.detach(), "kd_loss": kd.detach()}
