"""What a user sees of a training run: each log line once, defaults in --help, the recipe at start-up, an end
line naming the best file and the time, readable summaries, run names and per-student files that say what
ran, no empty folder after a failed start, and --version."""
from __future__ import annotations

import csv
import logging
import re

import pytest
import yaml

from conftest import run_cli, run_script
from vanillakd.cli import train_kd
from vanillakd.outputs import readable, setup_console_logging

pytestmark = pytest.mark.slow


def train(data, teacher, out, *extra):
    return [data, "--teacher", "test_resnet", "--teacher-pretrained", teacher, "--epochs", "2", "-b", "4",
            "--img-size", "32", "--workers", "0", "--output", out, "--no-progress", "--log-interval", "3", *extra]


def test_single_student_log_has_each_line_once(tiny_data, teacher_ckpt, tmp_path, capfd):
    assert run_cli(train_kd.cli, train(tiny_data, teacher_ckpt, tmp_path, "--model", "test_resnet",
                                       "--experiment", "one")) == 0
    lines = [line.split(" ", 2)[2] for line in (tmp_path / "one" / "log.txt").read_text().splitlines()]
    assert any(line.startswith("Eval 1:") for line in lines)
    repeated = {line for line in lines if lines.count(line) > 1}
    assert not repeated, f"lines written twice: {sorted(repeated)[:3]}"


def test_start_and_end_lines_say_what_ran(tiny_data, teacher_ckpt, tmp_path, capfd):
    assert run_cli(train_kd.cli, train(tiny_data, teacher_ckpt, tmp_path, "--model", "test_resnet", "test_vit",
                                       "--kd-loss", "kd", "dkd", "--temperature", "4")) == 0
    err = capfd.readouterr().err
    run = next(tmp_path.iterdir())
    assert run.name.endswith("-test_resnet-kd+dkd")  # the automatic run name carries the methods
    # the resolved recipe, per student
    assert re.search(r"student 1 test_vit <- test_resnet: dkd \(kd weight 1, base weight 1, temperature 4\.0, "
                     r"dkd-alpha 1\.0, dkd-beta 2\.0\); sgd lr 0\.05 wd 2e-05, smoothing 0\.1; batch 4 x 1 "
                     r"process\(es\) x 1 accumulation = 4 per update; 2 epochs \(3 warm-up, cosine\)", err)
    assert "--warmup-epochs 3 is not shorter than --epochs 2: the lr never reaches --lr" in err
    # several students: every Train / Eval / done line names its student
    for kind in ("Train 1 [   6/6]", "Eval 1:", "done in"):
        tagged = [line for line in err.splitlines() if kind in line]
        assert len(tagged) == 2 and all("[test_" in line or "student" in line for line in tagged), tagged
    done = [line for line in err.splitlines() if "done in" in line]
    assert all("model_best.pth.tar" in line for line in done)
    # each student's args.yaml holds its own setting; the run folder keeps the whole command line
    own = yaml.safe_load(open(run / "student1-test_vit-dkd" / "args.yaml"))
    assert own["model"] == ["test_vit"] and own["kd_loss"] == ["dkd"]
    assert yaml.safe_load(open(run / "args.yaml"))["kd_loss"] == ["kd", "dkd"]
    # summary.csv: numbers a person reads
    rows = list(csv.DictReader(open(run / "student0-test_resnet-kd" / "summary.csv")))
    values = [v for r in rows for v in r.values() if v]
    assert all(float(v) == float(f"{float(v):.6g}") and len(v) <= 10 for v in values), values


def test_run_eta_covers_the_whole_run(tiny_data, teacher_ckpt, tmp_path, capfd):
    assert run_cli(train_kd.cli, train(tiny_data, teacher_ckpt, tmp_path, "--model", "test_resnet",
                                       "--experiment", "eta")) == 0
    err = capfd.readouterr().err
    assert re.search(r"Train 0 \[   3/6\] .* ETA \d:\d\d:\d\d, run \d:\d\d:\d\d \(training only\)", err)
    assert not re.search(r"Train 1 .* run \d", err)  # the last epoch: its ETA is the run's


