"""SIGTERM / SIGINT mid-epoch: the run finishes its step, writes a recovery checkpoint, says how to continue
and exits non-zero; continuing it gives the uninterrupted run's weights bit for bit."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import REPO, make_image_folder, save_teacher


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("sig"), classes=("a", "b"), per_class=(60, 4), size=40)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return save_teacher(tmp_path_factory.mktemp("sigt") / "t.pth", "test_resnet", num_classes=2)


ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def cmd(data, teacher, out, name, *extra):
    flags = [data, "--model", "test_resnet", "--teacher", "test_resnet", "--teacher-pretrained", teacher,
             "--epochs", "2", "-b", "4", "--img-size", "32", "--workers", "2", "--output", out, "--experiment", name,
             "--no-progress", "--opt", "adamw", "--lr", "1e-3", "--warmup-epochs", "0", "--seed", "4",
             "--aa", "rand-m7-mstd0.5", "--mixup", "0.2", "--model-ema", "--log-interval", "1", *extra]
    return [sys.executable, str(REPO / "train-kd.py")] + [str(a) for a in flags]


def stop_mid_epoch(argv, signum, after_line):
    """Start a run, send ``signum`` to all its processes (its DataLoader workers too, as Ctrl-C in a terminal
    and a batch system's SIGTERM do) once its log shows ``after_line``; return (exit code, stderr)."""
    proc = subprocess.Popen(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if after_line in line:
            os.killpg(proc.pid, signum)
            break
    rest = proc.communicate(timeout=300)[1]
    return proc.returncode, "".join(seen) + rest


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
@pytest.mark.parametrize("signum, accum", [(signal.SIGTERM, "1"), (signal.SIGINT, "2")])
def test_signal_mid_epoch_saves_and_resumes_exactly(data, teacher, tmp_path, signum, accum):
    extra = ("--grad-accum-steps", accum)
    full = subprocess.run(cmd(data, teacher, tmp_path, "full", *extra), env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert full.returncode == 0, full.stderr[-2000:]
    code, err = stop_mid_epoch(cmd(data, teacher, tmp_path, "stopped", *extra), signum, "Train 1 [   3/")
    assert code == 128 + signum, err[-2000:]
    stop_line = [ln for ln in err.splitlines() if f"stopped by {signal.Signals(signum).name}" in ln]
    assert len(stop_line) == 1 and "to continue, run the same command with --resume auto" in stop_line[0], err[-2000:]
    assert "Traceback" not in err
    recovery = torch.load(tmp_path / "stopped" / "recovery.pth.tar", weights_only=True)
    assert recovery["epoch"] == 1 and recovery["step"] >= 3 and recovery["step"] % int(accum) == 0
    assert f"after epoch 1, step {recovery['step']}/" in stop_line[0]

    resumed = subprocess.run(cmd(data, teacher, tmp_path, "stopped", *extra, "--resume", "auto"), env=ENV,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"continuing at epoch 1, step {recovery['step']}" in resumed.stderr
    a = torch.load(tmp_path / "full" / "last.pth.tar", weights_only=True)
    b = torch.load(tmp_path / "stopped" / "last.pth.tar", weights_only=True)
    assert_same(a["state_dict"], b["state_dict"])
    assert_same(a["state_dict_ema"], b["state_dict_ema"])


@pytest.mark.slow
def test_ddp_ranks_stop_after_the_same_step_and_resume_exactly(data, teacher, tmp_path):
    """torchrun, 2 gloo processes: SIGTERM to the whole job; the ranks agree on the step to stop after."""
    def ddp(name, *extra):
        single = cmd(data, teacher, tmp_path, name, "--workers", "1", *extra)
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] + single[1:]

    full = subprocess.run(ddp("full"), env=ENV, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert full.returncode == 0, full.stderr[-3000:]
    code, err = stop_mid_epoch(ddp("stopped"), signal.SIGTERM, "Train 1 [   2/")
    assert code != 0
    assert err.count("stopped by SIGTERM after epoch 1, step") == 1, err[-3000:]  # rank 0 says it
    recovery = torch.load(tmp_path / "stopped" / "recovery.pth.tar", weights_only=True)
    assert recovery["epoch"] == 1 and recovery["world_size"] == 2
    resumed = subprocess.run(ddp("stopped", "--resume", "auto"), env=ENV, capture_output=True, text=True,
                             timeout=300, cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"continuing at epoch 1, step {recovery['step']}" in resumed.stderr
    a = torch.load(tmp_path / "full" / "last.pth.tar", weights_only=True)
    b = torch.load(tmp_path / "stopped" / "last.pth.tar", weights_only=True)
    assert_same(a["state_dict"], b["state_dict"])


WORKERS = """
import subprocess, time
from torch.utils.data import DataLoader
from vanillakd.data.loader import workers_ignore_stop_signals

class Slow(list):
    def __getitem__(self, i):
        time.sleep(0.01)
        return list.__getitem__(self, i)

loader = DataLoader(Slow(range(400)), batch_size=2, num_workers=2, persistent_workers=True)
workers_ignore_stop_signals(loader)
it = iter(loader)
next(it)
for w in it._workers:  # SIGTERM from another process (kill), as a batch system signals every process of a job
    subprocess.run(["kill", "-TERM", str(w.pid)], check=True)
print(len(list(it)), flush=True)  # the workers live on and serve the rest of the epoch
raise RuntimeError("a crash after the workers started")
"""


def test_workers_survive_a_foreign_sigterm_yet_end_with_their_parent():
    """A worker ignores SIGTERM from others but ends on its parent's (multiprocessing's terminate() at exit), so
    a run that ends on an error never waits for ever on its workers."""
    r = subprocess.run([sys.executable, "-c", WORKERS], env=ENV, capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "199", r.stderr[-2000:]
    assert r.returncode == 1 and "a crash after the workers started" in r.stderr


def test_a_signal_ignored_by_the_parent_stays_ignored():
    from vanillakd.stop import StopSignals
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a shell starts a background job
    try:
        signals = StopSignals().install()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == signals._handle
        signals.restore()
        assert signal.getsignal(signal.SIGTERM) is not signals._handle
    finally:
        signal.signal(signal.SIGINT, before)
