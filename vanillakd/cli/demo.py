"""demo: the offline Fashion-MNIST demo (teacher, scratch, KD and DKD students; ``tools.demo``)."""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from ..tools import demo as tool
from .train_args import _Parser, count, pos_float, pos_int, seed_int


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vanillakd demo", description=tool.__doc__)
    p.add_argument("--data", default="data/fashion-mnist", help="Fashion-MNIST ImageFolder (prepared if missing)")
    p.add_argument("--source", default=None, help="folder with the idx files (default: Debian's package)")
    p.add_argument("--output", default="runs/demo")
    p.add_argument("--teacher-model", default="test_resnet")
    p.add_argument("--teacher-per-class", type=pos_int, default=2000)
    p.add_argument("--teacher-epochs", type=pos_int, default=4)
    p.add_argument("--teacher-lr", type=pos_float, default=3e-3)
    p.add_argument("--student-model", default="test_resnet")
    p.add_argument("--student-per-class", type=pos_int, default=200)
    p.add_argument("--student-epochs", type=pos_int, default=15)
    p.add_argument("--student-lr", type=pos_float, default=3e-3)
    p.add_argument("--val-per-class", type=pos_int, default=300)
    p.add_argument("--batch-size", type=pos_int, default=64)
    p.add_argument("--temperature", type=pos_float, default=4.0)
    p.add_argument("--workers", type=count, default=1)
    p.add_argument("--threads", type=pos_int, default=1,
                   help="torch CPU threads (tiny models on 2 cores: one thread and one loader worker are fastest)")
    p.add_argument("--seed", type=seed_int, default=0)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ..outputs import setup_console_logging
    setup_console_logging()
    from .run_config import run_train_argv
    text = tool.run_demo(args, run_train_argv)
    print("\nFashion-MNIST, val " + f"{args.val_per_class}/class:\n" + text)
    return 0
