"""--resume compares the checkpoint with the run continuing it: what must match is refused in one line
listing every difference; what may change is logged. Teacher files that record classes are compared too."""
from __future__ import annotations

import shutil

import pytest
import torch

from conftest import make_image_folder, run_cli, save_teacher
from vanillakd.cli import train_kd


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return save_teacher(tmp_path_factory.mktemp("rc") / "t.pth", "test_resnet", num_classes=3)


def argv(data, teacher, out, name, *extra):
    return [data, "--model", "test_resnet", "--teacher", "test_resnet", "--teacher-pretrained", teacher,
            "--epochs", "2", "-b", "4", "--img-size", "32", "--workers", "0", "--output", out, "--no-progress",
            "--opt", "adamw", "--lr", "1e-3", "--warmup-epochs", "0", "--max-train-steps", "2",
            "--experiment", name, *extra]


@pytest.fixture(scope="module")
def one_epoch(tiny_data, teacher, tmp_path_factory):
    """A run stopped after its first epoch (its last.pth.tar at epoch 0), copied afresh for each test."""
    out = tmp_path_factory.mktemp("rc_run")
    assert run_cli(train_kd.cli, argv(tiny_data, teacher, out, "r", "--epochs", "1")) == 0
    return out / "r"


@pytest.fixture
def run_copy(one_epoch, tmp_path):
    shutil.copytree(one_epoch, tmp_path / "r")
    return tmp_path


def test_changed_recipe_is_refused_listing_every_difference(tiny_data, teacher, run_copy, capsys):
    before = (run_copy / "r" / "last.pth.tar").read_bytes()
    code = run_cli(train_kd.cli, argv(tiny_data, teacher, run_copy, "r", "--resume", "auto", "-b", "2",
                                      "--seed", "9", "--kd-loss", "dkd", "--kd-loss-weight", "2"))
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    for change in ("--batch-size 4 -> 2", "--seed 42 -> 9", "--kd-loss kd -> dkd", "--kd-loss-weight 1.0 -> 2.0"):
        assert change in err, err
    assert (run_copy / "r" / "last.pth.tar").read_bytes() == before  # nothing written


def _data_with(tmp_path, classes):
    return make_image_folder(tmp_path / "data", classes=classes)


def test_renamed_class_is_refused(teacher, run_copy, capsys):
    data = _data_with(run_copy, ("cat", "dog", "wolf"))  # 'fox' renamed: every 'wolf' label would mean 'fox'
    assert run_cli(train_kd.cli, argv(data, teacher, run_copy, "r", "--resume", "auto")) == 2
    err = capsys.readouterr().err
    assert "classes differ" in err and "fox" in err and "wolf" in err


def test_changed_training_files_are_refused(tiny_data, teacher, run_copy, capsys):
    data = run_copy / "data"
    shutil.copytree(tiny_data, data)
    shutil.copy(data / "train" / "cat" / "0.jpg", data / "train" / "dog" / "extra.jpg")
    assert run_cli(train_kd.cli, argv(data, teacher, run_copy, "r", "--resume", "auto")) == 2
    assert "training files or their labels differ" in capsys.readouterr().err


def test_other_world_size_is_refused(tiny_data, teacher, run_copy, capsys):
    ckpt_path = run_copy / "r" / "last.pth.tar"
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert ckpt["world_size"] == 1 and ckpt["data_digest"]
    ckpt["world_size"] = 2  # as a 2-process run would have written it
    torch.save(ckpt, ckpt_path)
    assert run_cli(train_kd.cli, argv(tiny_data, teacher, run_copy, "r", "--resume", "auto")) == 2
    assert "world size 2 -> 1 processes" in capsys.readouterr().err


def test_allowed_changes_are_logged_and_the_run_continues(tiny_data, teacher, run_copy, capsys):
    assert run_cli(train_kd.cli, argv(tiny_data, teacher, run_copy, "r", "--resume", "auto",
                                      "--log-interval", "7", "--checkpoint-hist", "3")) == 0
    err = capsys.readouterr().err
    assert "changed since the checkpoint" in err
    assert "--epochs 1 -> 2" in err and "--log-interval 50 -> 7" in err and "--checkpoint-hist 10 -> 3" in err
    assert "continuing at epoch 1" in err


