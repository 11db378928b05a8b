"""train-kd: logit distillation (KD, BKD, DKD, DIST), several students per teacher pass."""
from __future__ import annotations

from typing import Sequence

from ..errors import run_cli
from .train_args import build_train_parser, parse_train_args


def main(argv: Sequence[str] | None = None) -> int:
    from ..losses import list_kd_losses
    parser = build_train_parser("train-kd.py", "Distill a teacher's logits into one or more timm students. "
                                f"--kd-loss: {', '.join(list_kd_losses('logits'))}, or none (no teacher).")
    args = parse_train_args(parser, argv)
    from ..train import run  # heavy imports after argument parsing, so --help is instant
    run(args, loss_kind="logits")
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    return run_cli(main, argv, prog="train-kd.py")
