"""Multi-process training on the CPU (gloo): torchrun and the legacy launcher, several students and EMA decays,
feature methods and CRD, rank 0 alone writes, replicas stay identical, a dead rank ends the job."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, run_cli, save_teacher
from vanillakd.cli import train_kd

pytestmark = pytest.mark.slow


def launch(script: str, *args, nproc: int = 2, legacy: bool = False, timeout: float = 300, **popen):
    launcher = ["-m", "torch.distributed.launch"] if legacy else ["-m", "torch.distributed.run", "--standalone"]
    cmd = [sys.executable, *launcher, f"--nproc_per_node={nproc}"] + \
        (["--master_port", "29517"] if legacy else []) + [str(REPO / script)] + [str(a) for a in args]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
               VANILLAKD_STACKS_ON_USR1="1")
    if popen:
        return subprocess.Popen(cmd, env=env, cwd=REPO, **popen)
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # a hang: every process of the job prints its threads' stacks (SIGUSR1, see errors.run_cli), then dies
        _signal_all(_descendants(proc.pid), signal.SIGUSR1, pause=1.0)  # one at a time: stacks not interleaved
        time.sleep(2)
        _signal_all([proc.pid, *_descendants(proc.pid)], signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{script} hung for {timeout} s; the stacks of its processes:\n{err[-20000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _signal_all(pids: list[int], sig: int, pause: float = 0.0) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
        time.sleep(pause)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (ranks and their data workers), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return save_teacher(tmp_path_factory.mktemp("dt") / "t.pth", "test_resnet", num_classes=3)


def common(data, teacher, out, name, *extra):
    return [data, "--teacher", "test_resnet", "--teacher-pretrained", teacher, "--epochs", "2", "-b", "4",
            "--img-size", "32", "--workers", "1", "--output", out, "--experiment", name, "--no-progress",
            "--opt", "adamw", "--lr", "1e-3", "--log-interval", "2", *extra]


def only_rank0_wrote(run_dir):
    logs = [p for p in run_dir.rglob("log.txt")]
    text = "".join(p.read_text() for p in logs)
    assert "replicas in sync: student weights compared on 2 ranks" in text
    assert "replicas DIFFER" not in text
    return text


def test_torchrun_two_students_two_ema_decays(tiny_data, teacher, tmp_path):
    r = launch("train-kd.py", *common(tiny_data, teacher, tmp_path, "kd", "--model", "test_resnet", "test_vit",
                                      "test_resnet", "--kd-loss", "kd", "dkd", "kd", "--model-ema",
                                      "--model-ema-decay", "0.9", "0.9", "0.99"))
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "kd"
    students = sorted(p.name for p in run.iterdir() if p.is_dir())
    assert students == ["student0-test_resnet-kd", "student1-test_vit-dkd"]
    only_rank0_wrote(run)
    assert (run / "log.txt").read_text().count("replicas in sync") == 2  # one line per student
    s0 = run / students[0]
    rows = list(csv.DictReader(open(s0 / "summary.csv")))
    assert len(rows) == 2 and rows[-1]["ema0.9_top1"] != "" and rows[-1]["ema0.99_top1"] != ""
    ckpt = torch.load(s0 / "last.pth.tar", weights_only=True)
    assert set(ckpt["state_dicts_ema"]) == {"ema0.9", "ema0.99"}
    assert (s0 / "model_best_ema0.99.pth.tar").is_file()
    # one progress stream: the epoch lines appear once per student, not once per rank
    assert r.stderr.count("Train 1 [   3/3]") == 2


@pytest.mark.parametrize("script,method", [("train-fd.py", "review"), ("train-crd.py", "crd")])
def test_torchrun_feature_methods(tiny_data, teacher, tmp_path, script, method):
    r = launch(script, *common(tiny_data, teacher, tmp_path, method, "--model", "test_resnet", "--kd-loss", method,
                               "--nce-k", "6"))
    assert r.returncode == 0, r.stderr[-3000:]
    only_rank0_wrote(tmp_path / method)
    ckpt = torch.load(tmp_path / method / "last.pth.tar", weights_only=True)
    assert ckpt["kd_state"]


def test_legacy_launcher_passes_local_rank(tiny_data, teacher, tmp_path):
    r = launch("train-kd.py", *common(tiny_data, teacher, tmp_path, "legacy", "--model", "test_resnet"),
               legacy=True)
    assert r.returncode == 0, r.stderr[-3000:]
    only_rank0_wrote(tmp_path / "legacy")


def test_two_processes_equal_one_process_with_double_batch(tiny_data, teacher, tmp_path):
    """Vanilla KD, test_vit (no batch norm), no random augmentation: 2 x B/2 = 1 x B after one step."""
    # SGD: the update is linear in the gradient (Adam's first step, g / |g|, magnifies rounding of tiny g)
    flags = ["--model", "test_vit", "--no-aug", "--hflip", "0", "--epochs", "1", "--max-train-steps", "1",
             "--warmup-epochs", "0", "--checkpoint-hist", "0", "--sched", "step", "--decay-epochs", "100",
             "--opt", "momentum", "--momentum", "0", "--lr", "0.5"]
    one = common(tiny_data, teacher, tmp_path, "one", *flags)
    one[one.index("-b") + 1] = "8"
    assert run_cli(train_kd.cli, one) == 0
    two = common(tiny_data, teacher, tmp_path, "two", *flags)
    r = launch("train-kd.py", *two)
    assert r.returncode == 0, r.stderr[-3000:]
    a = torch.load(tmp_path / "one" / "last.pth.tar", weights_only=True)
    b = torch.load(tmp_path / "two" / "last.pth.tar", weights_only=True)
    for k in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][k], b["state_dict"][k], rtol=1e-5, atol=1e-6)
    ra = next(csv.DictReader(open(tmp_path / "one" / "summary.csv")))
    rb = next(csv.DictReader(open(tmp_path / "two" / "summary.csv")))
    assert float(ra["train_loss"]) == pytest.approx(float(rb["train_loss"]), rel=1e-4)


def test_killed_rank_ends_the_job(tiny_data, teacher, tmp_path):
    args = common(tiny_data, teacher, tmp_path, "kill", "--model", "test_resnet", "--epochs", "200")
    proc = launch("train-kd.py", *args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        workers = []
        while time.time() < deadline and len(workers) < 2:
            time.sleep(1)
            workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                                       text=True).stdout.split()]
        assert len(workers) == 2, "workers did not start"
        time.sleep(8)  # into training
        os.kill(workers[-1], signal.SIGKILL)
        start = time.time()
        rc = proc.wait(timeout=120)
        assert rc != 0 and time.time() - start < 120
    finally:
        if proc.poll() is None:
            proc.kill()


def test_teacher_cache_under_torchrun(tiny_data, teacher, tmp_path, capsys):
    """cache-teacher under torchrun writes each rank's share; DDP training from it equals live DDP training; a
    single-process run refuses the two-process cache."""
    flags = common(tiny_data, teacher, tmp_path, "x", "--model", "test_resnet", "--mixup", "0.8", "--cutmix", "1.0",
                   "--aa", "rand-m9-mstd0.5", "--reprob", "0.25", "--seed", "7")
    flags = [str(a) for a in flags if str(a) not in ("--experiment", "x")]
    cache = tmp_path / "cache"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
               VANILLAKD_STACKS_ON_USR1="1")

    def cache_teacher(*argv):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               "-m", "vanillakd", "cache-teacher", *argv, "--cache-dir", str(cache), "--cache-topk",
                               "0"], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    r = cache_teacher(*flags)
    assert r.returncode == 0, r.stderr[-3000:]
    # rank 0 checks the folder and every rank stops with its refusal (none waits for the others)
    r = cache_teacher(*[a if a != "7" else "8" for a in flags])
    assert r.returncode != 0 and r.stderr.count("seed: cache 7, run 8") == 2, r.stderr[-3000:]
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == [
        "epoch0000-rank0", "epoch0000-rank1", "epoch0001-rank0", "epoch0001-rank1"]
    for name, extra in (("live", []), ("cached", ["--teacher-cache", str(cache)])):
        r = launch("train-kd.py", *flags, "--experiment", name, *extra)
        assert r.returncode == 0, r.stderr[-3000:]
    live = torch.load(tmp_path / "live" / "last.pth.tar", weights_only=True)["state_dict"]
    cached = torch.load(tmp_path / "cached" / "last.pth.tar", weights_only=True)["state_dict"]
    assert all(torch.allclose(live[k].float(), cached[k].float(), atol=1e-5) for k in live)
    assert run_cli(train_kd.cli, [*flags, "--experiment", "single", "--teacher-cache", str(cache)]) == 2
    assert "world_size: cache 2, run 1" in capsys.readouterr().err
