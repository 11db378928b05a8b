"""compare: KD methods x training-set fractions x seeds under one recipe and one teacher (``tools.compare``)."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..errors import UserError
from ..tools import compare as tool
from ..tools.compare import GRID_KEYS
from .config_file import config_values, load_yaml_mapping
from .train_args import _Parser, fraction, pos_int, seed_int

RECIPE_HINT = ("train-kd's flags (the shared recipe) go after --, e.g. vanillakd compare DIR --model M --teacher T "
               "--teacher-pretrained FILE -- --epochs 3 --lr 1e-3")


def build_parser() -> argparse.ArgumentParser:
    methods = tool.compare_methods()
    p = _Parser(prog="vanillakd compare", description=tool.__doc__,
                epilog="Any other flag (after --) is passed to every train-kd run: the shared recipe.")
    p.add_argument("data_dir", nargs="?", default=None, metavar="DIR")
    p.add_argument("-c", "--config", default="", help="YAML grid: any of " + ", ".join(sorted(GRID_KEYS)))
    p.add_argument("--model", default=None, help="the student architecture (one for every cell)")
    p.add_argument("--methods", nargs="+", default=None, choices=methods, metavar="METHOD",
                   help=f"any of {', '.join(methods)} ('none' is the student without KD; feature methods train "
                        "with train-fd / train-crd); default: none kd dkd dist")
    p.add_argument("--fractions", nargs="+", type=fraction, default=None)
    p.add_argument("--seeds", nargs="+", type=seed_int, default=None)
    p.add_argument("--teacher", default=None)
    p.add_argument("--teacher-pretrained", default=None, help="teacher weights; or --train-teacher-epochs")
    p.add_argument("--train-teacher-epochs", type=pos_int, default=None,
                   help="train the teacher here first (with the shared recipe; reused when present)")
    p.add_argument("--train-teacher-fraction", type=fraction, default=None)
    p.add_argument("--output", default=None, help="the comparison's folder")
    g = p.add_argument_group("Dataset (train-kd's flags, for every run)")
    g.add_argument("-d", "--dataset", default=None, help="folder (default), torch/NAME, hfds/NAME or wds/NAME")
    g.add_argument("--train-split", default=None)
    g.add_argument("--val-split", default=None)
    g.add_argument("--class-map", default=None)
    g.add_argument("--input-img-mode", default=None)
    g.add_argument("--dataset-download", action="store_true", default=None)
    return p


def parse_argv(argv: Sequence[str]) -> tuple[dict, list[str]]:
    """(compare's flags as a dict, the shared train-kd recipe: whatever follows ``--``)."""
    argv = list(argv)
    recipe: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, recipe = argv[:i], argv[i + 1:]
    parser = build_parser()
    flags, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}; {RECIPE_HINT}")
    given = {k: v for k, v in vars(flags).items() if v is not None}
    return ({**grid_values(parser, flags.config), **given} if flags.config else vars(flags)), recipe


def grid_values(parser: argparse.ArgumentParser, path: str) -> dict:
    """The grid file's values of compare's own flags, read safely and parsed as those flags on the command line
    (the tool reads the file again for its other keys and reports unknown ones). ``methods`` and ``recipe`` are
    only shape-checked here: the tool names the methods it cannot run, and train-kd parses the recipe."""
    what = f"--config {path}"
    cfg = load_yaml_mapping(path, what)
    empty = next((k for k, v in cfg.items() if v is None or v == []), None)
    if empty is not None:  # compare's flags default to None only so the file can give them: null gives nothing
        raise UserError(f"{what}: {empty} has no value (leave the key out for the tool's default)")
    own = {a.dest for a in parser._actions} - {"help", "config", "methods"}
    values = config_values(parser, {k: v for k, v in cfg.items() if k.replace("-", "_") in own}, what)
    methods, recipe = cfg.get("methods"), cfg.get("recipe")
    if isinstance(methods, str):
        methods = [methods]
    if methods is not None and not (isinstance(methods, list) and all(isinstance(m, str) for m in methods)):
        raise UserError(f"{what}: methods must be a list of method names, got {methods!r}")
    if recipe is not None and not (isinstance(recipe, list) and all(
            isinstance(x, (str, int, float)) and not isinstance(x, bool) for x in recipe)):
        raise UserError(f"{what}: recipe must be a list of train-kd arguments (text or numbers), got {recipe!r}")
    return {**values, **({"methods": methods} if methods is not None else {})}


def load_grid(argv: Sequence[str]) -> tuple[dict, list[str]]:
    """The grid from YAML (if any) overridden by flags; the rest of argv is the shared train-kd recipe."""
    return tool.build_grid(*parse_argv(argv))


def main(argv: Sequence[str] | None = None) -> int:
    from ..outputs import setup_console_logging
    setup_console_logging()
    from .run_config import run_train_argv
    results, out = tool.compare(*load_grid(sys.argv[1:] if argv is None else argv), run_argv=run_train_argv)
    print((out / "results.md").read_text(), end="")
    print(f"{len(results)} runs; {out / 'results.csv'}, {out / 'results.md'}"
          + (f", plots in {out}" if any(out.glob("*.png")) else ""))
    return 0
