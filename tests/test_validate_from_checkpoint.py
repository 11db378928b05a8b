"""validate.py takes what a checkpoint records (architecture, head, input size, normalisation, interpolation,
crop, --in-chans / --gp) when the flags leave it unset; flags win with a warning; a file recording none of it
keeps timm's pretrained config of --model; the data dir's layout is explained when it is wrong."""
from __future__ import annotations

import argparse
import csv
import json

import pytest
import timm
import torch

from conftest import make_image_folder, run_cli
from vanillakd.cli import train_kd, validate

# a student trained at 32 px with its own normalisation, interpolation and crop: timm's config of test_resnet
# (160 px, mean/std 0.5, bilinear, crop 0.95) evaluates something else
TRAIN_FLAGS = ["--img-size", "32", "--mean", "0.4", "0.45", "0.5", "--std", "0.2", "0.25", "0.3",
               "--interpolation", "bicubic", "--crop-pct", "0.8"]
RIGHT_FLAGS = ["--model", "test_resnet", *TRAIN_FLAGS]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("from_ckpt")
    data = make_image_folder(root / "data")
    argv = [data, "--model", "test_resnet", "--kd-loss", "none", *TRAIN_FLAGS, "--epochs", "1", "-b", "4",
            "--workers", "0", "--opt", "adamw", "--lr", "1e-2", "--warmup-epochs", "0", "--output", root,
            "--experiment", "s", "--no-progress"]
    assert run_cli(train_kd.cli, argv) == 0
    row = list(csv.DictReader(open(root / "s" / "summary.csv")))[-1]
    return data, root / "s" / "last.pth.tar", row


def _validate(capsys, data, *argv, out=None) -> tuple[int, dict | None, str]:
    out = out or data.parent / "val.json"
    out.unlink(missing_ok=True)
    rc = run_cli(validate.cli, [data, *argv, "-j", "0", "--no-progress", "--results-file", out])
    err = capsys.readouterr().err
    return rc, (json.loads(out.read_text()) if rc == 0 else None), err


def test_checkpoint_sets_model_and_eval_transform(trained, capsys):
    data, ckpt, row = trained
    rc, bare, err = _validate(capsys, data, "--checkpoint", ckpt)
    assert rc == 0 and "differ" not in err
    assert bare["model"] == "test_resnet" and bare["img_size"] == 32 and bare["crop_pct"] == pytest.approx(0.8)
    rc, flagged, err = _validate(capsys, data, "--checkpoint", ckpt, *RIGHT_FLAGS)
    assert rc == 0 and "differ" not in err  # flags that agree with the checkpoint say nothing
    for key in ("top1", "top5", "loss", "img_size", "crop_pct", "num_classes"):
        assert bare[key] == flagged[key], key
    # and the training run's own evaluation of the same weights
    assert bare["top1"] == pytest.approx(float(row["eval_top1"]), abs=1e-3)
    assert bare["loss"] == pytest.approx(float(row["eval_loss"]), abs=1e-4)


def test_disagreeing_flags_win_with_one_warning(trained, capsys):
    data, ckpt, _ = trained
    rc, res, err = _validate(capsys, data, "--checkpoint", ckpt, "--img-size", "48", "--crop-pct", "1.0")
    assert rc == 0 and res["img_size"] == 48 and res["crop_pct"] == 1.0
    warned = [line for line in err.splitlines() if "differ from what" in line]
    assert len(warned) == 1
    assert "--img-size 48 (checkpoint: 32)" in warned[0] and "--crop-pct 1.0 (checkpoint: 0.8)" in warned[0]
    rc, _, err = _validate(capsys, data, "--checkpoint", ckpt, "--model", "test_vit")
    assert rc == 2 and "--model test_vit (checkpoint: test_resnet)" in err


def test_use_ema_without_ema_weights_is_an_error(trained, capsys):
    data, ckpt, _ = trained
    rc, _, err = _validate(capsys, data, "--checkpoint", ckpt, "--use-ema")
    assert rc == 2 and "Traceback" not in err
    assert "--use-ema" in err.strip().splitlines()[-1] and "no EMA weights" in err


