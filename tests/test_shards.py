"""WebDataset shards: the epoch's layout over ranks and loader workers (every sample once), its replay from a
mid-epoch step, --epoch-repeats, and a 2-process torchrun run reading 4 shards."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from conftest import REPO, save_teacher
from dataset_files import write_shards

pytest.importorskip("webdataset")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("sh"), shards=4, per_shard=6)


def dataset(root, training=True):
    from vanillakd.data.sources import build_split_any
    return build_split_any("wds/tiny", str(root), "train" if training else "validation", training).dataset


def ids(items):
    return [tuple(int(v) for v in img.getpixel((0, 0))[:2]) for img, *_ in items]


@pytest.mark.parametrize("world,lanes,batch,repeats", [(2, 2, 3, 0), (2, 1, 4, 0), (1, 3, 2, 0), (2, 2, 3, 2)])
def test_epoch_covers_every_sample_once(shards, world, lanes, batch, repeats):
    layout = {}
    for rank in range(world):
        ds = dataset(shards)
        ds.configure(7, batch, lanes, world, rank, repeats)
        ds.set_epoch(3)
        for lane in range(lanes):
            items = list(ds._train_items(lane))
            assert len(items) == ds.batches_per_lane() * batch
            layout[(rank, lane)] = items
    seen = Counter(i for items in layout.values() for i in ids(items))
    copies = repeats or 1
    assert sorted(seen) == [(s, i) for s in range(4) for i in range(6)] and set(seen.values()) == {copies}
    positions = [x[2]["_position"] for x in layout[(0, 0)]]
    assert positions[:batch] == list(range(batch))  # lane 0 of each rank holds the rank's batch 0, 0 + lanes, ...


def test_epochs_differ_and_replay(shards):
    def epoch(e, start=0, worker=0):
        ds = dataset(shards)
        ds.configure(7, 3, 2, 1, 0)
        ds.set_epoch(e, start)
        return list(ds._train_items(worker))
    assert ids(epoch(0)) != ids(epoch(1)) and ids(epoch(0)) == ids(epoch(0))
    # resumed at batch 3: worker 0 serves lane 1 from its batch 1 (= batch 3), worker 1 lane 0 from batch 2 (= 4)
    full = {x[2]["_position"]: x for lane in (0, 1) for x in epoch(0, 0, lane)}
    for worker, first in ((0, 9), (1, 12)):
        resumed = epoch(0, 3, worker)
        assert resumed[0][2]["_position"] == first
        for img, target, extras in resumed:
            ref = full[extras["_position"]]
            assert target == ref[1] and (np.asarray(img) == np.asarray(ref[0])).all()


def test_eval_reads_every_sample_once_with_a_partial_batch(shards):
    seen = []
    for rank in range(2):
        ds = dataset(shards, training=False)
        ds.world_size, ds.rank, ds.batch_size, ds.lanes = 2, rank, 2, 2
        sizes = [sum(p.stop - p.start for p in ds._eval_lane(k)) for k in range(2)]
        # whole batches in every lane but one, so the loader's length (ceil(len / batch)) is exact
        assert sum(sizes) == len(ds) and sum(-(-s // 2) for s in sizes) == -(-len(ds) // 2)
        seen += [ds.decode(shard, s)[0].getpixel((0, 0))[:2] for k in range(2)
                 for shard, s in ds._raw(ds._eval_lane(k))]
    assert sorted(seen) == [(0, i) for i in range(9)]


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["0", "2"])
def test_torchrun_two_processes_see_each_sample_once(shards, tmp_path, workers):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=f"{REPO}:{REPO / 'tests'}", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "shard_coverage.py"), str(shards), str(tmp_path), workers]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in range(2)]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 4  # 24 samples / (2 ranks x batch 3)
    for epoch in ("0", "1"):
        seen = [tuple(s) for r in ranks for s in r["seen"][epoch]]
        assert sorted(seen) == [(s, i) for s in range(4) for i in range(6)]  # every sample, exactly once
    assert ranks[0]["seen"]["0"] != ranks[0]["seen"]["1"]


@pytest.mark.slow
def test_torchrun_train_kd_over_shards_with_accumulation(shards, tmp_path):
    teacher = save_teacher(tmp_path / "t.pth", "test_resnet", num_classes=3)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "train-kd.py"), shards, "--dataset", "wds/tiny", "--model", "test_resnet", "--teacher",
           "test_resnet", "--teacher-pretrained", teacher, "--epochs", "1", "-b", "3", "--grad-accum-steps", "2",
           "--img-size", "32", "--workers", "1", "--output", tmp_path, "--experiment", "ddp", "--no-progress"]
    r = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    log = (tmp_path / "ddp" / "log.txt").read_text()
    assert "replicas in sync" in log and "1 epochs of 4 steps" in log
    assert torch.load(tmp_path / "ddp" / "last.pth.tar", weights_only=True)["num_updates"] == 2


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_auto_over_shards(tmp_path):
    """A real kill: the run over shards (two workers) is SIGKILLed in epoch 1 and continued with --resume auto."""
    import signal
    import time
    data = write_shards(tmp_path / "big", shards=4, per_shard=24)
    teacher = save_teacher(tmp_path / "t.pth", "test_resnet", num_classes=3)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")

    def cmd(name, *extra, workers="2"):
        return [sys.executable, str(REPO / "train-kd.py"), str(data), "--dataset", "wds/tiny", "--model",
                "test_resnet", "--teacher", "test_resnet", "--teacher-pretrained", str(teacher), "--epochs", "2",
                "-b", "4", "--img-size", "32", "--workers", workers, "--output", str(tmp_path), "--experiment", name,
                "--no-progress", "--opt", "adamw", "--lr", "1e-3", "--seed", "2", "--aa", "rand-m7-mstd0.5",
                "--mixup", "0.2", "--recovery-interval", "3", *extra]

    full = subprocess.run(cmd("full"), env=env, capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-2000:]
    proc = subprocess.Popen(cmd("killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    recovery, killed = tmp_path / "killed" / "recovery.pth.tar", False
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if recovery.is_file():
            ckpt = torch.load(recovery, weights_only=True)
            if ckpt["epoch"] == 1 and ckpt["step"] >= 3:
                proc.send_signal(signal.SIGKILL)
                killed = True
                break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert killed, "the run ended before it could be killed in epoch 1"
    other = subprocess.run(cmd("killed", "--resume", "auto", workers="1"), env=env, capture_output=True, text=True)
    assert other.returncode == 2 and "continue with --workers 2" in other.stderr
    resumed = subprocess.run(cmd("killed", "--resume", "auto"), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "continuing at epoch 1, step" in resumed.stderr
    a = torch.load(tmp_path / "full" / "last.pth.tar", weights_only=True)
    b = torch.load(tmp_path / "killed" / "last.pth.tar", weights_only=True)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


def test_shards_through_a_pipe_command(shards):
    """``{}`` in DIR stands for each file name: streaming through a command (object storage: aws s3 cp ... -)."""
    def first_epoch(root):
        ds = dataset(root)
        ds.configure(7, 3, 1, 1, 0)
        return ids(ds._train_items(0))
    assert first_epoch(f"pipe:cat {shards}/{{}}") == first_epoch(shards)


# -------------------------------------------------------------------------- broken shards, resume, eval workers
def _first_epoch(root, batch=2):
    ds = dataset(root)
    ds.configure(7, batch, 1, 1, 0)
    return list(ds._train_items(0))


def _refusal(root, what):
    from vanillakd.errors import UserError
    with pytest.raises(UserError) as e:
        _first_epoch(root)
    message = str(e.value)
    assert "\n" not in message and what in message
    return message


def _lengths(root, split, lengths):
    info = json.loads((root / "_info.json").read_text())
    info["splits"][split]["shard_lengths"] = lengths
    (root / "_info.json").write_text(json.dumps(info))


def test_a_short_shard_is_refused_naming_it(tmp_path):
    """A truncated tar, or shard_lengths above what a shard holds, used to end the epoch early without a word."""
    cut = write_shards(tmp_path / "cut", shards=2, per_shard=8)
    tar = cut / "tiny-train-000001.tar"
    tar.write_bytes(tar.read_bytes()[:len(tar.read_bytes()) // 2 + 100])
    message = _refusal(cut, "tiny-train-000001.tar")
    assert "holds 5 samples" in message and "_info.json states 8" in message
    over = write_shards(tmp_path / "over", shards=2, per_shard=8)
    _lengths(over, "train", [10, 10])
    message = _refusal(over, "tiny-train-00000")  # whichever shard the epoch reads first
    assert "holds 8 samples" in message and "_info.json states 10" in message
    _lengths(over, "validation", [12])
    from vanillakd.errors import UserError
    with pytest.raises(UserError, match="tiny-validation-000000.tar holds 9 samples, but _info.json states 12"):
        list(dataset(over, training=False))


def test_an_unreadable_shard_is_a_one_line_error_naming_it(tmp_path):
    garbage = write_shards(tmp_path / "garbage", shards=2, per_shard=8)
    (garbage / "tiny-train-000001.tar").write_bytes(b"not a tar at all" * 100)
    assert "ReadError" in _refusal(garbage, "cannot read shard " + str(garbage / "tiny-train-000001.tar"))
    missing = write_shards(tmp_path / "missing", shards=2, per_shard=8)
    (missing / "tiny-train-000001.tar").unlink()
    assert "No such file" in _refusal(missing, "cannot read shard " + str(missing / "tiny-train-000001.tar"))
    _refusal(f"pipe:cat {missing}/{{}}", f"cannot read shard pipe:cat {missing}/tiny-train-000001.tar")


def test_resume_over_shards_keeps_the_last_short_accumulation(tmp_path, capsys):
    """14 steps, --grad-accum-steps 4: a resume at step 12 must still make the epoch's last (2-batch) update. The
    shard dataset's length ignored the resume point, so the loader's total was 12 + 14 and that update was lost."""
    from conftest import run_cli, save_teacher
    from vanillakd.cli import train_kd
    data = write_shards(tmp_path / "data", shards=3, per_shard=10)  # 30 / (2 workers x batch 2): 7 batches a lane
    teacher = save_teacher(tmp_path / "t.pth", "test_resnet", num_classes=3)

    def argv(exp, *extra):
        return [data, "--dataset", "wds/tiny", "--model", "test_resnet", "--teacher", "test_resnet",
                "--teacher-pretrained", teacher, "--epochs", "1", "-b", "2", "--img-size", "32", "--workers", "2",
                "--output", tmp_path, "--experiment", exp, "--no-progress", "--opt", "adamw", "--lr", "1e-3",
                "--seed", "3", "--grad-accum-steps", "4", "--recovery-interval", "4", *extra]
    assert run_cli(train_kd.cli, argv("full")) == 0
    full = tmp_path / "full"
    assert torch.load(full / "recovery.pth.tar", weights_only=True)["step"] == 12
    stopped = tmp_path / "stopped"  # the run killed right after its last recovery point
    stopped.mkdir()
    shutil.copy(full / "recovery.pth.tar", stopped / "recovery.pth.tar")
    capsys.readouterr()
    assert run_cli(train_kd.cli, argv("stopped", "--resume", "auto")) == 0
    a = torch.load(full / "last.pth.tar", weights_only=True)
    b = torch.load(stopped / "last.pth.tar", weights_only=True)
    assert a["num_updates"] == b["num_updates"] == 4
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    err = capsys.readouterr().err
    assert "continuing at epoch 0, step 12" in err and "[  14/14]" in err  # not [14/26]


def test_eval_over_shards_with_workers_sees_every_image(shards, tmp_path):
    """-b 2 --workers 3: the eval lanes were cut for batch 1, so the loader's 5 batches held 8 of the 9 images."""
    from conftest import run_cli, save_teacher
    from vanillakd.cli import validate
    from vanillakd.data.loader import build_eval_loader
    cfg = dict(input_size=(3, 32, 32), interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0)
    loader = build_eval_loader(dataset(shards, training=False), cfg, 2, 3, torch.device("cpu"))
    assert len(loader) == 5 and sum(x.shape[0] for _, (x, _) in zip(range(len(loader)), loader)) == 9
    ckpt = save_teacher(tmp_path / "m.pth", "test_resnet", num_classes=3)
    losses = []
    for workers in ("0", "3"):
        out = tmp_path / f"v{workers}.json"
        assert run_cli(validate.cli, [shards, "--dataset", "wds/tiny", "--model", "test_resnet", "--checkpoint", ckpt,
                                      "--img-size", "32", "-b", "2", "--workers", workers, "--results-file", out,
                                      "--no-progress"]) == 0
        result = json.loads(out.read_text())
        assert result["images"] == 9
        losses.append(result["loss"])
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
