"""train-kd: logit distillation (KD, BKD, DKD, DIST), several students per teacher pass."""
from __future__ import annotations

from collections.abc import Sequence

from ..errors import run_cli


def main(argv: Sequence[str] | None = None) -> int:
    from ..losses import list_kd_losses
    from .run_config import parse_run_config
    cfg = parse_run_config(argv, "train-kd.py", description="Distill a teacher's logits into one or more timm "
                           f"students. --kd-loss: {', '.join(list_kd_losses('logits'))}, or none (no teacher).")
    from ..train import run
    run(cfg, loss_kind="logits")
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    return run_cli(main, argv, prog="train-kd.py")
