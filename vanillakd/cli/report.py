"""report: tables and plots from finished training output folders."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .train_args import _Parser


def main(argv: Sequence[str] | None = None) -> int:
    p = _Parser(prog="vanillakd report", description="results.csv, results.md and curve / fraction / KD-gap plots "
                "from one or more finished run folders (searched recursively). Runs are pooled over seeds only "
                "when model, teacher, data, fraction, method and recipe agree; plots need matplotlib.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", default=None, help="where to write (default: the first RUN_DIR)")
    g = p.add_argument_group("Keep only the runs trained on")
    g.add_argument("-d", "--dataset", default=None, help="this --dataset (folder, torch/cifar100, hfds/..., wds/...)")
    g.add_argument("--train-split", default=None)
    g.add_argument("--val-split", default=None)
    args = p.parse_args(argv)
    from ..outputs import setup_console_logging
    from ..tools.report import report
    setup_console_logging()
    out = Path(args.out or args.run_dirs[0])
    only = {"dataset": args.dataset, "train_split": args.train_split, "val_split": args.val_split}
    results = report([Path(d) for d in args.run_dirs], out, only)
    print((out / "results.md").read_text(), end="")
    print(f"{len(results)} runs; wrote {out / 'results.csv'}, {out / 'results.md'}"
          + (" and plots" if any(out.glob("*.png")) else ""))
    return 0
