"""train-crd: contrastive representation distillation (CRD); the same engine as train-fd, CRD by default."""
from __future__ import annotations

from collections.abc import Sequence

from ..errors import run_cli
from . import train_fd

PROG = "train-crd.py"


def main(argv: Sequence[str] | None = None) -> int:
    return train_fd.main(argv, prog=PROG, default_loss="crd")


def cli(argv: Sequence[str] | None = None) -> int:
    return run_cli(main, argv, prog=PROG)
