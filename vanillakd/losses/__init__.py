"""Distillation methods, one file per method, all reachable by name through the registry (see registry.py).

Every module of this package is imported here (private ``_*.py`` helpers and the registry itself aside, which
the methods import), so a new method is one new file: its ``@register_kd_loss`` declaration is all the
training scripts need.
"""
import importlib
import pkgutil

from .registry import (
                       FeatureKDLoss,
                       KDLossEntry,
                       MethodDeclarationError,
                       MethodFlag,
                       create_kd_loss,
                       create_kd_loss_for,
                       get_kd_loss_entry,
                       list_kd_losses,
                       method_flags,
                       register_kd_loss,
)


def _discover() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not info.name.startswith("_") and info.name != "registry":
            importlib.import_module(f"{__name__}.{info.name}")


_discover()

from .correlation import Correlation  # noqa: E402  (the methods' public names, as before)
from .crd import CRD  # noqa: E402
from .dist import DIST  # noqa: E402
from .dkd import DKD  # noqa: E402
from .kd import BinaryKLDiv, KLDiv  # noqa: E402
from .review import ReviewKD  # noqa: E402
from .rkd import RKD  # noqa: E402

__all__ = ["KLDiv", "BinaryKLDiv", "DKD", "DIST", "RKD", "Correlation", "ReviewKD", "CRD", "FeatureKDLoss",
           "KDLossEntry", "MethodDeclarationError", "MethodFlag", "create_kd_loss", "create_kd_loss_for",
           "get_kd_loss_entry", "list_kd_losses", "method_flags", "register_kd_loss"]
