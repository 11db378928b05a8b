"""Every registered method, automatically, through its training script: an interrupted epoch resumed from its
recovery checkpoint ends with the weights of the run that was never interrupted, and a 2-process DDP run on
the CPU keeps the replicas identical. A new method file gets both without an edit here."""
from __future__ import annotations

import shutil

import pytest
import torch

from conftest import run_cli
from test_distributed import launch
from vanillakd.losses import get_kd_loss_entry, list_kd_losses

pytestmark = pytest.mark.slow
METHODS = list_kd_losses()


def script_of(name: str) -> str:
    e = get_kd_loss_entry(name)
    return "train-kd.py" if e.kind == "logits" else "train-crd.py" if e.uses_contrast else "train-fd.py"


def recipe(name: str, data, teacher, out, experiment: str) -> list:
    # CRD's default 16384 contrast samples exceed the tiny set; 6 keeps the memory bank's draws meaningful
    contrast = ["--nce-k", "6"] if get_kd_loss_entry(name).uses_contrast else []
    return [data, "--model", "test_resnet", "--teacher", "test_resnet", "--teacher-pretrained", teacher,
            "--kd-loss", name, *contrast, "--epochs", "1", "-b", "4", "--img-size", "32", "--workers", "0",
            "--opt", "adamw", "--lr", "1e-3", "--output", out, "--experiment", experiment, "--no-progress"]


def entry_of(name: str):
    from vanillakd.cli import train_crd, train_fd, train_kd
    return {"train-kd.py": train_kd.cli, "train-fd.py": train_fd.cli, "train-crd.py": train_crd.cli}[script_of(name)]


def weights(path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(path, weights_only=True)
    return {**ckpt["state_dict"], **{f"kd.{k}": v for k, v in (ckpt.get("kd_state") or {}).items()}}


@pytest.mark.parametrize("name", METHODS)
def test_resume_mid_epoch_is_exact(name, tiny_data, teacher_ckpt, tmp_path, capfd):
    entry = entry_of(name)
    # the whole epoch (6 steps), leaving a recovery checkpoint after step 2 on the way
    assert run_cli(entry, recipe(name, tiny_data, teacher_ckpt, tmp_path, "whole") + ["--recovery-interval", "2"]) \
        == 0, capfd.readouterr().err[-3000:]
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(tmp_path / "whole" / "recovery.pth.tar", resumed / "recovery.pth.tar")
    argv = recipe(name, tiny_data, teacher_ckpt, tmp_path, "resumed") + ["--resume", resumed / "recovery.pth.tar"]
    assert run_cli(entry, argv) == 0, capfd.readouterr().err[-3000:]
    whole, again = weights(tmp_path / "whole" / "last.pth.tar"), weights(resumed / "last.pth.tar")
    assert whole.keys() == again.keys()
    different = [k for k in whole if not torch.equal(whole[k], again[k])]
    assert not different, f"{name}: resumed weights differ in {different[:5]}"


@pytest.mark.parametrize("name", METHODS)
def test_ddp_on_two_processes(name, tiny_data, teacher_ckpt, tmp_path):
    r = launch(script_of(name), *recipe(name, tiny_data, teacher_ckpt, tmp_path, name), "--workers", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    log = (tmp_path / name / "log.txt").read_text()
    assert "replicas in sync: student weights compared on 2 ranks" in log
    assert (tmp_path / name / "last.pth.tar").is_file()
