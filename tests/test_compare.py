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


def counting_runner(monkeypatch) -> list[list[str]]:
    """Every training run compare starts (the injected runner, counted)."""
    from vanillakd.cli import run_config
    calls, real = [], run_config.run_train_argv

    def counted(argv, *args, **kwargs):
        calls.append(list(argv))
        return real(argv, *args, **kwargs)
    monkeypatch.setattr(run_config, "run_train_argv", counted)
    return calls


def results(out):
    return list(csv.DictReader(open(out / "results.csv")))


def test_tiny_grid_end_to_end(tiny_data, teacher_ckpt, tmp_path, capsys):
    argv = [tiny_data, "--model", "test_resnet", "--teacher", "test_resnet", "--teacher-pretrained", teacher_ckpt,
            "--methods", "none", "kd", "dkd", "--fractions", "0.5", "1.0", "--seeds", "0", "--output",
            tmp_path / "cmp"] + RECIPE
    assert run_cli(lambda a: wrap(compare_main, a), argv) == 0
    out = tmp_path / "cmp"
    rows = results(out)
    assert sorted((r["method"], float(r["fraction"])) for r in rows) == sorted(
        (m, f) for m in ("none", "kd", "dkd") for f in (0.5, 1.0))
    for r in rows:
        assert 0 <= float(r["top1"]) <= 100 and r["seed"] == "0" and r["epochs"] == "2"
        assert float(r["wall_time_s"]) > 0 and r["agreement"] != "" and r["teacher_top1"] != ""
        assert int(r["train_images"]) == (12 if float(r["fraction"]) == 0.5 else 24)
        assert r["model"] == "test_resnet" and r["teacher"] == "test_resnet" and len(r["cell_id"]) == 12
        assert r["recipe"].startswith("--epochs 2 -b 4") and r["teacher_sha256"] and r["data_digest"]
    assert len({r["recipe_id"] for r in rows}) == 1 and len({r["cell_id"] for r in rows}) == 2
    md = (out / "results.md").read_text()
    assert "| model | teacher | data | recipe | method | 50% of train | 100% of train |" in md
    assert "| none |" in md and "| kd |" in md and "| dkd |" in md and "(n=1)" in md
    assert not [line for line in md.splitlines() if line.startswith("| test_resnet") and "±" in line]
    assert "agreement" in md and "Teacher top-1 on the same val set: test_resnet " in md
    for png in ["top1_vs_fraction.png", "kd_gap_vs_fraction.png", "curves-frac0.5-seed0.png",
                "curves-frac1-seed0.png"]:
        assert_png(out / png)


def test_changed_grid_runs_exactly_the_new_or_changed_cells(tiny_data, teacher_ckpt, tmp_path, capsys,
                                                             monkeypatch):
    calls = counting_runner(monkeypatch)
    out = tmp_path / "cmp"
    base = [tiny_data, "--model", "test_resnet", "--teacher", "test_resnet", "--teacher-pretrained", teacher_ckpt,
            "--seeds", "0", "--output", out]
    recipe = ["--", "-b", "4", "--img-size", "32", "--workers", "0", "--no-progress", "--warmup-epochs", "0"]

    def grid(methods, fractions, epochs, runs, reused):
        calls.clear()
        capsys.readouterr()
        argv = base + ["--methods", *methods, "--fractions", *fractions] + recipe + ["--epochs", epochs]
        assert run_cli(lambda a: wrap(compare_main, a), argv) == 0
        assert len(calls) == runs and capsys.readouterr().err.count("with the same identity, reused") == reused
        rows = results(out)
        assert sorted((r["method"], float(r["fraction"])) for r in rows) == sorted(
            (m, float(f)) for m in methods for f in fractions)
        assert {r["epochs"] for r in rows} == {epochs} and {r["recipe"].split()[-1] for r in rows} == {epochs}
        md = (out / "results.md").read_text()
        assert all(f"| {m} |" in md for m in methods) and md.count(" of train") == 2 * len(fractions)
        return rows

    first = grid(["none", "kd"], ["0.5"], "1", runs=1, reused=0)
    assert not (out / "kd_gap_vs_fraction.png").exists()
    # an added fraction: only its cell trains
    grid(["none", "kd"], ["0.5", "1.0"], "1", runs=1, reused=1)
    assert [r for r in results(out) if r["fraction"] == "0.5"] == first
    # a changed recipe: every cell trains again, into new folders
    grid(["none", "kd"], ["0.5", "1.0"], "2", runs=2, reused=0)
    # an added method: the methods share one run per cell, so every cell trains again
    rows = grid(["none", "kd", "dkd"], ["0.5", "1.0"], "2", runs=2, reused=0)
    assert_png(out / "kd_gap_vs_fraction.png")
    # nothing changed: nothing trains, nothing is rewritten
    done = sorted((out / "cells").glob("*/cell.json"))
    stamps = [p.stat().st_mtime_ns for p in done]
    assert grid(["none", "kd", "dkd"], ["0.5", "1.0"], "2", runs=0, reused=2) == rows
    assert [p.stat().st_mtime_ns for p in done] == stamps
    # every earlier cell is still on disk (6 trainings, 6 folders), each with its identity
    cells = sorted(d for d in (out / "cells").iterdir() if d.is_dir())
    assert len(cells) == 6 and all((d / "identity.json").is_file() for d in cells)
    assert {r["cell_id"] for r in rows} <= {d.name.rsplit("-", 1)[1] for d in cells}
    assert sorted(p.name for p in out.glob("curves-*.png")) == ["curves-frac0.5-seed0.png", "curves-frac1-seed0.png"]


def test_compare_without_matplotlib(tiny_data, teacher_ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # a plain install without the plotting extra
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    out = tmp_path / "cmp"
    argv = [tiny_data, "--model", "test_resnet", "--teacher", "test_resnet", "--teacher-pretrained", teacher_ckpt,
            "--methods", "none", "kd", "--fractions", "0.5", "1.0", "--output", out] + RECIPE[:2] + ["1"] + RECIPE[3:]
    assert run_cli(lambda a: wrap(compare_main, a), argv) == 0
    err = capsys.readouterr().err
    assert len(results(out)) == 4 and "| kd |" in (out / "results.md").read_text()
    assert err.count("pip install matplotlib") == 1 and "Traceback" not in err
    assert not list(out.glob("*.png"))


def test_compare_flags(capsys):
    from vanillakd.cli.compare import build_parser, load_grid
    with pytest.raises(SystemExit):
        load_grid(["/data", "--model", "test_resnet", "--epochs", "3"])
    err = capsys.readouterr().err
    assert "unrecognized arguments: --epochs 3" in err and "go after --" in err
    with pytest.raises(SystemExit):
        load_grid(["/data", "--methods", "kd", "rkd"])
    assert "invalid choice: 'rkd'" in capsys.readouterr().err
    text = build_parser().format_help()
    assert "none, bkd, dist, dkd, kd (" in " ".join(text.split()) and "review" not in text


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
    cfg.write_text("data_dir: /data\nmodel: m\nteacher: t\nteacher_pretrained: t.pth\nmethods: [kd, crd]\n")
    with pytest.raises(UserError, match=r"cannot run the methods \['crd'\].*train-fd / train-crd"):
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
