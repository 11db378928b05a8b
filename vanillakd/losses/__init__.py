"""Distillation losses, one file per method, all reachable by name through the registry."""
from .registry import (KDLossEntry, create_kd_loss, create_kd_loss_from_args, get_kd_loss_entry,
                       list_kd_losses, register_kd_loss)
from .kd import BinaryKLDiv, KLDiv
from .dkd import DKD
from .dist import DIST
from .rkd import RKD
from .correlation import Correlation
from .review import ReviewKD
from .crd import CRD

__all__ = ["KLDiv", "BinaryKLDiv", "DKD", "DIST", "RKD", "Correlation", "ReviewKD", "CRD", "KDLossEntry", "create_kd_loss", "create_kd_loss_from_args",
           "get_kd_loss_entry", "list_kd_losses", "register_kd_loss"]
