"""train-fd: feature distillation (Correlation, RKD, ReviewKD) for any timm models with forward_intermediates."""
from __future__ import annotations

from collections.abc import Sequence

from ..errors import run_cli

PROG, DEFAULT_LOSS = "train-fd.py", "correlation"


def main(argv: Sequence[str] | None = None, prog: str = PROG, default_loss: str = DEFAULT_LOSS) -> int:
    from ..losses import list_kd_losses
    from .run_config import parse_run_config
    cfg = parse_run_config(argv, prog, default_loss, "Distil a teacher's features into one or more timm students. "
                           f"--kd-loss: {', '.join(list_kd_losses('features'))} (logit methods work here too).")
    from ..train import run
    run(cfg, loss_kind="features")
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    return run_cli(main, argv, prog=PROG)
