"""``--dataset NAME``: timm's dataset names, built through timm's ``create_dataset`` and readers.

* ``""`` / ``folder``: ``DIR/train/<class>/*`` and ``DIR/val/<class>/*`` (folder.py, the default).
* ``torch/NAME``: the torchvision datasets timm knows (``cifar10``, ``cifar100``, ``mnist``, ``kmnist``,
  ``fashion_mnist``, ...), in DIR, fetched there with ``--dataset-download``.
* ``hfds/NAME``: a Hugging Face dataset, a hub name (timm's reader; DIR is its cache folder), or a folder
  written by ``save_to_disk`` (NAME, or DIR itself when NAME is empty).
* ``wds/NAME``: WebDataset shards in DIR (a folder or a URL prefix) described by timm's ``_info.json``;
  streamed (shards.py).

Map-style kinds come out as ``Selected`` views (an index list and a label map over the dataset), so the
training fraction, class maps and CRD's labels work on every one of them the same way.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .folder import SplitDataset, build_eval_split, build_train_val, read_class_map

TRAIN_NAMES = ("train", "training")
EVAL_NAMES = ("validation", "val", "valid", "eval", "evaluation", "test")
UNSUPPORTED = {"tfds": "TensorFlow datasets", "hfids": "streaming Hugging Face datasets"}


def dataset_kind(name: str) -> tuple[str, str]:
    """``(kind, rest)`` of a --dataset value; unknown names are refused in one line."""
    name = name or ""
    if name.lower() in ("", "folder", "imagefolder", "image_folder"):
        return "folder", ""
    prefix, sep, rest = name.partition("/")
    prefix = prefix.lower()
    if sep and prefix in ("torch", "hfds", "wds"):
        return prefix, rest
    if sep and prefix in UNSUPPORTED:
        raise UserError(f"--dataset {name}: {UNSUPPORTED[prefix]} ({prefix}/) are not supported; use hfds/, wds/ "
                        "or torch/")
    raise UserError(f"unknown --dataset {name!r}: use folder (the default), torch/NAME (e.g. torch/cifar100), "
                    "hfds/NAME or wds/NAME")


class Selected(torch.utils.data.Dataset):
    """``base`` (map-style, items ``(image, label)``) through ``indices`` and ``label_map``; converts images to
    ``mode`` and applies ``transform`` itself, so the base dataset's own transform stays None."""

    def __init__(self, base, labels: np.ndarray, label_map: np.ndarray | None = None, mode: str = "RGB"):
        self.base, self.mode = base, mode
        self.base_labels = np.asarray(labels, dtype=np.int64)
        self.label_map = label_map
        self.indices = np.arange(len(self.base_labels))
        self.transform = None

    def __len__(self) -> int:
        return len(self.indices)

    def labels(self) -> np.ndarray:
        labels = self.base_labels[self.indices]
        return self.label_map[labels] if self.label_map is not None else labels

    def __getitem__(self, index: int):
        img, _ = self.base[int(self.indices[index])]
        if self.mode and getattr(img, "mode", self.mode) != self.mode:
            img = img.convert(self.mode)
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels_at(index))

    def labels_at(self, index: int) -> int:
        label = self.base_labels[self.indices[index]]
        return self.label_map[label] if self.label_map is not None else label


def _class_map(path: str, classes: list[str], where: str) -> tuple[np.ndarray, list[str]]:
    """(label map old -> new, new class list) for a --class-map file over a dataset's ``classes``."""
    cmap = read_class_map(path)
    missing = [c for c in classes if c not in cmap]
    extra = [c for c in cmap if c not in classes]
    if missing or extra:
        detail = (f"classes of the data not in it: {missing[:5]}" if missing else "") + \
                 ("; " if missing and extra else "") + (f"names not in the data: {extra[:5]}" if extra else "")
        raise UserError(f"--class-map {path} does not match {where} ({detail})")
    new = sorted(cmap, key=cmap.get)
    return np.array([cmap[c] for c in classes], dtype=np.int64), new


def _split_name(split: str, kind: str, available: list[str] | None = None) -> str:
    """The dataset's own split for ``--train-split`` / ``--val-split``; eval names also find val/test."""
    if available is None:  # torchvision: a train flag only
        if split in TRAIN_NAMES:
            return "train"
        if split in EVAL_NAMES:
            return "test"
        raise UserError(f"split {split!r} missing: {kind} has train and test (validation) splits")
    if split in available:
        return split
    synonyms = EVAL_NAMES if split in EVAL_NAMES else TRAIN_NAMES if split in TRAIN_NAMES else ()
    for s in synonyms:
        if s in available:
            return s
    raise UserError(f"split {split!r} missing: {kind} has splits {sorted(available)}")


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\0")
    return h.hexdigest()