def test_failed_start_leaves_no_empty_run_folder(tiny_data, tmp_path, capfd):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    rc = run_cli(train_kd.cli, [tiny_data, "--model", "test_resnet", "--teacher", "test_resnet",
                                "--teacher-pretrained", bad, "--img-size", "32", "--workers", "0",
                                "--output", tmp_path / "out", "--experiment", "x", "--no-progress"])
    assert rc == 2
    assert not (tmp_path / "out" / "x").exists()


def test_a_folder_that_existed_is_kept_after_a_failed_start(tiny_data, tmp_path, capfd):
    keep = tmp_path / "out" / "x"
    keep.mkdir(parents=True)
    (keep / "log.txt").write_text("an earlier run\n")
    rc = run_cli(train_kd.cli, [tiny_data, "--model", "no_such_model_xyz", "--output", tmp_path / "out",
                                "--experiment", "x"])
    assert rc == 2 and (keep / "log.txt").read_text().startswith("an earlier run")


def test_forgotten_teacher_flag_is_named(tiny_data, teacher_ckpt, tmp_path, capfd):
    rc = run_cli(train_kd.cli, [tiny_data, "--model", "test_resnet", "--teacher-pretrained", teacher_ckpt,
                                "--img-size", "32", "--workers", "0", "--output", tmp_path, "--no-progress"])
    err = capfd.readouterr().err
    assert rc == 2 and "--teacher is beitv2_base_patch16_224: if the file holds another architecture, pass " \
                       "--teacher ARCH" in err


def test_help_shows_defaults():
    r = run_script("train-kd.py", "--help")
    text = " ".join(r.stdout.split())
    for shown in ("per-process batch size (> 0) (default: 128)", "(default: 300)", "(default: sgd)", "(default: 0.05)",
                  "student architecture(s), timm names (default: resnet50)",
                  "teacher architecture (timm name) (default: beitv2_base_patch16_224)"):
        assert shown in text, shown
    r = run_script("-m vanillakd", "validate", "--help")
    assert r.returncode == 0 and "(default:" in r.stdout


def test_version():
    r = run_script("-m vanillakd", "--version")
    assert r.returncode == 0 and re.fullmatch(r"vanillakd \S+ \(torch \S+, timm \S+, python \S+\)\n", r.stdout)


def test_log_lines_go_around_a_progress_bar(capsys):
    tqdm = pytest.importorskip("tqdm")
    logger = setup_console_logging()
    with tqdm.tqdm(total=3, file=None) as bar:
        bar.update(1)
        logger.info("a line while the bar is up")
    err = capsys.readouterr().err
    # tqdm.write clears the bar first: the line starts at the beginning of a line, not glued to the bar
    assert re.search(r"(^|\n|\r)\d\d:\d\d:\d\d a line while the bar is up\n", err)


def test_readable_numbers():
    assert readable(0.00039999999999999996) == 0.0004
    assert readable(66.66666666666667) == 66.6667
    assert readable(3) == 3 and readable("") == ""


def teardown_module():
    logging.getLogger("vanillakd").setLevel(logging.INFO)


def test_every_checkpoint_records_the_best_including_its_epoch(tiny_data, teacher_ckpt, tmp_path, capfd):
    import torch
    assert run_cli(train_kd.cli, train(tiny_data, teacher_ckpt, tmp_path, "--model", "test_resnet",
                                       "--experiment", "best", "--epochs", "3", "--warmup-epochs", "0")) == 0
    rows = list(csv.DictReader(open(tmp_path / "best" / "summary.csv")))
    top = max(range(len(rows)), key=lambda i: (float(rows[i]["eval_top1"]), -i))  # first epoch of the max
    for name in ("last.pth.tar", "model_best.pth.tar"):
        best = torch.load(tmp_path / "best" / name, weights_only=True)["best"]
        assert best["epoch"] == top and best["metric"] == pytest.approx(float(rows[top]["eval_top1"]), abs=1e-3)
