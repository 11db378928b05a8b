"""The demo drives the real train-kd code on real Fashion-MNIST images; here with a tiny budget."""
from __future__ import annotations

import re

from conftest import run_cli
from vanillakd.cli.demo import main as demo_main
from vanillakd.errors import run_cli as wrap

TINY = ["--teacher-model", "test_resnet", "--teacher-per-class", "12", "--teacher-epochs", "1",
        "--student-per-class", "8", "--student-epochs", "1", "--val-per-class", "6", "--batch-size", "16",
        "--workers", "0"]


def test_demo_prints_table_and_reuses_teacher(fashion_mnist, tmp_path, capsys):
    argv = ["--data", fashion_mnist, "--output", tmp_path / "demo"] + TINY
    assert run_cli(lambda a: wrap(demo_main, a), argv) == 0
    out = capsys.readouterr()
    rows = re.findall(r"^\| (teacher|scratch|vanilla KD|DKD) \| (\S+) \| (\S+) \| ([\d.]+) \| ([\d.]+) \((\d+)\) \|$",
                      out.out, re.M)
    assert [r[0] for r in rows] == ["teacher", "scratch", "vanilla KD", "DKD"]
    # one kind of number per column, each said: the last epoch's top-1, the best with its epoch
    assert "top-1, last epoch (%)" in out.out and "best top-1 (%) (epoch)" in out.out
    assert all(0 <= float(r[3]) <= float(r[4]) <= 100 for r in rows)
    logged = re.findall(r"done in .*: best top1 ([\d.]+) at epoch (\d+)", out.err)
    assert [(f"{float(b):.2f}", e) for b, e in logged[1:]] == [(r[4], r[5]) for r in rows[1:]]
    teacher = tmp_path / "demo" / "teacher" / "model_best.pth.tar"
    mtime = teacher.stat().st_mtime_ns
    # the second run reuses the teacher it trained before
    assert run_cli(lambda a: wrap(demo_main, a), argv) == 0
    assert "reusing the teacher" in capsys.readouterr().err
    assert teacher.stat().st_mtime_ns == mtime