def _torch_split(name: str, root: str, split: str, download: bool, class_map: str, mode: str) -> SplitDataset:
    from timm.data import create_dataset
    which = _split_name(split, f"torch/{name}")
    try:
        ds = create_dataset(f"torch/{name}", root=root, split="train" if which == "train" else "validation",
                            download=download)
    except AssertionError as e:
        raise UserError(f"--dataset torch/{name}: {e or 'not a torchvision dataset timm supports'}") from None
    except ImportError as e:  # e.g. torchvision's ImageNet needs scipy
        raise UserError(f"--dataset torch/{name} needs a package that is not installed: {e}") from None
    except (RuntimeError, OSError) as e:
        hint = "" if download else "; pass --dataset-download to fetch it"
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"--dataset torch/{name} in {root}: {first}{hint}") from None
    targets = getattr(ds, "targets", None)
    if targets is None:
        raise UserError(f"--dataset torch/{name}: the dataset has no label list (targets); not supported here")
    labels = np.asarray(targets.numpy() if torch.is_tensor(targets) else targets, dtype=np.int64)
    classes = [str(c) for c in getattr(ds, "classes", None) or range(int(labels.max()) + 1)]
    label_map = None
    if class_map:
        label_map, classes = _class_map(class_map, classes, f"torch/{name}")
    data = getattr(ds, "data", None)
    content = np.ascontiguousarray(data.numpy() if torch.is_tensor(data) else data).tobytes() \
        if data is not None and not isinstance(data, list) else len(ds)
    view = Selected(ds, labels, label_map, mode)
    return SplitDataset(view, root, classes, kind="torch", source=_digest(name, which, content, labels.tobytes()))


def _hfds_split(name: str, root: str, split: str, class_map: str, mode: str) -> SplitDataset:
    from timm.data import ImageDataset

    from .hf_disk import ReaderHfDisk, is_saved_dataset, load_saved_split
    try:
        import datasets
    except ImportError:
        raise UserError("--dataset hfds/... needs the Hugging Face datasets package: pip install "
                        "'vanillakd[hf]' (or pip install datasets)") from None
    path = name or root
    if is_saved_dataset(path):
        available = sorted(datasets.load_from_disk(str(path)).keys()) if (Path(path) / "dataset_dict.json").is_file() \
            else None
        which = _split_name(split, str(path), available) if available else split
        reader = ReaderHfDisk(load_saved_split(path, which), f"{path} [{which}]")
        ds = ImageDataset(str(path), reader=reader, input_img_mode=mode)
        labels, classes, source = reader.labels, sorted(reader.class_to_idx, key=reader.class_to_idx.get), \
            reader.fingerprint
        where = str(path)
    else:
        if not name:
            raise UserError(f"--dataset hfds/: {root} is not a folder written by save_to_disk; give hfds/HUB_NAME")
        from timm.data import create_dataset
        try:
            ds = create_dataset(f"hfds/{name}", root=root, split=split, input_img_mode=mode)
        except (FileNotFoundError, ValueError, ConnectionError, OSError) as e:
            raise UserError(f"--dataset hfds/{name} split {split!r}: {str(e).splitlines()[0]}") from None
        reader = ds.reader
        labels = np.fromiter(reader.iter_targets(), dtype=np.int64)
        classes = sorted(reader.class_to_idx, key=reader.class_to_idx.get)
        source, where, which = getattr(reader.dataset, "_fingerprint", name), f"hfds/{name}", split
    label_map = None
    if class_map:
        label_map, classes = _class_map(class_map, classes, where)
    # the timm dataset decodes and converts; Selected owns the transform
    return SplitDataset(Selected(ds, labels, label_map, mode), where, classes, kind="hfds",
                        source=_digest(where, which, source, len(labels)))


def shard_url(root: str, name: str) -> str:
    """Where shard (or _info.json) ``name`` lives: ``root/name``, or ``root`` with ``{}`` replaced by the name
    (for commands such as ``pipe:aws s3 cp s3://bucket/imagenet/{} -``)."""
    return root.replace("{}", name) if "{}" in root else os.path.join(root, name)


