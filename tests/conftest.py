"""Shared fixtures: a tiny ImageFolder, teacher checkpoints of timm test models, and CLI runners."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on the hub: tests build random-weight models
# tiny test models: one thread beats two (no OpenMP hand-off), and DataLoader workers get the other core
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
FMNIST_SOURCE = Path("/usr/share/datasets/fashion-mnist")


def make_image_folder(root: Path, classes=("cat", "dog", "fox"), per_class=(8, 4), size=40, seed=0) -> Path:
    """train/ and val/ with ``per_class`` random PNG / JPEG images in each class folder."""
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val"), per_class):
        for ci, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                # class-dependent mean colour so that a model can learn something
                img = rng.normal(60 + 60 * ci, 40, (size, size, 3)).clip(0, 255).astype(np.uint8)
                ext = "png" if i % 2 else "jpg"
                Image.fromarray(img).save(d / f"{i}.{ext}")
    return root


@pytest.fixture
def two_threads():
    """Full-size models (ResNet-50, BEiTv2-B) use both cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("tiny"))


def save_teacher(path: Path, arch: str = "test_resnet", num_classes: int = 3, wrap: str | None = "state_dict",
                 seed: int = 0) -> Path:
    import timm
    torch.manual_seed(seed)
    sd = timm.create_model(arch, num_classes=num_classes).state_dict()
    torch.save({wrap: sd} if wrap else sd, path)
    return path


@pytest.fixture(scope="session")
def teacher_ckpt(tmp_path_factory) -> Path:
    return save_teacher(tmp_path_factory.mktemp("teacher") / "teacher.pth")


def run_script(script: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a repository-root script (or ``-m module``) in a fresh interpreter, as a user would."""
    cmd = [sys.executable] + (list(script.split()) if script.startswith("-m") else [str(REPO / script)])
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env=env)


def make_student(flags, num_classes: int, out_dir: Path, *, device: torch.device = torch.device("cpu"),
                 precision=None, updates_per_epoch: int = 10, loss_kind: str = "logits", **context):
    """The first student of parsed training flags (an argparse namespace or a ``RunConfig``), built as a run
    builds it; ``context``: the rest of its ``StudentContext`` (teacher_shapes, num_data, input_size, dist)."""
    from vanillakd.cli.run_config import run_config
    from vanillakd.config import RunConfig
    from vanillakd.precision import Precision
    from vanillakd.student import StudentContext, StudentRun
    cfg = flags if isinstance(flags, RunConfig) else run_config(flags)
    ctx = StudentContext(device, precision or Precision.create(device, False), num_classes, updates_per_epoch,
                         loss_kind=loss_kind, **context)
    return StudentRun(0, cfg.students[0], cfg, ctx, out_dir)


def run_cli(entry, argv, capsys=None) -> int:
    """Run a ``cli(argv)`` entry point in-process and return its exit code."""
    try:
        return entry([str(a) for a in argv])
    except SystemExit as e:  # argparse
        return int(e.code or 0)


@pytest.fixture(scope="session")
def fashion_mnist() -> Path:
    """The real Fashion-MNIST ImageFolder (prepared once into the repo's data/ folder, as the demo does)."""
    from vanillakd.data.fashion_mnist import is_prepared, prepare_fashion_mnist
    target = REPO / "data" / "fashion-mnist"
    if not is_prepared(target) and not FMNIST_SOURCE.is_dir():
        pytest.skip("Debian's dataset-fashion-mnist is not installed (make test installs it)")
    return prepare_fashion_mnist(target)
