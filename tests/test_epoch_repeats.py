"""--epoch-repeats F: one epoch passes over the training set F times, each copy with its own augmentation."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from conftest import run_cli
from vanillakd.cli import train_kd
from vanillakd.data.repeats import EpochRepeatSampler


@pytest.mark.parametrize("repeats,world", [(2.0, 1), (1.5, 2), (3.0, 2)])
def test_each_sample_floor_or_ceil_f_times(repeats, world):
    counts = Counter()
    for rank in range(world):
        s = EpochRepeatSampler(10, repeats, world, rank, seed=1)
        s.set_epoch(4)
        order = list(s)
        assert len(order) == len(s) == -(-round(repeats * 10) // world)
        counts.update(order)
    total = round(repeats * 10)
    assert sum(counts.values()) == -(-total // world) * world  # padded to the world size, as DistributedSampler
    assert set(counts) == set(range(10)) and max(counts.values()) - min(counts.values()) <= 1 + (world > 1)
    a, b = EpochRepeatSampler(10, repeats, world, 0, 1), EpochRepeatSampler(10, repeats, world, 0, 1)
    b.set_epoch(1)
    assert list(a) != list(b)


def test_train_kd_epoch_repeats(tiny_data, teacher_ckpt, tmp_path, capsys):
    argv = [tiny_data, "--model", "test_resnet", "--teacher", "test_resnet", "--teacher-pretrained", teacher_ckpt,
            "--epochs", "1", "-b", "4", "--img-size", "32", "--workers", "0", "--output", tmp_path, "--experiment",
            "r", "--no-progress", "--epoch-repeats", "2.5"]
    assert run_cli(train_kd.cli, argv) == 0
    assert "1 epochs of 15 steps" in capsys.readouterr().err  # 24 images x 2.5 = 60 = 15 batches of 4
    assert torch.load(tmp_path / "r" / "last.pth.tar", weights_only=True)["num_updates"] == 15
    assert run_cli(train_kd.cli, argv[:-2] + ["--epoch-repeats", "2", "--aug-repeats", "3"]) == 2
    assert "--epoch-repeats and --aug-repeats" in capsys.readouterr().err
