"""The comparison harness: a tiny grid end to end, restart without redoing cells, report, fractions."""
from __future__ import annotations

import csv
import sys
import types

import pytest
from PIL import Image

from conftest import run_cli
from vanillakd.cli.compare import main as compare_main
from vanillakd.data.folder import build_train_val, take_fraction
from vanillakd.errors import UserError
from vanillakd.errors import run_cli as wrap

RECIPE = ["--", "--epochs", "2", "-b", "4", "--img-size", "32", "--workers", "0", "--no-progress", "--opt", "adamw",
          "--lr", "1e-3", "--warmup-epochs", "0"]


def assert_png(path):
    with Image.open(path) as im:
        im.verify()
        assert im.format == "PNG"


def test_tiny_grid_end_to_end_and_restart(tiny_data, teacher_ckpt, tmp_path, capsys):
    argv = [tiny_data, "--model", "test_resnet", "--teacher", "test_resnet", "--teacher-pretrained", teacher_ckpt,
            "--methods", "none", "kd", "dkd", "--fractions", "0.5", "1.0", "--seeds", "0", "--output",
            tmp_path / "cmp"] + RECIPE
    assert run_cli(lambda a: wrap(compare_main, a), argv) == 0
    out = tmp_path / "cmp"
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert sorted((r["method"], float(r["fraction"])) for r in rows) == sorted(
        (m, f) for m in ("none", "kd", "dkd") for f in (0.5, 1.0))
    for r in rows:
        assert 0 <= float(r["top1"]) <= 100 and r["seed"] == "0" and r["epochs"] == "2"
        assert float(r["wall_time_s"]) > 0 and r["agreement"] != ""
        assert int(r["train_images"]) == (12 if float(r["fraction"]) == 0.5 else 24)
    md = (out / "results.md").read_text()
    assert "| none |" in md and "| kd |" in md and "| dkd |" in md and "0.5 of train" in md and "± " in md
    assert "agreement" in md
    for png in ["top1_vs_fraction.png", "curves-frac0.5-seed0.png", "curves-frac1-seed0.png"]:
        assert_png(out / png)
    cell = out / "cells" / "frac0.5-seed0" / "cell.json"
    before = cell.stat().st_mtime_ns
    capsys.readouterr()
    assert run_cli(lambda a: wrap(compare_main, a), argv) == 0
    assert cell.stat().st_mtime_ns == before
    assert capsys.readouterr().err.count("finished earlier, skipped") == 2
    assert len(list(csv.DictReader(open(out / "results.csv")))) == 6


def test_report_command(tiny_data, teacher_ckpt, tmp_path):
    from vanillakd.cli import report, train_kd
    for seed in (1, 2):
        assert run_cli(train_kd.cli, [tiny_data, "--model", "test_resnet", "--teacher", "test_resnet",
                                      "--teacher-pretrained", teacher_ckpt, "--epochs", "2", "-b", "4", "--img-size",
                                      "32", "--workers", "0", "--no-progress", "--output", tmp_path,
                                      "--experiment", f"r{seed}", "--seed", str(seed)]) == 0
    assert report.main([str(tmp_path / "r1"), str(tmp_path / "r2"), "--out", str(tmp_path / "rep")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "rep" / "results.csv")))
    assert len(rows) == 2 and {r["method"] for r in rows} == {"kd"}
    assert "(n=2)" in (tmp_path / "rep" / "results.md").read_text()
    assert_png(tmp_path / "rep" / "curves-r1.png")


def test_train_fraction_is_class_balanced_and_deterministic(tmp_path):
    from conftest import make_image_folder
    root = make_image_folder(tmp_path / "d", classes=("a", "b", "c"), per_class=(10, 1), size=8)
    files = []
    for seed in (0, 0, 1):
        train, _, _ = build_train_val(root)
        take_fraction(train, 0.3, seed)
        samples = train.dataset.reader.samples
        assert sorted(t for _, t in samples) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
        files.append([p for p, _ in samples])
    assert files[0] == files[1] and files[0] != files[2]
    with pytest.raises(UserError, match="--train-fraction"):
        take_fraction(train, 1.5)


def test_grid_yaml_and_flag_override(tmp_path):
    from vanillakd.cli.compare import load_grid
    cfg = tmp_path / "grid.yaml"
    cfg.write_text("data_dir: /data\nmodel: test_resnet\nteacher: resnet18\nteacher_pretrained: t.pth\n"
                   "methods: [none, kd]\nfractions: [0.1, 1.0]\nseeds: [0, 1, 2]\nrecipe: [--epochs, '3']\n")
    grid, recipe = load_grid(["-c", str(cfg), "--seeds", "5", "--", "-b", "8"])
    assert grid["seeds"] == [5] and grid["methods"] == ["none", "kd"] and recipe == ["--epochs", "3", "-b", "8"]
    cfg.write_text("modle: x\n")
    with pytest.raises(UserError, match="unknown keys"):
        load_grid(["-c", str(cfg)])


def test_logging_backends_optional(tiny_data, teacher_ckpt, tmp_path, capsys, monkeypatch):
    from vanillakd.cli import train_kd
    base = [tiny_data, "--model", "test_resnet", "--teacher", "test_resnet", "--teacher-pretrained", teacher_ckpt,
            "--epochs", "2", "-b", "4", "--img-size", "32", "--workers", "0", "--no-progress", "--output", tmp_path]
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    assert run_cli(train_kd.cli, base + ["--experiment", "w0", "--log-wandb"]) == 2
    assert "pip install wandb" in capsys.readouterr().err
    calls = []
    fake = types.SimpleNamespace(init=lambda **k: calls.append(("init", k)), log=lambda v, step: calls.append(
        ("log", step, v)), finish=lambda: calls.append(("finish",)))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    assert run_cli(train_kd.cli, base + ["--experiment", "w1", "--log-wandb"]) == 0
    logs = [c for c in calls if c[0] == "log"]
    assert calls[0][0] == "init" and calls[-1] == ("finish",) and [c[1] for c in logs] == [0, 1]
    assert "eval_top1" in logs[-1][2] and "train_loss" in logs[-1][2]


def test_tensorboard_backend_optional(tiny_data, teacher_ckpt, tmp_path, capsys, monkeypatch):
    from vanillakd.cli import train_kd
    base = [tiny_data, "--model", "test_resnet", "--teacher", "test_resnet", "--teacher-pretrained", teacher_ckpt,
            "--epochs", "1", "-b", "4", "--img-size", "32", "--workers", "0", "--no-progress", "--output", tmp_path,
            "--log-tensorboard"]
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # tensorboard not installed
    assert run_cli(train_kd.cli, base + ["--experiment", "t0"]) == 2
    assert "pip install tensorboard" in capsys.readouterr().err
    scalars = []

    class Writer:
        def __init__(self, log_dir):
            scalars.append(("dir", log_dir))

        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def close(self):
            scalars.append(("closed",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    assert run_cli(train_kd.cli, base + ["--experiment", "t1"]) == 0
    assert scalars[0] == ("dir", str(tmp_path / "t1" / "tensorboard")) and scalars[-1] == ("closed",)
    assert {t for t, *_ in scalars[1:-1]} >= {"train_loss", "eval_top1", "lr"}
