"""bench: img/s of the KD training step and of its parts, or of the input pipeline (``--data``)."""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from ..checkpoint import atomic_write_text, check_writable_file, writable_folder
from ..tools import bench
from ..tools.bench import STEP_KEYS
from ..tools.bench_data import A2_FLAGS
from .train_args import _Parser, count, pos_int


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vanillakd bench", description=bench.__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", default="test_resnet")
    p.add_argument("--teacher", default="resnet10t")
    p.add_argument("--img-size", type=pos_int, default=None, help="default 32 (with --data: 224, as --data-img-size)")
    p.add_argument("--batch-size", type=pos_int, default=None, help="default 64 (with --data: as --data-batch-size)")
    p.add_argument("--num-classes", type=pos_int, default=10)
    p.add_argument("--kd-loss", default="kd")
    p.add_argument("--opt", default="lamb")
    p.add_argument("--steps", type=pos_int, default=10, help="timed steps per round")
    p.add_argument("--rounds", type=pos_int, default=3, help="interleaved rounds; the median round counts")
    p.add_argument("--warmup", type=count, default=3)
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="default: on for CUDA")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="default: on for conv nets on CUDA")
    p.add_argument("--compile", action="store_true", help="torch.compile student and teacher in (a), (b), (c), (e)")
    p.add_argument("--cache-topk", type=count, default=10, help="(e): top-k of the cache (0 = full logits)")
    p.add_argument("--only", nargs="+", choices=STEP_KEYS, default=None, help="measure only these")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=pos_int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--data", action="store_true",
                   help="measure the input pipelines instead (flags under --data mode below)")
    add_data_bench_args(p)
    return p


def add_data_bench_args(p: argparse.ArgumentParser) -> None:
    """The flags of ``bench --data`` (``tools.bench_data``)."""
    g = p.add_argument_group("--data mode")
    g.add_argument("--data-dir", default=None, help="a folder of class folders of images (default: synthetic JPEGs)")
    g.add_argument("--num-images", type=pos_int, default=None,
                   help="synthetic JPEGs to write (default 512); with --data-dir, how many of its images to use "
                        "(spread over its classes; default all)")
    g.add_argument("--data-img-size", type=pos_int, default=None,
                   help="same as --img-size in --data mode (default 224)")
    g.add_argument("--data-batch-size", type=pos_int, default=None,
                   help="same as --batch-size in --data mode (default 64)")
    g.add_argument("--data-workers", type=count, nargs="+", default=[0, 2], help="worker counts to measure")
    g.add_argument("--with-kd", action="store_true",
                   help="also time the loader feeding the KD step of --student <- --teacher (--compile, --amp ...)")
    g.add_argument("--pipelines", nargs="+", default=["cpu", "gpu"], choices=["cpu", "gpu"])
    g.add_argument("--recipe-flags", nargs=argparse.REMAINDER, default=None,
                   help="augmentation flags of the training scripts (default: the A2 recipe's: "
                        + " ".join(A2_FLAGS) + ")")


# (the step bench's name, the --data mode's name, the step bench's default, the --data mode's default)
_SIZES = (("img_size", "data_img_size", 32, 224), ("batch_size", "data_batch_size", 64, 64))


def resolve_sizes(parser: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """``--img-size`` / ``--batch-size`` apply in both modes; in ``--data`` mode ``--data-img-size`` /
    ``--data-batch-size`` are other names for them (two disagreeing values are an error)."""
    for name, data_name, default, data_default in _SIZES:
        given, data_given = getattr(a, name), getattr(a, data_name)
        if not a.data:
            setattr(a, name, default if given is None else given)
            continue
        if given is not None and data_given is not None and given != data_given:
            parser.error(f"--{name.replace('_', '-')} {given} and --{data_name.replace('_', '-')} {data_given} "
                         "disagree; give one of them")
        setattr(a, data_name, next((v for v in (data_given, given) if v is not None), data_default))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    a = parser.parse_args(argv)
    resolve_sizes(parser, a)
    command = "vanillakd bench " + " ".join(argv)
    if a.json:  # its folder made and checked before the benchmark, which takes minutes
        writable_folder(Path(a.json).parent, "--json folder")
        check_writable_file(a.json, "--json")
    from .run_config import parse_run_config
    if a.data:
        from ..tools.bench_data import data_bench, print_data_table
        res = bench.in_temp_dir(data_bench, a, command, parse_run_config)
        print_data_table(res)
    else:
        res = bench.in_temp_dir(bench.step_bench, a, command, parse_run_config)
        bench.print_step_table(res)
    if a.json:
        atomic_write_text(json.dumps(res, indent=2) + "\n", a.json)
    return 0