def test_plain_state_dict_needs_model_and_keeps_timm_config(trained, tmp_path, capsys):
    data, ckpt, _ = trained
    plain = tmp_path / "plain.pth"
    torch.save(torch.load(ckpt, weights_only=True)["state_dict"], plain)
    rc, _, err = _validate(capsys, data, "--checkpoint", plain)
    last = err.strip().splitlines()[-1]
    assert rc == 2 and "does not name its architecture" in last and "--model" in last and "resnet50" not in last
    rc, res, _ = _validate(capsys, data, "--checkpoint", plain, "--model", "test_resnet")
    cfg = timm.models.get_pretrained_cfg("test_resnet")
    assert rc == 0 and res["img_size"] == cfg.input_size[-1] and res["crop_pct"] == pytest.approx(cfg.crop_pct)
    rc, _, err = _validate(capsys, data, "--pretrained")
    assert rc == 2 and "--model" in err.strip().splitlines()[-1]


def test_timm_training_checkpoint_names_its_model_in_args(tmp_path, capsys):
    """timm's saver records the class name as 'arch' ('resnet') and the model name in its args Namespace."""
    data = make_image_folder(tmp_path / "data", per_class=(1, 2), size=32)
    sd = timm.create_model("test_resnet", num_classes=3).state_dict()
    torch.save({"arch": "resnet", "state_dict": sd, "args": argparse.Namespace(model="test_resnet", gp=None)},
               tmp_path / "timm.pth.tar")
    rc, res, _ = _validate(capsys, data, "--checkpoint", tmp_path / "timm.pth.tar")
    assert rc == 0 and res["model"] == "test_resnet"
    torch.save({"arch": "resnet", "state_dict": sd}, tmp_path / "bare.pth.tar")
    rc, _, err = _validate(capsys, data, "--checkpoint", tmp_path / "bare.pth.tar")
    assert rc == 2 and "'resnet', not a timm model name" in err and "pass --model" in err


def test_in_chans_and_classes_from_the_checkpoint(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", per_class=(1, 2), size=32)
    sd = timm.create_model("test_resnet", num_classes=3, in_chans=1).state_dict()
    ckpt = {"arch": "test_resnet", "state_dict": sd, "args": {"in_chans": 1, "gp": None},
            "data_config": {"input_size": [1, 32, 32], "interpolation": "bilinear", "mean": [0.5], "std": [0.5],
                            "crop_pct": 1.0, "crop_mode": "center"}, "classes": ["cat", "dog", "fox"]}
    torch.save(ckpt, tmp_path / "grey.pth.tar")
    rc, res, err = _validate(capsys, data, "--checkpoint", tmp_path / "grey.pth.tar")
    assert rc == 0 and res["img_size"] == 32 and "trained on the classes" not in err
    torch.save({**ckpt, "classes": ["ant", "bee", "cow"]}, tmp_path / "other.pth.tar")
    rc, _, err = _validate(capsys, data, "--checkpoint", tmp_path / "other.pth.tar")
    assert rc == 0 and "trained on the classes [ant, bee, cow] but the split holds [cat, dog, fox]" in err


def test_a_split_folder_as_data_dir_is_explained(trained, capsys):
    data, ckpt, _ = trained
    rc, _, err = _validate(capsys, data / "train", "--checkpoint", ckpt)
    last = err.strip().splitlines()[-1]
    assert rc == 2 and "DIR/train/<class>/<images> and DIR/val/<class>/<images>" in last
    assert f"{data / 'train'} looks like a split folder itself" in last and f"pass its parent {data}" in last
    rc = run_cli(train_kd.cli, [data / "val", "--model", "test_resnet", "--kd-loss", "none"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and "split 'train' missing" in last and f"pass its parent {data}" in last
    flat = data.parent / "flat"
    for c in ("a", "b"):
        (flat / c).mkdir(parents=True, exist_ok=True)
    rc = run_cli(train_kd.cli, [flat, "--model", "test_resnet", "--kd-loss", "none"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and "subfolders (a, b) look like classes" in last
