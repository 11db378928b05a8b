"""--grad-accum-steps N: N micro-batches (one teacher pass each) per optimizer update, the loss scaled 1/N,
the schedule and EMA counting updates. For a model without batch-dependent layers (a ViT: LayerNorm, no
dropout), N=4 x batch 8 trains the same weights as N=1 x batch 32 on the same data order."""
from __future__ import annotations

import pytest
import torch

from conftest import make_image_folder, run_cli, save_teacher
from vanillakd.cli import train_kd


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("ga"), per_class=(22, 2), size=32)  # 66 train images


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return save_teacher(tmp_path_factory.mktemp("gat") / "t.pth", "test_resnet", num_classes=3)


def train(data, teacher, out, name, batch, accum, *extra):
    argv = [data, "--teacher", "test_resnet", "--teacher-pretrained", teacher, "--epochs", "2", "-b", batch,
            "--grad-accum-steps", accum, "--img-size", "32", "--workers", "0", "--output", out, "--experiment",
            name, "--no-progress", "--opt", "sgd", "--lr", "0.05", "--warmup-epochs", "1", "--drop", "0",
            "--drop-path", "0", "--seed", "5", "--model-ema", "--model-ema-decay", "0.5", *extra]
    assert run_cli(train_kd.cli, argv) == 0


def close(a, b):
    return all(torch.allclose(a[k], b[k], atol=2e-5, rtol=1e-4) for k in a if a[k].is_floating_point())


def test_accumulation_equals_large_batch(data, teacher, tmp_path):
    train(data, teacher, tmp_path, "big", 32, 1, "--model", "test_vit")
    train(data, teacher, tmp_path, "acc", 8, 4, "--model", "test_vit")
    a = torch.load(tmp_path / "big" / "last.pth.tar", weights_only=True)
    b = torch.load(tmp_path / "acc" / "last.pth.tar", weights_only=True)
    assert a["num_updates"] == b["num_updates"] == 4  # 2 epochs x 2 updates of 32 images (64 of 66 used)
    assert close(a["state_dict"], b["state_dict"]) and close(a["state_dict_ema"], b["state_dict_ema"])
    assert a["scheduler"] == b["scheduler"]
    # and it really is not the batch-8 run without accumulation
    train(data, teacher, tmp_path, "small", 8, 1, "--model", "test_vit")
    c = torch.load(tmp_path / "small" / "last.pth.tar", weights_only=True)
    assert c["num_updates"] == 16 and not close(a["state_dict"], c["state_dict"])


def test_accumulation_with_two_students(data, teacher, tmp_path):
    two = ("--model", "test_vit", "test_vit", "--kd-loss", "kd", "dkd")
    train(data, teacher, tmp_path, "big", 32, 1, *two)
    train(data, teacher, tmp_path, "acc", 8, 4, *two)
    for student in ("student0-test_vit-kd", "student1-test_vit-dkd"):
        a = torch.load(tmp_path / "big" / student / "last.pth.tar", weights_only=True)
        b = torch.load(tmp_path / "acc" / student / "last.pth.tar", weights_only=True)
        assert a["num_updates"] == b["num_updates"] == 4 and close(a["state_dict"], b["state_dict"]), student


def test_accumulation_resumes_mid_epoch(data, teacher, tmp_path):
    import shutil
    flags = ("--model", "test_vit", "--recovery-interval", "3")
    train(data, teacher, tmp_path, "full", 8, 2, *flags)  # 8 micro-batches, 4 updates per epoch
    full = tmp_path / "full"
    recovery = torch.load(full / "recovery.pth.tar", weights_only=True)
    # a recovery point falls between updates only: step 3 is mid-accumulation, so the first is step 6
    assert (recovery["epoch"], recovery["step"], recovery["num_updates"]) == (1, 6, 7)
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    shutil.copy(full / "recovery.pth.tar", stopped / "recovery.pth.tar")
    train(data, teacher, tmp_path, "stopped", 8, 2, *flags, "--resume", "auto")
    a = torch.load(full / "last.pth.tar", weights_only=True)
    b = torch.load(stopped / "last.pth.tar", weights_only=True)
    assert b["num_updates"] == 8 and all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
