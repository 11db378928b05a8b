"""report: tables and plots from finished training output folders."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .train_args import _Parser


def main(argv: Sequence[str] | None = None) -> int:
    p = _Parser(prog="vanillakd report", description="results.csv, results.md and curve / fraction plots from "
                "one or more finished run folders (searched recursively).")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", default=None, help="where to write (default: the first RUN_DIR)")
    args = p.parse_args(argv)
    from ..report import report
    out = Path(args.out or args.run_dirs[0])
    results = report([Path(d) for d in args.run_dirs], out)
    print((out / "results.md").read_text(), end="")
    print(f"{len(results)} runs; wrote {out / 'results.csv'}, {out / 'results.md'} and plots")
    return 0