def test_teacher_file_with_other_classes_is_refused(one_epoch, tmp_path, capsys):
    """A teacher trained by this project records its classes: data whose classes differ is refused."""
    data = _data_with(tmp_path, ("cat", "dog", "wolf"))
    student_as_teacher = one_epoch / "last.pth.tar"
    code = run_cli(train_kd.cli, argv(data, student_as_teacher, tmp_path, "t"))
    assert code == 2
    err = capsys.readouterr().err
    assert "was trained on other classes than the data's" in err and "wolf" in err


def test_model_best_only_improves_across_requeues(tiny_data, teacher, tmp_path):
    """One epoch per invocation, requeued with the same command and a later --epochs: model_best always holds
    the first epoch of the best metric so far, and is rewritten only when an epoch beats it."""
    import csv
    previous = None
    for epochs in range(1, 5):
        flags = argv(tiny_data, teacher, tmp_path, "q", "--resume", "auto", "--max-train-steps", "6")
        flags[flags.index("--epochs") + 1] = str(epochs)
        assert run_cli(train_kd.cli, flags) == 0
        rows = list(csv.DictReader(open(tmp_path / "q" / "summary.csv")))
        assert [int(r["epoch"]) for r in rows] == list(range(epochs))
        metrics = [float(r["eval_top1"]) for r in rows]
        first_best = metrics.index(max(metrics))
        best_file = tmp_path / "q" / "model_best.pth.tar"
        best = torch.load(best_file, weights_only=True)
        assert best["epoch"] == first_best and best["best"]["epoch"] == first_best
        data = best_file.read_bytes()
        if previous is not None and first_best != epochs - 1:
            assert data == previous  # this epoch did not beat the best: the file is untouched
        previous = data


def test_other_teacher_weights_are_refused(tiny_data, run_copy, tmp_path, capsys):
    other = save_teacher(tmp_path / "other.pth", "test_resnet", num_classes=3, seed=1)  # same arch, other weights
    assert run_cli(train_kd.cli, argv(tiny_data, other, run_copy, "r", "--resume", "auto")) == 2
    assert "the teacher's weights differ" in capsys.readouterr().err


def test_moved_teacher_file_is_accepted(tiny_data, teacher, run_copy, capsys):
    moved = shutil.copy(teacher, run_copy / "moved-teacher.pth")
    assert run_cli(train_kd.cli, argv(tiny_data, moved, run_copy, "r", "--resume", "auto")) == 0
    assert "--teacher-pretrained" in capsys.readouterr().err  # logged as a change, not refused


def test_a_checkpoint_without_a_best_record_keeps_model_best(tiny_data, teacher, run_copy):
    """timm's and the seed's checkpoints record no best: the run's model_best.pth.tar says what it is."""
    folder = run_copy / "r"
    last = torch.load(folder / "last.pth.tar", weights_only=True)
    del last["best"]
    torch.save(last, folder / "last.pth.tar")
    best = torch.load(folder / "model_best.pth.tar", weights_only=True)
    best["metric"] = 1e9  # better than any epoch can be
    torch.save(best, folder / "model_best.pth.tar")
    before = (folder / "model_best.pth.tar").read_bytes()
    assert run_cli(train_kd.cli, argv(tiny_data, teacher, run_copy, "r", "--resume", "auto")) == 0
    assert (folder / "model_best.pth.tar").read_bytes() == before
    assert torch.load(folder / "last.pth.tar", weights_only=True)["best"]["metric"] == 1e9


def test_weights_only_file_given_to_resume_says_so(tiny_data, teacher, tmp_path, capsys):
    weights = save_teacher(tmp_path / "w.pth", "test_resnet", num_classes=3)
    assert run_cli(train_kd.cli, argv(tiny_data, teacher, tmp_path, "w", "--resume", weights)) == 2
    assert "holds no training state (weights only): --initial-checkpoint" in capsys.readouterr().err


def test_legacy_format_teacher_with_other_classes_is_refused(one_epoch, tmp_path, capsys):
    ckpt = torch.load(one_epoch / "last.pth.tar", weights_only=True)
    legacy = tmp_path / "legacy.pth"
    torch.save(ckpt, legacy, _use_new_zipfile_serialization=False)  # cannot be memory-mapped
    data = _data_with(tmp_path, ("cat", "dog", "wolf"))
    assert run_cli(train_kd.cli, argv(data, legacy, tmp_path, "t")) == 2
    assert "was trained on other classes than the data's" in capsys.readouterr().err
