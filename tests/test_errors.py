"""Bad input: one line naming the problem, non-zero exit, no traceback."""
from __future__ import annotations

import shutil

import pytest

from conftest import make_image_folder, run_cli, run_script, save_teacher
from vanillakd.cli import train_kd, validate


def base_argv(data, teacher_ckpt, out, *extra):
    return [str(data), "--model", "test_resnet", "--teacher", "test_resnet", "--teacher-pretrained", str(teacher_ckpt),
            "--epochs", "1", "-b", "4", "--img-size", "32", "--workers", "0", "--output", str(out), "--no-progress",
            *map(str, extra)]


def assert_one_line_error(capsys, rc, *needles):
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    last = err.splitlines()[-1]
    assert "Traceback" not in err
    for n in needles:
        assert n in last, (n, last)


@pytest.fixture
def broken_data(tmp_path):
    return make_image_folder(tmp_path / "d", per_class=(2, 1), size=16)


def test_missing_data_dir(capsys, teacher_ckpt, tmp_path):
    rc = run_cli(train_kd.cli, base_argv(tmp_path / "nope", teacher_ckpt, tmp_path))
    assert_one_line_error(capsys, rc, "data dir", "does not exist")


def test_missing_split(capsys, broken_data, teacher_ckpt, tmp_path):
    shutil.rmtree(broken_data / "val")
    rc = run_cli(train_kd.cli, base_argv(broken_data, teacher_ckpt, tmp_path))
    assert_one_line_error(capsys, rc, "split", "missing")


def test_empty_split(capsys, broken_data, teacher_ckpt, tmp_path):
    shutil.rmtree(broken_data / "train")
    (broken_data / "train").mkdir()
    rc = run_cli(train_kd.cli, base_argv(broken_data, teacher_ckpt, tmp_path))
    assert_one_line_error(capsys, rc, "no class folders")


def test_no_images(capsys, broken_data, teacher_ckpt, tmp_path):
    for f in (broken_data / "train").rglob("*.*"):
        f.unlink()
    rc = run_cli(train_kd.cli, base_argv(broken_data, teacher_ckpt, tmp_path))
    assert_one_line_error(capsys, rc, "no images")


def test_class_folder_without_images(capsys, broken_data, teacher_ckpt, tmp_path):
    (broken_data / "train" / "zebra").mkdir()
    rc = run_cli(train_kd.cli, base_argv(broken_data, teacher_ckpt, tmp_path))
    assert_one_line_error(capsys, rc, "zebra", "no images")


def test_train_val_class_mismatch(capsys, broken_data, teacher_ckpt, tmp_path):
    (broken_data / "val" / "fox").rename(broken_data / "val" / "wolf")
    rc = run_cli(train_kd.cli, base_argv(broken_data, teacher_ckpt, tmp_path))
    assert_one_line_error(capsys, rc, "class lists differ", "fox", "wolf")


def test_num_classes_disagrees(capsys, tiny_data, teacher_ckpt, tmp_path):
    rc = run_cli(train_kd.cli, base_argv(tiny_data, teacher_ckpt, tmp_path, "--num-classes", "7"))
    assert_one_line_error(capsys, rc, "--num-classes 7", "3 classes")


@pytest.mark.parametrize("flag,value,needle", [("--model", "resnet_nope", "unknown model 'resnet_nope'"),
                                               ("--teacher", "beit_nope", "unknown teacher 'beit_nope'"),
                                               ("--kd-loss", "fancy", "unknown kd loss 'fancy'")])
def test_unknown_names(capsys, tiny_data, teacher_ckpt, tmp_path, flag, value, needle):
    rc = run_cli(train_kd.cli, base_argv(tiny_data, teacher_ckpt, tmp_path, flag, value))
    assert_one_line_error(capsys, rc, needle)


def test_teacher_checkpoint_missing(capsys, tiny_data, tmp_path):
    rc = run_cli(train_kd.cli, base_argv(tiny_data, tmp_path / "missing.pth", tmp_path))
    assert_one_line_error(capsys, rc, "teacher checkpoint", "does not exist")


