"""Run folders: an earlier run is never written into except by --resume, a live run's folder is locked, and
--resume auto starts a run that does not exist yet."""
from __future__ import annotations

import hashlib
import subprocess
import sys
import time

import pytest

from conftest import REPO, run_cli, save_teacher
from vanillakd.cli import train_kd


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return save_teacher(tmp_path_factory.mktemp("rf") / "t.pth", "test_resnet", num_classes=3)


def argv(data, teacher, out, *extra):
    return [data, "--model", "test_resnet", "--teacher", "test_resnet", "--teacher-pretrained", teacher,
            "--epochs", "1", "-b", "4", "--img-size", "32", "--workers", "0", "--output", out, "--no-progress",
            "--opt", "adamw", "--lr", "1e-3", "--warmup-epochs", "0", "--max-train-steps", "2", *extra]


def digests(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_rerun_with_the_same_experiment_takes_a_fresh_folder(tiny_data, teacher, tmp_path, capsys):
    assert run_cli(train_kd.cli, argv(tiny_data, teacher, tmp_path, "--experiment", "x")) == 0
    before = digests(tmp_path / "x")
    assert run_cli(train_kd.cli, argv(tiny_data, teacher, tmp_path, "--experiment", "x", "--seed", "5")) == 0
    assert digests(tmp_path / "x") == before  # the first run is untouched
    assert (tmp_path / "x-1" / "last.pth.tar").is_file()
    err = capsys.readouterr().err
    assert "holds an earlier run" in err and "x-1" in err
    assert not (tmp_path / "x" / ".lock").exists() and not (tmp_path / "x-1" / ".lock").exists()


def test_an_empty_existing_folder_is_used(tiny_data, teacher, tmp_path):
    (tmp_path / "made").mkdir()
    assert run_cli(train_kd.cli, argv(tiny_data, teacher, tmp_path, "--experiment", "made")) == 0
    assert (tmp_path / "made" / "last.pth.tar").is_file() and not (tmp_path / "made-1").exists()


@pytest.mark.parametrize("name", ["../escape", "/tmp/abs", "a/../../b", ".."])
def test_experiment_stays_inside_output(tiny_data, teacher, tmp_path, capsys, name):
    out = tmp_path / "out"
    assert run_cli(train_kd.cli, argv(tiny_data, teacher, out, "--experiment", name)) == 2
    assert "--experiment" in capsys.readouterr().err
    assert not (tmp_path / "escape").exists() and not (tmp_path / "b").exists()


def test_resume_auto_on_a_new_run_starts_it_then_continues_it(tiny_data, teacher, tmp_path, capsys):
    first = argv(tiny_data, teacher, tmp_path, "--experiment", "q", "--resume", "auto")
    assert run_cli(train_kd.cli, first) == 0
    assert "has no checkpoint yet, so the run starts there" in capsys.readouterr().err
    assert (tmp_path / "q" / "last.pth.tar").is_file()
    longer = argv(tiny_data, teacher, tmp_path, "--experiment", "q", "--resume", "auto")
    longer[longer.index("--epochs") + 1] = "2"
    assert run_cli(train_kd.cli, longer) == 0  # the same command line, requeued with more epochs
    err = capsys.readouterr().err
    assert "continuing at epoch 1" in err and "--epochs 1 -> 2" in err


HOLD_LOCK = """
import sys, time
from pathlib import Path
from vanillakd.run_folder import RunLock
lock = RunLock(Path(sys.argv[1]))
assert lock.acquire()
print("held", flush=True)
time.sleep(120)
"""


def test_a_live_run_folder_is_locked(tiny_data, teacher, tmp_path, capsys):
    folder = tmp_path / "busy"
    folder.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code = run_cli(train_kd.cli, argv(tiny_data, teacher, tmp_path, "--experiment", "busy", "--resume", "auto"))
        assert code == 2
        err = capsys.readouterr().err
        assert "is in use by another live process" in err and f"pid {holder.pid}" in err
        # a new run with that name does not wait: it takes the next free name
        assert run_cli(train_kd.cli, argv(tiny_data, teacher, tmp_path, "--experiment", "busy")) == 0
        assert (tmp_path / "busy-1" / "last.pth.tar").is_file()
        assert not (folder / "last.pth.tar").exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_and_stale_temp_files_are_taken_over(tiny_data, teacher, tmp_path, capsys):
    folder = tmp_path / "killed"
    folder.mkdir()
    (folder / ".lock").write_text("pid 999999 on elsewhere, since 2026-01-01 00:00:00")  # nobody holds it
    stale = [folder / ".last.pth.tar.k3x9a2_q.tmp", folder / ".summary.csv.0abc12zz.tmp"]
    for p in stale:
        p.write_bytes(b"half a save")
    keep = folder / ".notes.old.tmp"  # not a name our saves make
    keep.write_text("mine")
    assert run_cli(train_kd.cli, argv(tiny_data, teacher, tmp_path, "--experiment", "killed", "--resume", "auto")) == 0
    err = capsys.readouterr().err
    assert "taking over the stale lock" in err and "pid 999999" in err
    assert "removed 2 unfinished temp file(s)" in err
    assert not any(p.exists() for p in stale) and keep.read_text() == "mine"
    assert (folder / "last.pth.tar").is_file() and not (folder / ".lock").exists()


def test_two_runs_started_at_once_get_two_folders(tiny_data, teacher, tmp_path):
    cmd = [sys.executable, str(REPO / "train-kd.py")] + [str(a) for a in argv(tiny_data, teacher, tmp_path,
                                                                               "--experiment", "same")]
    env = {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    deadline = time.time() + 300
    errs = [p.communicate(timeout=max(1, deadline - time.time()))[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert (tmp_path / "same" / "last.pth.tar").is_file() and (tmp_path / "same-1" / "last.pth.tar").is_file()
    assert not (tmp_path / "same-2").exists()


def test_too_long_an_experiment_name_is_one_line(tiny_data, teacher, tmp_path, capsys):
    assert run_cli(train_kd.cli, argv(tiny_data, teacher, tmp_path, "--experiment", "x" * 300)) == 2
    assert "bytes long; at most 240" in capsys.readouterr().err


def test_a_link_planted_at_the_lock_is_not_followed(tiny_data, teacher, tmp_path, capsys):
    folder = tmp_path / "planted"
    folder.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (folder / ".lock").symlink_to(victim)
    assert run_cli(train_kd.cli, argv(tiny_data, teacher, tmp_path, "--experiment", "planted", "--resume",
                                      "auto")) == 2
    assert "is not a lock file but a link" in capsys.readouterr().err
    assert victim.read_text() == "precious"


def test_a_users_own_checkpoint_file_in_the_folder_is_left_alone(tiny_data, teacher, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "checkpoint-final.pth.tar").write_bytes(b"my own file")
    assert run_cli(train_kd.cli, argv(tiny_data, teacher, tmp_path, "--experiment", "mine", "--resume", "auto",
                                      "--checkpoint-hist", "1")) == 2  # something to resume, which does not load
    assert (folder / "checkpoint-final.pth.tar").read_bytes() == b"my own file"
    assert run_cli(train_kd.cli, argv(tiny_data, teacher, tmp_path, "--experiment", "mine-run",
                                      "--checkpoint-hist", "1")) == 0
    (tmp_path / "mine-run" / "checkpoint-final.pth.tar").write_bytes(b"mine too")
    longer = argv(tiny_data, teacher, tmp_path, "--experiment", "mine-run", "--resume", "auto", "--checkpoint-hist",
                  "1")
    longer[longer.index("--epochs") + 1] = "2"
    assert run_cli(train_kd.cli, longer) == 0  # pruning the epoch checkpoints skips it
    assert (tmp_path / "mine-run" / "checkpoint-final.pth.tar").read_bytes() == b"mine too"
    assert sorted(p.name for p in (tmp_path / "mine-run").glob("checkpoint-*")) == [
        "checkpoint-1.pth.tar", "checkpoint-final.pth.tar"]
