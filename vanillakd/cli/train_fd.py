"""train-fd: feature distillation (Correlation, RKD, ReviewKD) for any timm models with forward_intermediates."""
from __future__ import annotations

from typing import Sequence

from ..errors import run_cli
from .train_args import build_train_parser, parse_train_args

PROG, DEFAULT_LOSS = "train-fd.py", "correlation"


def main(argv: Sequence[str] | None = None, prog: str = PROG, default_loss: str = DEFAULT_LOSS) -> int:
    from ..losses import list_kd_losses
    parser = build_train_parser(prog, "Distil a teacher's features into one or more timm students. --kd-loss: "
                                f"{', '.join(list_kd_losses('features'))} (logit methods work here too).",
                                default_loss=default_loss)
    args = parse_train_args(parser, argv)
    from ..train import run
    run(args, loss_kind="features")
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    return run_cli(main, argv, prog=PROG)
