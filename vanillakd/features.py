"""Features of any timm model from one forward pass: stage maps (NCHW), the pooled pre-logit feature, logits.

Everything goes through timm's ``forward_intermediates`` / ``forward_head``, so no per-model shape table:
channel counts and map sizes are discovered at run time by a probe forward.

What each family gives as stage maps:
- hierarchical models (ResNet, ConvNeXt, EfficientNet, ...): the outputs of the last four feature levels of
  ``model.feature_info`` (for ResNet layer1..layer4, for ConvNeXt stages 0..3);
- plain ViTs (one resolution throughout): four blocks evenly spaced through the depth, tokens reshaped to
  NCHW with the prefix (class / register) tokens dropped.
With ``preact=True`` a timm ResNet also gives each stage's pre-activation output (the residual sum before the
block's last ReLU), which ReviewKD takes under ``--review-preact``; other families give their usual stage
outputs. The seed kept that sum too, but the block's in-place ReLU then overwrote it, so its ReviewKD read the
post-ReLU stage output: the ordinary ``maps``, ReviewKD's default here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import UserError

NUM_STAGES = 4


@dataclass
class Features:
    logits: torch.Tensor
    maps: list[torch.Tensor]           # stage maps, shallow to deep, NCHW
    pooled: torch.Tensor               # (B, C) pre-logit feature
    preact: list[torch.Tensor] | None = None  # pre-activation stage maps (ResNets, when asked)

    def as_list(self, preact: bool = False) -> list[torch.Tensor]:
        """The feature list the losses take: stage maps, then the pooled feature last."""
        maps = self.preact if preact and self.preact is not None else self.maps
        return [*maps, self.pooled]


@dataclass
class FeatureShapes:
    channels: list[int]                # per stage map
    sizes: list[tuple[int, int]]       # (H, W) per stage map at the probed input size
    pooled: int
    extra: dict = field(default_factory=dict)


def stage_indices(model: nn.Module, num: int = NUM_STAGES) -> int | list[int]:
    """Which ``forward_intermediates`` outputs count as stages (see the module docstring)."""
    info = getattr(model, "feature_info", None) or []
    reductions = [f.get("reduction") for f in info]
    n = len(info)
    if n and len(set(reductions)) == 1 and n > num:
        return [round((i + 1) * n / num) - 1 for i in range(num)]
    return min(num, n) if n else num


def _preact_modules(model: nn.Module) -> list[nn.Module] | None:
    """The last activation of the final block of each of layer1..layer4 in a timm ResNet, else None."""
    from timm.models.resnet import BasicBlock, Bottleneck, ResNet
    if not isinstance(model, ResNet):
        return None
    acts = []
    for name in ("layer1", "layer2", "layer3", "layer4"):
        block = getattr(model, name)[-1]
        if isinstance(block, Bottleneck):
            acts.append(block.act3)
        elif isinstance(block, BasicBlock):
            acts.append(block.act2)
        else:
            return None
    return acts


class FeatureModel(nn.Module):
    """Wraps a timm model so that one forward returns ``Features``; the wrapped model is unchanged and
    still what gets saved, exported and validated."""

    def __init__(self, model: nn.Module, preact: bool = False, name: str | None = None):
        super().__init__()
        name = name or getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
        if not hasattr(model, "forward_intermediates"):
            raise UserError(f"model {name} has no forward_intermediates in this timm version, so feature "
                            "distillation cannot read its stage features; choose another model or a logit method")
        self.model = model
        self.indices = stage_indices(model)
        self._captured: list[torch.Tensor | None] = []
        self._hooks = []
        self.has_preact = False
        if preact:
            acts = _preact_modules(model)
            if acts is not None:
                self.has_preact = True
                self._captured = [None] * len(acts)
                for i, act in enumerate(acts):
                    self._hooks.append(act.register_forward_pre_hook(self._capture(i)))

    def _capture(self, i: int):
        def hook(module, args):
            # clone: the activation is in-place and would overwrite the sum we want
            self._captured[i] = args[0].clone()
        return hook

    def forward(self, x: torch.Tensor) -> Features:
        final, maps = self.model.forward_intermediates(x, indices=self.indices, output_fmt="NCHW")
        pooled = self.model.forward_head(final, pre_logits=True)
        classifier = self.model.get_classifier()
        if isinstance(classifier, (nn.Linear, nn.Identity)):
            logits = classifier(pooled)  # the head on the pooled feature we already have
        else:
            logits = self.model.forward_head(final)
        preact = None
        if self.has_preact:
            preact = list(self._captured)
            self._captured = [None] * len(preact)
        return Features(logits, list(maps), pooled, preact)


def resized(input_size: tuple[int, int, int], size: int | None) -> tuple[int, int, int]:
    """``input_size`` (C, H, W) after an optional square resize (``--student-resize`` / ``--teacher-resize``)."""
    return tuple(input_size) if size is None else (input_size[0], size, size)


@torch.no_grad()
def probe_shapes(fm: FeatureModel, input_size: tuple[int, int, int], device: torch.device) -> FeatureShapes:
    """Channel counts and map sizes from a forward of a 2-image dummy batch in eval mode."""
    modes = {m: m.training for m in fm.modules()}  # restore each module's own mode (a teacher stays in eval)
    fm.eval()
    out = fm(torch.zeros(2, *input_size, device=device))
    for m, mode in modes.items():
        m.training = mode
    return FeatureShapes([m.shape[1] for m in out.maps], [tuple(m.shape[-2:]) for m in out.maps],
                         out.pooled.shape[1])
