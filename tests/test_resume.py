"""--resume: a run continued from an epoch checkpoint ends exactly where the uninterrupted run ends."""
from __future__ import annotations

import csv
import shutil

import pytest
import torch

from conftest import run_cli, save_teacher
from vanillakd.cli import train_crd, train_kd


def argv(data, teacher, out, name, *extra):
    return [data, "--model", "test_resnet", "--teacher", "test_resnet", "--teacher-pretrained", teacher,
            "--epochs", "3", "-b", "4", "--img-size", "32", "--workers", "0", "--output", out,
            "--experiment", name, "--no-progress", "--opt", "adamw", "--lr", "1e-3", "--warmup-epochs", "1",
            "--seed", "3", "--aa", "rand-m7-mstd0.5", "--mixup", "0.2", "--cutmix", "1.0", "--model-ema",
            "--model-ema-decay", "0.9", "--nce-k", "6", *extra]


def rows(path):
    return [{k: v for k, v in r.items() if k != "train_time"} for r in csv.DictReader(open(path))]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return save_teacher(tmp_path_factory.mktemp("rt") / "t.pth", "test_resnet", num_classes=3)


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("entry,method", [(train_kd.cli, "dkd"), (train_crd.cli, "crd")])
def test_resume_matches_uninterrupted_run(tiny_data, teacher, tmp_path, entry, method):
    assert run_cli(entry, argv(tiny_data, teacher, tmp_path, "full", "--kd-loss", method)) == 0
    full = tmp_path / "full"
    assert sorted(p.name for p in full.glob("checkpoint-*")) == [f"checkpoint-{e}.pth.tar" for e in range(3)]
    # a run stopped after epoch 0: its folder as it was then
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    shutil.copy(full / "checkpoint-0.pth.tar", stopped / "last.pth.tar")
    with open(full / "summary.csv") as f:
        (stopped / "summary.csv").write_text("".join(f.readlines()[:2]))
    assert run_cli(entry, argv(tiny_data, teacher, tmp_path, "stopped", "--kd-loss", method,
                               "--resume", "auto")) == 0
    a = torch.load(full / "last.pth.tar", weights_only=True)
    b = torch.load(stopped / "last.pth.tar", weights_only=True)
    assert b["epoch"] == 2 and b["num_updates"] == a["num_updates"]
    assert_same_state(a["state_dict"], b["state_dict"])
    assert_same_state(a["state_dict_ema"], b["state_dict_ema"])
    assert_same_state(a["kd_state"] if "kd_state" in a else {}, b.get("kd_state", {}))
    if method == "crd":
        assert torch.equal(a["kd_state"]["memory_s"], b["kd_state"]["memory_s"])
    assert rows(full / "summary.csv") == rows(stopped / "summary.csv")


def test_resume_errors(tiny_data, teacher, tmp_path, capsys):
    damaged = tmp_path / "r"
    damaged.mkdir()
    (damaged / "last.pth.tar").write_bytes(b"not a checkpoint")  # something to resume, but nothing loads
    assert run_cli(train_kd.cli, argv(tiny_data, teacher, tmp_path, "r", "--resume", "auto")) == 2
    assert "no valid checkpoint" in capsys.readouterr().err
    assert run_cli(train_kd.cli, argv(tiny_data, teacher, tmp_path, "r", "--resume", tmp_path / "nope.pth")) == 2
    assert "does not exist" in capsys.readouterr().err
    vit = tmp_path / "vit"
    vit.mkdir()
    import timm
    torch.save({"arch": "test_vit", "epoch": 0, "state_dict": timm.create_model("test_vit").state_dict()},
               vit / "last.pth.tar")
    assert run_cli(train_kd.cli, argv(tiny_data, teacher, tmp_path, "x", "--resume", vit / "last.pth.tar")) == 2
    assert "checkpoint of 'test_vit', not of --model test_resnet" in capsys.readouterr().err


@pytest.fixture(scope="module")
def bigger_data(tmp_path_factory):
    from conftest import make_image_folder
    return make_image_folder(tmp_path_factory.mktemp("big"), classes=("a", "b"), per_class=(100, 4), size=48)


def kill_argv(data, teacher, out, name, *extra):
    return [data, "--model", "test_resnet", "--teacher", "test_resnet", "--teacher-pretrained", teacher,
            "--num-classes", "2", "--epochs", "3", "-b", "4", "--img-size", "48", "--workers", "2", "--output", out,
            "--experiment", name, "--no-progress", "--opt", "adamw", "--lr", "1e-3", "--seed", "11",
            "--aa", "rand-m7-mstd0.5", "--mixup", "0.2", "--cutmix", "1.0", "--recovery-interval", "5",
            "--model-ema", "--log-interval", "10", *extra]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_auto_equals_uninterrupted(bigger_data, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO
    teacher2 = save_teacher(tmp_path / "t2.pth", "test_resnet", num_classes=2)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(REPO / "train-kd.py")]
    full = subprocess.run(cmd + [str(a) for a in kill_argv(bigger_data, teacher2, tmp_path, "full")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-2000:]

    proc = subprocess.Popen(cmd + [str(a) for a in kill_argv(bigger_data, teacher2, tmp_path, "killed")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    recovery = tmp_path / "killed" / "recovery.pth.tar"
    deadline, killed_at = time.time() + 300, None
    while time.time() < deadline and proc.poll() is None:
        if recovery.is_file():
            ckpt = torch.load(recovery, weights_only=True)
            if ckpt["epoch"] == 1 and ckpt["step"] >= 10:
                proc.send_signal(signal.SIGKILL)
                killed_at = (ckpt["epoch"], ckpt["step"])
                break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert killed_at is not None, "the run ended before it could be killed in epoch 1"
    assert proc.returncode == -signal.SIGKILL
    assert torch.load(tmp_path / "killed" / "last.pth.tar", weights_only=True)["epoch"] == 0

    resumed = subprocess.run(cmd + [str(a) for a in kill_argv(bigger_data, teacher2, tmp_path, "killed",
                                                              "--resume", "auto")],
                             env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "continuing at epoch 1, step" in resumed.stderr
    a = torch.load(tmp_path / "full" / "last.pth.tar", weights_only=True)
    b = torch.load(tmp_path / "killed" / "last.pth.tar", weights_only=True)
    assert_same_state(a["state_dict"], b["state_dict"])
    assert_same_state(a["state_dict_ema"], b["state_dict_ema"])
    assert rows(tmp_path / "full" / "summary.csv") == rows(tmp_path / "killed" / "summary.csv")


def test_resume_auto_skips_damaged_checkpoints(tiny_data, teacher, tmp_path):
    assert run_cli(train_kd.cli, argv(tiny_data, teacher, tmp_path, "run", "--kd-loss", "kd")) == 0
    run = tmp_path / "run"
    last = run / "last.pth.tar"  # a hard link of checkpoint-2: damaging it damages both
    data = last.read_bytes()
    with open(last, "r+b") as f:
        f.truncate(len(data) // 2)
    assert run_cli(train_kd.cli, argv(tiny_data, teacher, tmp_path, "run", "--kd-loss", "kd", "--epochs", "4",
                                      "--resume", "auto")) == 0
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["epoch"] == 3
    assert [r["epoch"] for r in rows(run / "summary.csv")] == ["0", "1", "2", "3"]
