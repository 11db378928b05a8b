"""Reliability: bad image files, non-finite losses, full disks, safetensors output."""
from __future__ import annotations

import errno

import pytest
import torch

from conftest import make_image_folder, run_cli, run_script
from vanillakd.cli import train_kd
from vanillakd.data.check import image_problem


def base(data, teacher, out, *extra):
    return [data, "--model", "test_resnet", "--teacher", "test_resnet", "--teacher-pretrained", teacher,
            "--epochs", "2", "-b", "4", "--img-size", "32", "--workers", "0", "--output", out, "--experiment", "r",
            "--no-progress", *extra]


@pytest.fixture
def damaged(tmp_path):
    data = make_image_folder(tmp_path / "d", per_class=(8, 4), size=24)
    jpg = data / "train" / "cat" / "0.jpg"
    jpg.write_bytes(jpg.read_bytes()[: len(jpg.read_bytes()) // 2])       # truncated JPEG
    png = data / "train" / "dog" / "1.png"
    png.write_bytes(png.read_bytes()[:-20])                                  # truncated PNG
    fake = data / "train" / "fox" / "extra.png"
    fake.write_bytes(b"not an image at all")                                  # not an image (a 25th file)
    return data, [jpg, png, fake]


def test_image_problem_names_each_kind(damaged, tiny_data):
    _, (jpg, png, fake) = damaged
    assert "truncated" in image_problem(str(jpg)).lower()  # header cut, or no end-of-image marker
    assert "truncated PNG" in image_problem(str(png))
    assert image_problem(str(fake)) == "not an image"
    assert all(image_problem(str(p)) is None for p in (tiny_data / "train").rglob("*.*"))


def test_bad_images_fail_fast_with_paths(damaged, teacher_ckpt, tmp_path, capsys):
    data, bad = damaged
    assert run_cli(train_kd.cli, base(data, teacher_ckpt, tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "3 bad image file(s)" in err and all(str(p) in err for p in bad) and "--bad-images skip" in err


def test_bad_images_skip(damaged, teacher_ckpt, tmp_path, capsys):
    data, _ = damaged
    assert run_cli(train_kd.cli, base(data, teacher_ckpt, tmp_path, "--bad-images", "skip")) == 0
    assert "skipped 3 bad image file(s)" in capsys.readouterr().err
    assert "data: 22 train / 12 val images" in (tmp_path / "r" / "log.txt").read_text()


def test_check_data_command(damaged):
    data, bad = damaged
    r = run_script("-m vanillakd", "check-data", data, "-j", "0")
    assert r.returncode == 1
    assert all(str(p) in r.stdout for p in bad) and "25 images, 3 bad" in r.stdout


def test_nan_loss_stops_run_and_keeps_last_good_checkpoint(tiny_data, teacher_ckpt, tmp_path, capsys, monkeypatch):
    from vanillakd.losses import DKD
    calls = {"n": 0}
    real = DKD.forward

    def poisoned(self, **kw):
        calls["n"] += 1
        out = real(self, **kw)
        return out * float("nan") if calls["n"] == 8 else out  # step 2 of epoch 1 (6 steps per epoch)

    monkeypatch.setattr(DKD, "forward", poisoned)
    assert run_cli(train_kd.cli, base(tiny_data, teacher_ckpt, tmp_path, "--kd-loss", "dkd")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "non-finite loss at update 7" in err and "kd (dkd) term" in err and "last good checkpoint" in err
    ckpt = torch.load(tmp_path / "r" / "last.pth.tar", weights_only=True)
    assert ckpt["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_max_nonfinite_skips_steps(tiny_data, teacher_ckpt, tmp_path, monkeypatch):
    from vanillakd.losses import KLDiv
    calls = {"n": 0}
    real = KLDiv.forward

    def poisoned(self, **kw):
        calls["n"] += 1
        out = real(self, **kw)
        return out * float("nan") if calls["n"] in (3, 4) else out

    monkeypatch.setattr(KLDiv, "forward", poisoned)
    assert run_cli(train_kd.cli, base(tiny_data, teacher_ckpt, tmp_path, "--max-nonfinite", "2")) == 0
    ckpt = torch.load(tmp_path / "r" / "last.pth.tar", weights_only=True)
    assert ckpt["num_updates"] == 10  # 12 steps, 2 skipped
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_full_disk_keeps_previous_checkpoint(tmp_path, monkeypatch):
    from vanillakd.checkpoint import atomic_save
    from vanillakd.errors import UserError
    path = tmp_path / "last.pth.tar"
    atomic_save({"a": torch.ones(2)}, path)

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("os.fsync", no_space)
    with pytest.raises(UserError, match="No space left on device"):
        atomic_save({"a": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth.tar"]
