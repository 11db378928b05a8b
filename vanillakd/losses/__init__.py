"""Distillation losses, one file per method, all reachable by name through the registry."""
from .correlation import Correlation
from .crd import CRD
from .dist import DIST
from .dkd import DKD
from .kd import BinaryKLDiv, KLDiv
from .registry import (
                       KDLossEntry,
                       create_kd_loss,
                       create_kd_loss_from_args,
                       get_kd_loss_entry,
                       list_kd_losses,
                       register_kd_loss,
)
from .review import ReviewKD
from .rkd import RKD

__all__ = ["KLDiv", "BinaryKLDiv", "DKD", "DIST", "RKD", "Correlation", "ReviewKD", "CRD", "KDLossEntry",
           "create_kd_loss", "create_kd_loss_from_args", "get_kd_loss_entry", "list_kd_losses", "register_kd_loss"]
