"""ImageFolder datasets (``DIR/train/<class>/...``, ``DIR/val/<class>/...``) through timm, checked up front.

timm silently drops class folders without images and builds its class list from the files it finds, so a
missing class would shift every label after it; we compare against the folder listing instead.

A file that cannot be decoded when read (the start-up scan reads headers only, or was off) is skipped as timm's
dataset skips it: the next file in the list takes its place, so a batch keeps its size and the stream stays
replayable. Both data pipelines go through ``skip_unreadable``, so they skip the same files with the same
warning naming each.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError
from timm.data import ImageDataset
from timm.data.readers.class_map import load_class_map

from ..errors import UserError
from .check import scan_images

VAL_SPLIT_NAMES = ("val", "validation", "eval", "evaluation", "test")
# what PIL raises for a file it cannot decode: OSError for truncated, damaged and unidentified files, the others
# from format plugins on damaged headers; and its refusal of images over twice Image.MAX_IMAGE_PIXELS
UNREADABLE = (OSError, ValueError, EOFError, SyntaxError, Image.DecompressionBombError)
MAX_SKIPS = 10  # timm's default: so many unreadable files in a row mean damaged data, not a stray bad file
_log = logging.getLogger("vanillakd")


def find_split(root: Path, split: str) -> Path:
    """The folder of ``split`` below ``root``; 'validation' also matches val/, eval/ ... as timm does."""
    candidates = [split] + (list(VAL_SPLIT_NAMES) if split in VAL_SPLIT_NAMES else [])
    for name in candidates:
        if (root / name).is_dir():
            return root / name
    tried = " or ".join(f"{root / n}" for n in dict.fromkeys(candidates))
    raise UserError(f"split {split!r} missing: no folder {tried}; the data dir holds one folder per split, "
                    f"DIR/train/<class>/<images> and DIR/val/<class>/<images>{_layout_hint(root)}")


def _layout_hint(root: Path) -> str:
    """What ``root`` looks like when it is not a folder of splits: a split folder itself, or a class folder list."""
    try:
        folders = class_folders(root)
    except OSError:
        return ""
    split_names = {"train", *VAL_SPLIT_NAMES}
    if not folders or split_names & {f.lower() for f in folders}:
        return ""
    shown = ", ".join(folders[:3]) + (", ..." if len(folders) > 3 else "")
    if root.name.lower() in split_names:
        return (f"; {root} looks like a split folder itself (its subfolders {shown} are classes): "
                f"pass its parent {root.resolve().parent}")
    return f"; {root}'s subfolders ({shown}) look like classes: put them in {root}/train/ and {root}/val/"


def check_data_root(data_dir: str | os.PathLike) -> Path:
    root = Path(data_dir)
    if not root.exists():
        raise UserError(f"data dir {root} does not exist")
    if not root.is_dir():
        raise UserError(f"data dir {root} is not a folder")
    return root


def class_folders(split_dir: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


@dataclass
class SplitDataset:
    """One split of a dataset of any --dataset kind (sources.py), with what KD needs to know about its samples."""
    dataset: object  # folder: timm ImageDataset; torch / hfds: sources.Selected; wds: shards.ShardDataset
    root: Path | str  # folder: the split folder; otherwise a description for messages
    classes: list[str]
    kind: str = "folder"
    source: str = ""  # a digest of the data for kinds other than folders (the teacher cache's manifest)

    @property
    def streaming(self) -> bool:
        return self.kind == "wds"

    def labels(self, why: str = "") -> np.ndarray:
        """Every sample's label, without reading images; streamed shards cannot say up front."""
        if self.kind == "folder":
            samples = self.dataset.reader.samples
            return np.fromiter((t for _, t in samples), dtype=np.int64, count=len(samples))
        if self.streaming:
            raise UserError(f"{why or 'this'} needs the label of every training sample up front, and WebDataset "
                            "shards are streamed (labels are known only when read); use a folder, torch/ or hfds/ "
                            "dataset")
        return self.dataset.labels()

    def keep(self, indices: list[int]) -> None:
        """Keep only the samples at ``indices`` (ascending)."""
        if self.kind == "folder":
            reader = self.dataset.reader
            reader.samples = [reader.samples[i] for i in indices]
        else:
            self.dataset.indices = self.dataset.indices[np.asarray(indices, dtype=np.int64)]

    def identity(self) -> str:
        """A digest of which samples (and labels) the split holds: the teacher cache checks it."""
        from ..teachers.cache import samples_digest
        if self.kind == "folder":
            return samples_digest(self.dataset.reader.samples, self.root)
        import hashlib
        h = hashlib.sha256(self.source.encode())
        if not self.streaming:
            h.update(np.asarray(self.dataset.indices, dtype=np.int64).tobytes())
            h.update(self.dataset.labels().tobytes())
        return h.hexdigest()