def _wds_split(name: str, root: str, split: str, class_map: str, mode: str, training: bool,
               num_classes: int | None) -> SplitDataset:
    try:
        import webdataset as wds
    except ImportError:
        raise UserError("--dataset wds/... needs the webdataset package: pip install 'vanillakd[wds]' (or pip "
                        "install webdataset)") from None
    if class_map:
        raise UserError("--class-map is not supported with wds/ shards: their .cls labels are class indices already")
    info_path = shard_url(root, "_info.json")
    try:
        with wds.gopen(info_path) as f:
            info = json.load(f)
    except Exception as e:  # a file, a URL or a pipe: whatever gopen raises
        raise UserError(f"--dataset wds/{name}: cannot read {info_path} ({e.__class__.__name__}): shards need "
                        "timm's _info.json with each split's shard names and sizes") from None
    splits = info.get("splits") if isinstance(info, dict) else None
    if not isinstance(splits, dict):
        raise UserError(f"{info_path} has no 'splits': not timm's _info.json")
    which = _split_name(split, info_path, sorted(splits))
    # timm's _info.json: per split, the shard file names and the number of samples in each
    filenames, lengths = list(splits[which].get("filenames", [])), list(splits[which].get("shard_lengths", []))
    if not filenames or len(lengths) != len(filenames) or not sum(lengths):
        raise UserError(f"{info_path}: split {which!r} lists no filenames with shard_lengths; they are needed to "
                        "split shards exactly over ranks and workers")
    n = num_classes or info.get("num_classes")
    if not n:
        raise UserError(f"{info_path} has no num_classes; pass --num-classes")
    classes = [str(c) for c in info.get("classes", range(int(n)))]
    from .shards import ShardDataset
    urls = [shard_url(root, f) for f in filenames]
    ds = ShardDataset(urls, lengths, len(classes), mode, training=training)
    return SplitDataset(ds, f"wds/{name} {root} [{which}]", classes, kind="wds",
                        source=_digest(which, filenames, lengths))


def build_split_any(dataset: str, data_dir: str, split: str, training: bool, class_map: str = "",
                    download: bool = False, input_img_mode: str = "RGB",
                    num_classes: int | None = None) -> SplitDataset:
    """One split of any --dataset kind except folders."""
    kind, rest = dataset_kind(dataset)
    mode = input_img_mode or "RGB"
    if kind == "torch":
        if not rest:
            raise UserError("--dataset torch/NAME needs a name, e.g. torch/cifar100")
        return _torch_split(rest.lower(), data_dir, split, download, class_map, mode)
    if kind == "hfds":
        return _hfds_split(rest, data_dir, split, class_map, mode)
    return _wds_split(rest, data_dir, split, class_map, mode, training, num_classes)


def image_mode(flag: str | None, in_chans: int | None = None, input_size=None) -> str:
    """``--input-img-mode``, else timm's train.py rule: greyscale ('L') for a 1-channel model input."""
    if flag:
        return flag
    channels = input_size[0] if input_size else in_chans
    return "L" if channels == 1 else "RGB"


def build_train_val_any(data_dir: str, dataset: str = "", train_split: str = "train",
                        val_split: str = "validation", class_map: str = "", num_classes: int | None = None,
                        download: bool = False,
                        input_img_mode: str = "RGB") -> tuple[SplitDataset, SplitDataset, int]:
    """Train and val splits of any kind, with one class list, and the number of classes."""
    kind, _ = dataset_kind(dataset)
    if kind == "folder":
        return build_train_val(data_dir, train_split, val_split, class_map, num_classes, input_img_mode)
    if kind == "torch" and download:
        try:  # the download creates its folder, as timm's does
            os.makedirs(data_dir, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create data dir {data_dir}: {e.strerror or e}") from None
    if kind != "hfds" and not str(data_dir).startswith(("pipe:", "http:", "https:", "s3:", "gs:", "file:")) \
            and not os.path.isdir(data_dir):
        raise UserError(f"data dir {data_dir} does not exist" + ("; pass --dataset-download to fetch the dataset "
                        "into it" if kind == "torch" and not download else ""))
    common = dict(class_map=class_map, download=download, input_img_mode=input_img_mode, num_classes=num_classes)
    train = build_split_any(dataset, data_dir, train_split, True, **common)
    val = build_split_any(dataset, data_dir, val_split, False, **common)
    if train.classes != val.classes:
        raise UserError(f"--dataset {dataset}: train and val class lists differ ({len(train.classes)} vs "
                        f"{len(val.classes)} classes)")
    n = len(train.classes)
    if num_classes is not None and num_classes != n:
        raise UserError(f"--num-classes {num_classes} disagrees with the data: --dataset {dataset} has {n} classes")
    return train, val, n


def build_eval_split_any(data_dir: str, dataset: str = "", split: str = "validation", class_map: str = "",
                         download: bool = False, input_img_mode: str = "RGB",
                         num_classes: int | None = None) -> SplitDataset:
    kind, _ = dataset_kind(dataset)
    if kind == "folder":
        return build_eval_split(data_dir, split, class_map, input_img_mode)
    return build_split_any(dataset, data_dir, split, False, class_map, download, input_img_mode, num_classes)
