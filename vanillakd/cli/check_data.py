"""check-data: list truncated or non-image files in an ImageFolder (the scan training runs at start-up)."""
from __future__ import annotations

from collections.abc import Sequence

from .train_args import _Parser, count


def main(argv: Sequence[str] | None = None) -> int:
    p = _Parser(prog="vanillakd check-data", description=__doc__)
    p.add_argument("data_dir", metavar="DIR", help="an ImageFolder root (its splits are scanned) or one split")
    p.add_argument("-j", "--workers", type=count, default=4)
    args = p.parse_args(argv)
    from timm.data.readers.reader_image_folder import find_images_and_targets

    from ..data.check import scan_images
    from ..data.folder import check_data_root
    root = check_data_root(args.data_dir)
    # an ImageFolder root holds split folders of class folders; a split holds class folders of images
    splits = [d for d in sorted(root.iterdir()) if d.is_dir() and any(c.is_dir() for c in d.iterdir())]
    splits = splits or [root]
    total_bad = 0
    for split in splits:
        samples, _ = find_images_and_targets(str(split))
        bad = scan_images([s for s, _ in samples], args.workers)
        total_bad += len(bad)
        for path, why in bad:
            print(f"{path}: {why}")
        print(f"{split}: {len(samples)} images, {len(bad)} bad")
    return 1 if total_bad else 0