def test_teacher_checkpoint_wrong_class_count(capsys, tiny_data, tmp_path):
    ckpt = save_teacher(tmp_path / "t5.pth", "test_resnet", num_classes=5)
    rc = run_cli(train_kd.cli, base_argv(tiny_data, ckpt, tmp_path))
    assert_one_line_error(capsys, rc, "5-class head", "3 classes")


def test_teacher_checkpoint_wrong_architecture(capsys, tiny_data, tmp_path):
    ckpt = save_teacher(tmp_path / "vit.pth", "test_vit", num_classes=3)
    rc = run_cli(train_kd.cli, base_argv(tiny_data, ckpt, tmp_path))
    assert_one_line_error(capsys, rc, "does not fit architecture test_resnet", "missing keys")


def test_teacher_checkpoint_corrupt(capsys, tiny_data, tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"this is not a checkpoint")
    rc = run_cli(train_kd.cli, base_argv(tiny_data, bad, tmp_path))
    assert_one_line_error(capsys, rc, "corrupt")


def test_list_flags_of_different_lengths(capsys, tiny_data, teacher_ckpt, tmp_path):
    rc = run_cli(train_kd.cli, base_argv(tiny_data, teacher_ckpt, tmp_path, "--kd-loss", "kd", "dkd",
                                         "--lr", "0.1", "0.2", "0.3"))
    assert_one_line_error(capsys, rc, "different lengths", "--kd-loss has 2", "--lr has 3")


def test_batch_larger_than_dataset(capsys, tiny_data, teacher_ckpt, tmp_path):
    rc = run_cli(train_kd.cli, base_argv(tiny_data, teacher_ckpt, tmp_path, "-b", "64"))
    assert_one_line_error(capsys, rc, "--batch-size 64", "larger than the training set")


@pytest.mark.parametrize("flag,value", [("--epochs", "0"), ("--lr", "-1"), ("-b", "0")])
def test_non_positive_numbers(capsys, tiny_data, teacher_ckpt, tmp_path, flag, value):
    rc = run_cli(train_kd.cli, base_argv(tiny_data, teacher_ckpt, tmp_path, flag, value))
    assert_one_line_error(capsys, rc, "must be > 0")


def test_config_unknown_key_and_bad_type(capsys, tiny_data, teacher_ckpt, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochz: 3\n")
    rc = run_cli(train_kd.cli, ["-c", cfg] + base_argv(tiny_data, teacher_ckpt, tmp_path))
    assert_one_line_error(capsys, rc, "unknown key 'epochz'")
    cfg.write_text("epochs: many\n")
    rc = run_cli(train_kd.cli, ["-c", cfg] + base_argv(tiny_data, teacher_ckpt, tmp_path))
    assert_one_line_error(capsys, rc, "bad value for epochs")


def test_output_not_writable(capsys, tiny_data, teacher_ckpt, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where the output folder should go
    rc = run_cli(train_kd.cli, base_argv(tiny_data, teacher_ckpt, blocker / "sub"))
    assert_one_line_error(capsys, rc, "not writable")


def test_validate_errors(capsys, tiny_data, tmp_path):
    rc = run_cli(validate.cli, [tiny_data, "--model", "test_resnet", "--checkpoint", tmp_path / "none.pth"])
    assert_one_line_error(capsys, rc, "does not exist")
    rc = run_cli(validate.cli, [tmp_path / "nodata", "--model", "test_resnet", "--checkpoint", "x"])
    assert_one_line_error(capsys, rc, "data dir")


def test_root_script_prints_no_traceback(tmp_path):
    r = run_script("train-kd.py", tmp_path / "missing", "--model", "test_resnet", "--teacher", "test_resnet")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"train-kd.py: error: data dir {tmp_path / 'missing'} does not exist"]


def test_sync_bn_on_cpu(capsys, tiny_data, teacher_ckpt, tmp_path):
    rc = run_cli(train_kd.cli, base_argv(tiny_data, teacher_ckpt, tmp_path, "--sync-bn", "--device", "cpu"))
    assert_one_line_error(capsys, rc, "--sync-bn needs CUDA GPUs")


def test_console_command_lists_and_rejects(capsys):
    from vanillakd.__main__ import COMMANDS, main
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)
    assert main(["train-kdd"]) == 2
    assert "unknown command 'train-kdd'" in capsys.readouterr().err
