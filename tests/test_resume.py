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
    assert run_cli(train_kd.cli, argv(tiny_data, teacher, tmp_path, "r", "--resume", "auto")) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert run_cli(train_kd.cli, argv(tiny_data, teacher, tmp_path, "r", "--resume", tmp_path / "nope.pth")) == 2
    assert "does not exist" in capsys.readouterr().err
    vit = tmp_path / "vit"
    vit.mkdir()
    import timm
    torch.save({"arch": "test_vit", "epoch": 0, "state_dict": timm.create_model("test_vit").state_dict()},
               vit / "last.pth.tar")
    assert run_cli(train_kd.cli, argv(tiny_data, teacher, tmp_path, "x", "--resume", vit / "last.pth.tar")) == 2
    assert "checkpoint of 'test_vit', not of --model test_resnet" in capsys.readouterr().err
