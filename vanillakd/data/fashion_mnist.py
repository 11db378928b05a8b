"""Fashion-MNIST (MIT licence) as an ImageFolder: ``DIR/train/<class>/*.png`` (60k), ``DIR/val/<class>/*.png`` (10k).

Sources, in order: a folder given by the user, Debian's ``dataset-fashion-mnist`` package, torchvision's
download (needs a network). The folder is written under a temporary name and renamed when complete, so an
interrupted run never leaves a half-written dataset that looks finished.
"""
from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from ..checkpoint import os_reason
from ..errors import UserError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["0_tshirt_top", "1_trouser", "2_pullover", "3_dress", "4_coat", "5_sandal", "6_shirt", "7_sneaker",
           "8_bag", "9_ankle_boot"]
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
COMPLETE_MARKER = ".complete"


def read_idx(path: Path) -> np.ndarray:
    """An idx file (optionally gzipped) as a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise UserError(f"{path} is not an idx file of unsigned bytes")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise UserError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {body.size}")
    return body.reshape(dims)


def _find(source: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        for cand in (source / name, source / "raw" / name, source / "FashionMNIST" / "raw" / name):
            if cand.is_file():
                return cand
    return None


def find_source(source: str | os.PathLike | None) -> Path | None:
    """A folder holding the four idx files, or None."""
    candidates = [Path(source)] if source else [DEBIAN_DIR]
    for cand in candidates:
        if all(_find(cand, stem) for pair in FILES.values() for stem in pair):
            return cand
    if source:
        raise UserError(f"{source} does not hold the Fashion-MNIST idx files "
                        f"({', '.join(s + '[.gz]' for pair in FILES.values() for s in pair)})")
    return None


def _download(into: Path) -> Path:
    from torchvision.datasets import FashionMNIST
    try:
        for train in (True, False):
            FashionMNIST(str(into), train=train, download=True)
    except Exception as e:  # noqa: BLE001 - any network failure becomes one line
        raise UserError(f"Fashion-MNIST is not installed and could not be downloaded ({type(e).__name__}); "
                        "install Debian's dataset-fashion-mnist package or pass --source DIR") from None
    return into / "FashionMNIST" / "raw"


def is_prepared(out_dir: str | os.PathLike) -> bool:
    return (Path(out_dir) / COMPLETE_MARKER).is_file()


def prepare_fashion_mnist(out_dir: str | os.PathLike, source: str | os.PathLike | None = None,
                          download: bool = True) -> Path:
    """Write Fashion-MNIST as an ImageFolder at ``out_dir`` (skipped when already complete)."""
    out = Path(out_dir)
    if is_prepared(out):
        return out
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists but is not a complete Fashion-MNIST folder; remove it or choose another")
    src = find_source(source)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        if src is None:
            if not download:
                raise UserError("Fashion-MNIST idx files not found; install Debian's dataset-fashion-mnist")
            src = _download(tmp / "download")
        for split, (images_stem, labels_stem) in FILES.items():
            images, labels = read_idx(_find(src, images_stem)), read_idx(_find(src, labels_stem))
            if len(images) != len(labels):
                raise UserError(f"{split}: {len(images)} images but {len(labels)} labels")
            for name in CLASSES:
                (tmp / split / name).mkdir(parents=True)
            for i, (img, label) in enumerate(zip(images, labels)):
                Image.fromarray(img, mode="L").save(tmp / split / CLASSES[label] / f"{i:05d}.png", compress_level=1)
        shutil.rmtree(tmp / "download", ignore_errors=True)
        (tmp / COMPLETE_MARKER).write_text("fashion-mnist\n")
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except OSError as e:  # a full disk, a read-only folder: one line, and no half-written folder left
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"could not write Fashion-MNIST to {out}: {os_reason(e, tmp if tmp.is_dir() else tmp.parent)}"
                        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def make_subset(source: str | os.PathLike, out_dir: str | os.PathLike, per_class: dict[str, int | None],
                seed: int = 0) -> Path:
    """An ImageFolder of symlinks holding ``per_class[split]`` images of each class (None: all), drawn
    with a fixed seed; rebuilt from scratch each time so it always matches its arguments."""
    source, out = Path(source), Path(out_dir)
    shutil.rmtree(out, ignore_errors=True)
    rng = np.random.default_rng(seed)
    for split, count in per_class.items():
        for cls_dir in sorted(p for p in (source / split).iterdir() if p.is_dir()):
            files = sorted(cls_dir.iterdir())
            if count is not None and count < len(files):
                files = [files[i] for i in sorted(rng.choice(len(files), count, replace=False))]
            dest = out / split / cls_dir.name
            dest.mkdir(parents=True)
            for f in files:
                (dest / f.name).symlink_to(f.resolve())
    return out
