"""zoo: list the published VanillaKD students, or fetch one."""
from __future__ import annotations

from collections.abc import Sequence

from .train_args import _Parser, pos_float


def main(argv: Sequence[str] | None = None) -> int:
    p = _Parser(prog="vanillakd zoo", description="The published VanillaKD students (ImageNet-1k).")
    sub = p.add_subparsers(dest="action")
    sub.add_parser("list", help="list the models (the default)")
    f = sub.add_parser("fetch", help="download one (atomic, checked by loading it)")
    f.add_argument("name")
    f.add_argument("--dir", default=None, help="where to put it (default ~/.cache/vanillakd/zoo)")
    f.add_argument("--timeout", type=pos_float, default=8.0, help="network timeout in seconds")
    args = p.parse_args(argv)
    from .. import zoo
    if args.action == "fetch":
        path = zoo.fetch(args.name, args.dir, timeout=args.timeout)
        m = zoo.get(args.name)
        print(f"{path}\nvalidate with: python validate.py /path/to/imagenet --model {m.arch} --checkpoint {path}")
        return 0
    print(f"{'name':<24}{'architecture':<24}{'top-1':>7}{'top-5':>7}  file / url")
    for m in zoo.ZOO.values():
        print(f"{m.name:<24}{m.arch:<24}{m.top1:>7.2f}{m.top5:>7.2f}  {m.file}\n{'':<62}{m.url}")
    return 0