def take_fraction(split: SplitDataset, fraction: float, seed: int = 0) -> None:
    """Keep a class-balanced, deterministic ``fraction`` of the split: ``round(fraction * n_c)`` images of each
    class (at least one), drawn with ``seed``; the same (fraction, seed) always gives the same files."""
    if not 0 < fraction <= 1:
        raise UserError(f"--train-fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return
    by_class: dict[int, list[int]] = {}
    for i, target in enumerate(split.labels("--train-fraction (class-balanced)").tolist()):
        by_class.setdefault(target, []).append(i)
    rng = np.random.default_rng(seed)
    keep = []
    for target in sorted(by_class):
        idx = by_class[target]
        n = max(1, int(round(fraction * len(idx))))
        keep.extend(sorted(rng.choice(idx, size=n, replace=False).tolist()))
    split.keep(sorted(keep))


def drop_bad_images(split: SplitDataset, policy: str = "fail", workers: int = 0, log=None) -> None:
    """``policy`` 'fail': stop listing truncated / non-image files; 'skip': drop them and say how many;
    'off': no scan (for data already checked with ``vanillakd check-data``)."""
    if policy == "off":
        return
    if split.kind != "folder":
        if log:
            log(f"--bad-images: no start-up scan for --dataset {split.kind}/ (it checks image files; "
                + ("shards are streamed, a bad sample stops the run naming its shard and key)" if split.streaming
                   else "this dataset's images are decoded when read)"))
        return
    reader = split.dataset.reader
    bad = scan_images([p for p, _ in reader.samples], workers)
    if not bad:
        return
    if policy == "fail":
        listed = "; ".join(f"{p}: {why}" for p, why in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise UserError(f"{len(bad)} bad image file(s) in {split.root}: {listed}{more} (run vanillakd check-data, "
                        "or pass --bad-images skip to leave them out)")
    bad_paths = {p for p, _ in bad}
    reader.samples = [s for s in reader.samples if s[0] not in bad_paths]
    if log:
        log(f"skipped {len(bad)} bad image file(s) in {split.root} (--bad-images skip)")


def unreadable_reason(e: BaseException) -> str:
    if isinstance(e, UnidentifiedImageError):  # its text is the file object's repr
        return "not an image"
    return str(e) or type(e).__name__


def skip_unreadable(samples: Sequence[tuple[str, int]], index: int, load: Callable[[str], object],
                    skipped: int = 0) -> tuple[object, int, int]:
    """``(load(path), target, index)`` of sample ``index`` or, when ``load`` cannot decode its file, of the next
    sample in the list whose file it can (timm's rule), with a warning naming each file skipped. ``skipped``:
    files skipped already for this sample."""
    while True:
        path, target = samples[index]
        try:
            return load(path), target, index
        except UNREADABLE as e:
            index = (index + 1) % len(samples)
            skipped += 1
            if skipped >= MAX_SKIPS:
                raise UserError(f"{skipped} image files in a row cannot be decoded, the last {path} "
                                f"({unreadable_reason(e)}): run vanillakd check-data on the data") from None
            warn_skipped(path, e, samples[index][0])


def warn_skipped(path: str, error: BaseException, replacement: str) -> None:
    _log.warning(f"skipped image {path}: {unreadable_reason(error)}; {replacement} is used in its place "
                "(vanillakd check-data lists every bad file)")


def open_image(source: str | BinaryIO, mode: str = "RGB") -> Image.Image:
    """The file (a path or a binary file) decoded as timm's dataset decodes it, converted to ``mode`` ('' keeps
    the file's own)."""
    with open(source, "rb") if isinstance(source, (str, os.PathLike)) else nullcontext(source) as f:
        img = Image.open(f)
        img = img.convert(mode) if mode else img
        img.load()  # decode here, where errors are caught, not later in the transform
    return img


class FolderImages(ImageDataset):
    """timm's ImageDataset over a class folder, its unreadable files skipped through ``skip_unreadable``: timm's
    own skip names no damaged file and lets PIL's size-limit error end the run with a traceback."""

    def __getitem__(self, index: int):
        img, target, _ = skip_unreadable(self.reader.samples, index, self._open)
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target

    def _open(self, path: str) -> Image.Image:
        return open_image(path, self.input_img_mode)


def read_class_map(path: str) -> dict:
    """timm's class map file, whose indices must be 0..N-1, each once: a name listed twice in a text map
    would leave an index without a class and put another past the head."""
    if not os.path.isfile(path):
        raise UserError(f"--class-map {path} does not exist")
    cmap = load_class_map(path)
    if sorted(cmap.values()) != list(range(len(cmap))):
        raise UserError(f"--class-map {path}: its indices are not 0..{len(cmap) - 1}, one per class (a name "
                        "listed twice?)")
    return cmap


def _load_class_map(path: str, split_dir: Path, folders: list[str]) -> dict:
    """timm's class map file; names without a class folder are refused (timm would silently train without them)."""
    cmap = read_class_map(path)
    extra = [c for c in cmap if c not in folders]
    if extra:
        raise UserError(f"--class-map {path} does not match the data: no class folder in {split_dir} for "
                        f"{extra[:5]}" + (f" and {len(extra) - 5} more" if len(extra) > 5 else ""))
    return cmap


def build_split(split_dir: Path, is_training: bool, class_map: str = "", input_img_mode: str = "RGB") -> SplitDataset:
    """A timm ImageDataset for one split, after checking it has class folders and images in each."""
    folders = class_folders(split_dir)
    if not folders:
        raise UserError(f"{split_dir} has no class folders (expected {split_dir}/<class>/<image files>)")
    cmap = _load_class_map(class_map, split_dir, folders) if class_map else ""
    try:  # what timm's create_dataset builds for a folder, with our handling of unreadable files
        ds = FolderImages(str(split_dir), class_map=cmap, input_img_mode=input_img_mode or "RGB")
    except RuntimeError as e:
        if "Found 0 images" not in str(e):
            raise
        ds = None
    if ds is None or len(ds) == 0:
        raise UserError(f"no images found in {split_dir} (looked in {len(folders)} class folders)")
    reader = ds.reader
    found = set(reader.class_to_idx)
    empty = [c for c in folders if c not in found and (not cmap or c in cmap)]
    if empty:
        raise UserError(f"class folder {split_dir / empty[0]} has no images"
                        + (f" ({len(empty) - 1} more empty class folders)" if len(empty) > 1 else ""))
    classes = sorted(reader.class_to_idx, key=reader.class_to_idx.get)
    return SplitDataset(ds, split_dir, classes)


def build_train_val(data_dir: str | os.PathLike, train_split: str = "train", val_split: str = "validation",
                    class_map: str = "", num_classes: int | None = None,
                    input_img_mode: str = "RGB") -> tuple[SplitDataset, SplitDataset, int]:
    """Train and val datasets with identical class lists, and the number of classes."""
    root = check_data_root(data_dir)
    train = build_split(find_split(root, train_split), is_training=True, class_map=class_map,
                        input_img_mode=input_img_mode)
    val = build_split(find_split(root, val_split), is_training=False, class_map=class_map,
                      input_img_mode=input_img_mode)
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        detail = (f"only in {train.root.name}: {only_train[:5]}" if only_train else "") + \
                 ("; " if only_train and only_val else "") + \
                 (f"only in {val.root.name}: {only_val[:5]}" if only_val else "")
        raise UserError(f"train and val class lists differ ({detail or 'different order'})")
    n = len(train.classes)
    if num_classes is not None and num_classes != n:
        raise UserError(f"--num-classes {num_classes} disagrees with the data: {train.root} has {n} classes")
    return train, val, n


def build_eval_split(data_dir: str | os.PathLike, split: str = "validation", class_map: str = "",
                     input_img_mode: str = "RGB") -> SplitDataset:
    return build_split(find_split(check_data_root(data_dir), split), is_training=False, class_map=class_map,
                       input_img_mode=input_img_mode)
