"""Name -> KD loss registry, so that training scripts never branch on the method.

Each entry records the loss class and how its constructor arguments map onto the training
scripts' command-line flags (e.g. DKD's ``alpha`` comes from ``--dkd-alpha``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from torch import nn

from ..errors import UserError


@dataclass(frozen=True)
class KDLossEntry:
    name: str
    cls: type[nn.Module]
    # constructor keyword -> attribute of the parsed training arguments
    arg_map: Mapping[str, str] = field(default_factory=dict)
    # what the loss needs from the models: 'logits' only, or 'features' too (train-fd / train-crd)
    needs: str = "logits"

    def wants_preact(self, args: Any) -> bool:
        """Whether this run's loss takes a ResNet's pre-activation stage maps: the loss class names the flag
        (``preact_flag``), so the feature wrappers, built before the loss, know whether to hook them."""
        flag = getattr(self.cls, "preact_flag", None)
        return bool(flag) and bool(getattr(args, flag, False))


_REGISTRY: dict[str, KDLossEntry] = {}


def register_kd_loss(name: str, arg_map: Mapping[str, str] | None = None,
                     needs: str = "logits") -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make a loss available to ``create_kd_loss(name)`` and ``--kd-loss name``."""
    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"kd loss {name!r} is registered twice")
        _REGISTRY[name] = KDLossEntry(name, cls, dict(arg_map or {}), needs)
        return cls
    return wrap


def list_kd_losses(needs: str | None = None) -> list[str]:
    """Registered loss names, sorted; optionally only those needing ``needs``."""
    return sorted(n for n, e in _REGISTRY.items() if needs is None or e.needs == needs)


def get_kd_loss_entry(name: str) -> KDLossEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown kd loss {name!r}; choose one of: {', '.join(list_kd_losses())}") from None


def create_kd_loss(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered loss by name with constructor keyword arguments."""
    return get_kd_loss_entry(name).cls(**kwargs)


def create_kd_loss_from_args(name: str, args: Any, student_shapes: Any = None, teacher_shapes: Any = None,
                             num_data: int = 0, **overrides: Any) -> nn.Module:
    """Build a registered loss from parsed training flags, using the entry's flag mapping.

    Feature losses also get the two models' feature shapes (``features.FeatureShapes``, discovered at run
    time) and the training-set size, through their ``from_shapes`` constructor.
    """
    entry = get_kd_loss_entry(name)
    kwargs = {k: getattr(args, attr) for k, attr in entry.arg_map.items() if getattr(args, attr, None) is not None}
    kwargs.update(overrides)
    if entry.needs == "features":
        if student_shapes is None or teacher_shapes is None:
            raise ValueError(f"kd loss {name!r} needs the student's and teacher's feature shapes")
        return entry.cls.from_shapes(student_shapes, teacher_shapes, num_data, **kwargs)
    return entry.cls(**kwargs)
