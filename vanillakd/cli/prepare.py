"""prepare: write a dataset as the ImageFolder layout the training scripts read."""
from __future__ import annotations

from collections.abc import Sequence

from .train_args import _Parser


def main(argv: Sequence[str] | None = None) -> int:
    p = _Parser(prog="vanillakd prepare", description="Write a dataset as DIR/train/<class>, DIR/val/<class>.")
    p.add_argument("dataset", choices=["fashion-mnist"])
    p.add_argument("out_dir", metavar="DIR")
    p.add_argument("--source", default=None, help="folder with the idx files (default: Debian's package)")
    p.add_argument("--no-download", action="store_true", help="never try torchvision's download")
    args = p.parse_args(argv)
    from ..data.fashion_mnist import is_prepared, prepare_fashion_mnist
    existed = is_prepared(args.out_dir)
    out = prepare_fashion_mnist(args.out_dir, args.source, download=not args.no_download)
    print(f"{'already prepared' if existed else 'wrote'}: {out} (train 60000, val 10000 images, 10 classes)")
    return 0
