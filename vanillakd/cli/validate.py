"""validate: top-1 / top-5 / loss of a checkpoint on an ImageFolder split (timm validate.py's flags); the
implementation is ``vanillakd.validation``."""
from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence

from ..errors import run_cli
from ..validation import ValidateConfig, check_results_file, validate, write_results
from .train_args import (
    INTERPOLATIONS,
    _Parser,
    add_dataset_flags,
    count,
    finite,
    fraction,
    pos_float,
    pos_int,
    resolve_in_chans,
)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="validate.py", description=(
        "Evaluate a checkpoint on DIR/val (or --split). The architecture, head size, input size, normalisation, "
        "interpolation and crop come from the checkpoint when it records them (vanillakd training checkpoints do); "
        "a flag given overrides it, with a warning."))
    p.add_argument("data_dir", metavar="DIR")
    p.add_argument("--split", default="validation", help="split folder; 'validation' also finds val/")
    add_dataset_flags(p, splits=False)
    p.add_argument("--model", "-m", default=None,
                   help="timm architecture (default: the one the checkpoint records; required for files naming none)")
    p.add_argument("--checkpoint", default="", help="weights file (state_dict, or dict with state_dict / model ...)")
    p.add_argument("--zoo", default=None, metavar="NAME",
                   help="a published VanillaKD student: sets --model and --checkpoint (fetched if missing)")
    p.add_argument("--zoo-dir", default=None, help="where zoo files live (default ~/.cache/vanillakd/zoo)")
    p.add_argument("--pretrained", action="store_true", help="timm's pretrained weights when no --checkpoint")
    p.add_argument("--use-ema", action="store_true",
                   help="take the EMA weights from the checkpoint (an error when it holds none)")
    p.add_argument("--num-classes", type=pos_int, default=None, help="defaults to the number of class folders")
    p.add_argument("--gp", default=None)
    # the eval transform: unset, each comes from the checkpoint's data_config, else timm's config of --model
    p.add_argument("--img-size", type=pos_int, default=None)
    p.add_argument("--in-chans", type=pos_int, default=None)
    p.add_argument("--input-size", default=None, nargs=3, type=pos_int, metavar="N")
    p.add_argument("--crop-pct", type=fraction, default=None)
    p.add_argument("--crop-mode", default=None, choices=["center", "squash", "border"])
    p.add_argument("--mean", type=finite, nargs="+", default=None)
    p.add_argument("--std", type=pos_float, nargs="+", default=None)
    p.add_argument("--interpolation", default="", choices=[""] + INTERPOLATIONS)
    p.add_argument("-b", "--batch-size", type=pos_int, default=256)
    p.add_argument("-j", "--workers", type=count, default=4)
    p.add_argument("--amp", action="store_true")
    p.add_argument("--amp-dtype", default="auto", choices=["auto", "bfloat16", "float16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--pin-mem", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--teacher", default=None, help="also report top-1 agreement with this teacher")
    p.add_argument("--teacher-pretrained", default=None, help="weights file of --teacher")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow pickled-code checkpoints you trust")
    p.add_argument("--results-file", default="", help="write the metrics to this .json or .csv file")
    p.add_argument("--results-format", default=None, choices=["json", "csv"], help="default: from the extension")
    p.add_argument("--progress", dest="progress", action="store_true", default=None)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def config_from_args(args: argparse.Namespace) -> ValidateConfig:
    """The parsed flags as the core's ``ValidateConfig`` (``--results-file`` / ``--results-format`` stay here)."""
    return ValidateConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ValidateConfig)})


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .run_config import check_channels
    resolve_in_chans(args)
    if args.in_chans or args.input_size:  # else the channels come from the checkpoint, checked when it is read
        check_channels(args)  # --mean / --std / --input-img-mode against them, as training checks them
    from ..outputs import setup_console_logging
    log = setup_console_logging()
    if args.results_file:
        check_results_file(args.results_file)  # before the evaluation, which may take a while
    result = validate(config_from_args(args))
    agreement = f" agreement {result['agreement']:.2f}" if "agreement" in result else ""
    log.info(f"* top1 {result['top1']:.3f} ({result['top1_err']:.3f} err) top5 {result['top5']:.3f} "
             f"({result['top5_err']:.3f} err) loss {result['loss']:.4f}{agreement} on {result['images']} images")
    if args.results_file:
        write_results(result, args.results_file, args.results_format)
    return 0


def cli(argv: Sequence[str] | None = None) -> int:
    return run_cli(main, argv, prog="validate.py")

