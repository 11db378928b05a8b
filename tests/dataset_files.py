"""Tiny datasets written in each on-disk format ``--dataset`` reads, by the tests themselves (never downloaded):
torchvision's CIFAR-10 / CIFAR-100 pickles, a Hugging Face DatasetDict saved with ``save_to_disk``, and
WebDataset tar shards with timm's ``_info.json``."""
from __future__ import annotations

import hashlib
import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("cat", "dog", "fox")


def images(n: int, seed: int, size: int = 32) -> tuple[np.ndarray, list[int]]:
    """``n`` HWC uint8 images whose mean colour depends on the class (so a model can learn something)."""
    rng = np.random.default_rng(seed)
    labels = [i % len(CLASSES) for i in range(n)]
    data = np.stack([rng.normal(60 + 60 * c, 40, (size, size, 3)).clip(0, 255).astype(np.uint8) for c in labels])
    return data, labels


def _pickle(path: Path, obj) -> str:
    path.write_bytes(pickle.dumps(obj))
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_cifar(root: Path, which: str = "cifar10", n_train: int = 24, n_test: int = 9) -> dict:
    """torchvision's layout for CIFAR-10 (``cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta``) or
    CIFAR-100 (``cifar-100-python/train, test, meta``): pickled dicts of (N, 3072) uint8 rows (R, G, B planes).
    Returns the md5 lists torchvision checks the files against (the real ones' md5s are built into it)."""
    ten = which == "cifar10"
    folder = root / ("cifar-10-batches-py" if ten else "cifar-100-python")
    folder.mkdir(parents=True, exist_ok=True)
    label_key = "labels" if ten else "fine_labels"

    def batch(path: Path, n: int, seed: int) -> str:
        data, labels = images(n, seed)
        rows = data.transpose(0, 3, 1, 2).reshape(n, -1)
        return _pickle(path, {"data": rows, label_key: labels, "filenames": [f"{i}.png" for i in range(n)]})

    if ten:
        sizes = [n_train // 5 + (1 if i < n_train % 5 else 0) for i in range(5)]
        train_list = [[f"data_batch_{i + 1}", batch(folder / f"data_batch_{i + 1}", s, i)] for i, s in enumerate(sizes)]
        test_list = [["test_batch", batch(folder / "test_batch", n_test, 99)]]
        meta = {"filename": "batches.meta", "key": "label_names",
                "md5": _pickle(folder / "batches.meta", {"label_names": list(CLASSES)})}
    else:
        train_list = [["train", batch(folder / "train", n_train, 1)]]
        test_list = [["test", batch(folder / "test", n_test, 99)]]
        meta = {"filename": "meta", "key": "fine_label_names",
                "md5": _pickle(folder / "meta", {"fine_label_names": list(CLASSES)})}
    return {"train_list": train_list, "test_list": test_list, "meta": meta}


def trust_cifar_files(monkeypatch, md5s: dict, which: str = "cifar10") -> None:
    """torchvision checks each CIFAR file against the md5 of the real release; point that check at the files
    written here (a real user's files match torchvision's own list)."""
    from torchvision.datasets import CIFAR10, CIFAR100
    cls = CIFAR10 if which == "cifar10" else CIFAR100
    for key, value in md5s.items():
        monkeypatch.setattr(cls, key, value)


def write_hf_disk(path: Path, n_train: int = 24, n_val: int = 9, val_name: str = "validation") -> Path:
    import datasets
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASSES))})

    def split(n: int, seed: int):
        data, labels = images(n, seed)
        return datasets.Dataset.from_dict({"image": [Image.fromarray(a) for a in data], "label": labels},
                                          features=features)

    datasets.DatasetDict({"train": split(n_train, 1), val_name: split(n_val, 99)}).save_to_disk(str(path))
    return path


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(root: Path, shards: int = 4, per_shard: int = 8, val_shards: int = 1, val_per_shard: int = 9,
                 info: bool = True) -> Path:
    """``tiny-{train,validation}-NNNNNN.tar`` shards of ``<key>.png`` + ``<key>.cls``, and ``_info.json``.

    Sample keys are ``s<shard>-<i>``; the image's top-left pixel stores the shard and position (for coverage
    checks)."""
    root.mkdir(parents=True, exist_ok=True)
    splits = {}
    for name, count, n, seed in (("train", shards, per_shard, 1), ("validation", val_shards, val_per_shard, 99)):
        files = []
        for s in range(count):
            data, labels = images(n, seed + 10 * s)
            fname = f"tiny-{name}-{s:06d}.tar"
            with tarfile.open(root / fname, "w") as tar:
                for i, (a, label) in enumerate(zip(data, labels)):
                    a = a.copy()
                    a[0, 0] = (s, i, 7)
                    _member(tar, f"s{s}-{i}.png", _png(a))
                    _member(tar, f"s{s}-{i}.cls", str(label).encode())
            files.append(fname)
        splits[name] = {"name": name, "num_samples": count * n, "filenames": files, "shard_lengths": [n] * count}
    if info:
        (root / "_info.json").write_text(json.dumps({"name": "tiny", "num_classes": len(CLASSES),
                                                     "splits": splits}))
    return root
