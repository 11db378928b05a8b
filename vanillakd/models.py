"""Student models from timm by name, with the errors a user can act on (the teacher side: ``teachers.live``)."""
from __future__ import annotations

import difflib
import os

import timm
from torch import nn

from .errors import UserError
from .weights import load_weights


def check_model_name(name: str, role: str = "model") -> None:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(f"unknown {role} {name!r}: not a timm model{hint}")


def create_student(name: str, num_classes: int, pretrained: bool = False, initial_checkpoint: str = "",
                   trust: bool = False, initial_ema: bool = True, **kwargs) -> nn.Module:
    """A timm model; ``kwargs`` with value None keep timm's defaults (drop rates, pooling, BN settings).

    ``initial_checkpoint`` is read like timm's ``load_checkpoint``: its EMA weights when it holds them and
    ``initial_ema`` (the seed's behaviour; ``--no-ema-checkpoint`` turns it off)."""
    check_model_name(name, "model")
    model = _create(name, pretrained, num_classes=num_classes, **kwargs)
    if initial_checkpoint:
        load_weights(model, initial_checkpoint, what="initial", use_ema=initial_ema, trust=trust)
    return model


def _create(name: str, pretrained: bool, **kwargs) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as e:  # e.g. a drop_path_rate the architecture does not take
        raise UserError(f"cannot build {name}: {e}") from None
    except AssertionError as e:  # timm asserts on some arguments, e.g. an unknown --gp pool type
        raise UserError(f"cannot build {name} with these flags: {str(e).strip() or 'an argument it refuses'}"
                        + (f" (--gp {kwargs['global_pool']})" if kwargs.get("global_pool") else "")) from None
    except (OSError, RuntimeError) as e:
        if pretrained:
            offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
            raise UserError(f"could not fetch pretrained weights for {name}{offline}: "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}; "
                            "pass a weights file instead") from None
        raise
