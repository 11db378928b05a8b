"""Datasets and loaders: ImageFolder checks, Fashion-MNIST preparation, loader batches."""
from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from conftest import make_image_folder
from vanillakd.cli.run_config import run_config
from vanillakd.cli.train_args import build_train_parser
from vanillakd.config import RunConfig
from vanillakd.data.fashion_mnist import CLASSES, is_prepared, make_subset, prepare_fashion_mnist, read_idx
from vanillakd.data.folder import build_train_val, find_split
from vanillakd.data.loader import build_train_loader, set_epoch
from vanillakd.errors import UserError


def write_idx(path, array: np.ndarray):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_idx(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 10)):
        write_idx(src / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        write_idx(src / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return src


def test_prepare_from_idx_files(fake_idx, tmp_path):
    out = prepare_fashion_mnist(tmp_path / "fm", source=fake_idx, download=False)
    assert is_prepared(out)
    assert sorted(p.name for p in (out / "train").iterdir()) == CLASSES
    assert sum(1 for _ in (out / "train").rglob("*.png")) == 30
    assert sum(1 for _ in (out / "val").rglob("*.png")) == 10
    images = read_idx(fake_idx / "train-images-idx3-ubyte.gz")
    from PIL import Image
    first = np.array(Image.open(out / "train" / CLASSES[0] / "00000.png"))
    assert first.shape == (28, 28) and np.array_equal(first, images[0])
    # a second call finds it complete and writes nothing
    assert prepare_fashion_mnist(out, source=fake_idx, download=False) == out


def test_prepare_rejects_truncated_idx_and_leaves_nothing(fake_idx, tmp_path):
    f = fake_idx / "t10k-images-idx3-ubyte.gz"
    data = gzip.open(f).read()
    with gzip.open(f, "wb") as g:
        g.write(data[:-100])
    with pytest.raises(UserError, match="truncated"):
        prepare_fashion_mnist(tmp_path / "fm", source=fake_idx, download=False)
    assert not (tmp_path / "fm").exists() and not (tmp_path / "fm.partial").exists()


def test_prepare_bad_source(tmp_path):
    with pytest.raises(UserError, match="does not hold the Fashion-MNIST idx files"):
        prepare_fashion_mnist(tmp_path / "fm", source=tmp_path, download=False)


def test_make_subset_is_balanced_and_deterministic(fake_idx, tmp_path):
    out = prepare_fashion_mnist(tmp_path / "fm", source=fake_idx, download=False)
    a = make_subset(out, tmp_path / "a", {"train": 2, "val": None}, seed=3)
    b = make_subset(out, tmp_path / "b", {"train": 2, "val": None}, seed=3)
    names = lambda root: sorted(str(p.relative_to(root)) for p in root.rglob("*.png"))  # noqa: E731
    assert names(a) == names(b) and len(names(a)) == 20 + 10
    assert all(len(list(d.iterdir())) == 2 for d in (a / "train").iterdir())


def test_find_split_aliases(tmp_path):
    (tmp_path / "val").mkdir()
    assert find_split(tmp_path, "validation").name == "val"
    with pytest.raises(UserError, match="split 'train' missing"):
        find_split(tmp_path, "train")


def test_train_val_classes_and_labels(tmp_path):
    root = make_image_folder(tmp_path / "d", classes=("b", "a", "c"), per_class=(2, 1), size=16)
    train, val, n = build_train_val(root)
    assert n == 3 and train.classes == ["a", "b", "c"] == val.classes
    labels = sorted({t for _, t in train.dataset.reader.samples})
    assert labels == [0, 1, 2]


def loader_args(**overrides) -> RunConfig:
    """``-b 4 --workers 0`` and each override as its flag (``aug_repeats=3`` -> ``--aug-repeats 3``)."""
    flags = [a for k, v in overrides.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    return run_config(build_train_parser("t", "").parse_args(["x", "-b", "4", "--workers", "0", *flags]))


def test_train_loader_batches_mixup_targets_and_repeats(tiny_data):
    train, _, n = build_train_val(tiny_data)
    cfg = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3}
    args = loader_args(mixup=0.5, cutmix=1.0, aug_repeats=3, aa="rand-m7-mstd0.5")
    loader = build_train_loader(train.dataset, cfg, args, n, torch.device("cpu"))
    x, y = next(iter(loader))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (4, 3) and torch.allclose(y.sum(1), torch.ones(4))
    assert x.min() >= -1.0 - 1e-6 and x.max() <= 1.0 + 1e-6  # normalised with mean = std = 0.5
    # repeated augmentation (DeiT / timm semantics, here in one process): an epoch keeps its length and
    # each image drawn appears 3 times, in consecutive positions
    indices = [index for _, _, index in loader.sampler]
    assert len(indices) == 24 and len(loader) == 6
    counts = torch.bincount(torch.tensor(indices))
    assert set(counts[counts > 0].tolist()) == {3} and indices[0] == indices[1] == indices[2]


@pytest.mark.parametrize("workers", [0, 2])
def test_train_stream_is_replayable(tiny_data, workers):
    """Augmentation and mixup derive from (seed, epoch, position) alone: not from the global RNG, the worker
    count, or where in the epoch iteration started."""
    train, _, n = build_train_val(tiny_data)
    cfg = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3}
    args = dict(seed=7, aa="rand-m7-mstd0.5", mixup=0.5, cutmix=1.0)

    def batches(workers, start=0, rng=0):
        torch.manual_seed(rng)
        loader = build_train_loader(train.dataset, cfg, loader_args(workers=workers, **args), n, torch.device("cpu"))
        set_epoch(loader, 1, start)
        return list(loader)

    ref = batches(0)
    assert len(ref) == 6
    for got in (batches(workers, rng=5), [None, None] + batches(workers, start=2, rng=9)):
        for a, b in zip(ref[2:], got[2:]):
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    other_epoch = build_train_loader(train.dataset, cfg, loader_args(workers=0, **args), n, torch.device("cpu"))
    set_epoch(other_epoch, 2)
    assert not torch.equal(next(iter(other_epoch))[0], ref[0][0])
