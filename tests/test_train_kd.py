"""train-kd.py end to end: the seed README's commands on a tiny ImageFolder, outputs, validate.py round trip."""
from __future__ import annotations

import csv
import json
import shlex

import pytest
import torch
import yaml

from conftest import run_cli, run_script, save_teacher
from vanillakd.cli import train_kd, validate

A2 = ("--kd-loss kd --amp --epochs 300 --batch-size 256 --lr 5e-3 --opt lamb --sched cosine --weight-decay 0.02 "
      "--warmup-epochs 5 --warmup-lr 1e-6 --smoothing 0.0 --drop 0 --drop-path 0.05 --aug-repeats 3 "
      "--aa rand-m7-mstd0.5 --mixup 0.1 --cutmix 1.0 --color-jitter 0 --crop-pct 0.95 --bce-loss 1")
A1 = A2.replace("--epochs 300", "--epochs 600").replace("--weight-decay 0.02", "--weight-decay 0.01") \
       .replace("--smoothing 0.0", "--smoothing 0.1").replace("--mixup 0.1", "--mixup 0.2")
SEED_COMMANDS = {"A2": A2, "A1": A1, "DKD": A2.replace("--kd-loss kd", "--kd-loss dkd"),
                 "DIST": A2.replace("--kd-loss kd", "--kd-loss dist")}


def seed_command(recipe: str, data, student: str, teacher: str, teacher_ckpt, out, name: str,
                 epochs: int = 1, batch: int = 4) -> list[str]:
    """A seed README command with the data path, models, epochs and batch size replaced."""
    argv = shlex.split(recipe)
    argv[argv.index("--epochs") + 1] = str(epochs)
    argv[argv.index("--batch-size") + 1] = str(batch)
    return [str(data), "--model", student, "--teacher", teacher, "--teacher-pretrained", str(teacher_ckpt)] + argv + \
        ["--workers", "0", "--output", str(out), "--experiment", name, "--no-progress"]


@pytest.mark.parametrize("recipe,student", [("A2", "test_vit"), ("A1", "test_convnext"), ("DKD", "test_resnet"),
                                            ("DIST", "test_efficientnet")])
def test_seed_commands_run_and_validate(recipe, student, tiny_data, teacher_ckpt, tmp_path):
    argv = seed_command(SEED_COMMANDS[recipe], tiny_data, student, "test_resnet", teacher_ckpt, tmp_path, recipe)
    assert run_cli(train_kd.cli, argv + ["--img-size", "64"]) == 0
    run = tmp_path / recipe
    for name in ("args.yaml", "summary.csv", "log.txt", "last.pth.tar", "model_best.pth.tar"):
        assert (run / name).is_file(), name
    rows = list(csv.DictReader(open(run / "summary.csv")))
    assert len(rows) == 1
    for col in ("epoch", "lr", "train_loss", "train_base_loss", "train_kd_loss", "eval_loss", "eval_top1", "eval_top5"):
        assert rows[0][col] != "", col
    # total = ori * base + kd * kd part, with both weights 1 here
    assert float(rows[0]["train_loss"]) == pytest.approx(float(rows[0]["train_base_loss"]) +
                                                          float(rows[0]["train_kd_loss"]), rel=1e-4)
    assert float(rows[0]["train_kd_loss"]) > 0
    args = yaml.safe_load(open(run / "args.yaml"))
    assert args["kd_loss"] == [recipe.lower() if recipe in ("DKD", "DIST") else "kd"] and args["aug_repeats"] == 3
    # our checkpoints load without pickled code, and validate.py reads them as plain student checkpoints
    ckpt = torch.load(run / "last.pth.tar", weights_only=True)
    assert ckpt["arch"] == student and "optimizer" in ckpt
    out = tmp_path / "val.json"
    # same precision and crop as the training-time evaluation, so the numbers must agree
    assert run_cli(validate.cli, [tiny_data, "--model", student, "--checkpoint", run / "model_best.pth.tar",
                                  "--img-size", "64", "-j", "0", "--results-file", out, "--amp",
                                  "--crop-pct", "0.95"]) == 0
    res = json.loads(out.read_text())
    assert res["images"] == 12 and 0 <= res["top1"] <= 100
    assert res["top1"] == pytest.approx(float(rows[0]["eval_top1"]), abs=1e-3)


@pytest.mark.slow
def test_seed_command_with_original_models_runs_a_step(tiny_data, tmp_path, two_threads):
    """The A2 command keeps resnet50 <- beitv2_base_patch16_224 (random weights), one step on a few images."""
    ckpt = save_teacher(tmp_path / "beitv2.pth", "beitv2_base_patch16_224", num_classes=3, wrap="model")
    argv = seed_command(A2, tiny_data, "resnet50", "beitv2_base_patch16_224", ckpt, tmp_path, "orig", batch=2)
    assert run_cli(train_kd.cli, argv + ["--max-train-steps", "1", "-vb", "12"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "orig" / "summary.csv")))
    assert torch.isfinite(torch.tensor(float(rows[0]["train_loss"])))
    assert torch.load(tmp_path / "orig" / "last.pth.tar", weights_only=True)["arch"] == "resnet50"


def test_root_script_runs_verbatim_style(tiny_data, teacher_ckpt, tmp_path):
    """``python train-kd.py ...`` from a checkout (subprocess), then ``python validate.py ...``."""
    argv = seed_command(SEED_COMMANDS["A2"], tiny_data, "test_resnet", "test_resnet", teacher_ckpt, tmp_path, "cli")
    r = run_script("train-kd.py", *argv, "--img-size", "48")
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_script("validate.py", tiny_data, "--model", "test_resnet", "--checkpoint",
                   tmp_path / "cli" / "last.pth.tar", "--img-size", "48", "-j", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "top1" in (r.stdout + r.stderr)


def test_ema_and_eval_schedule(tiny_data, teacher_ckpt, tmp_path):
    argv = [tiny_data, "--model", "test_resnet", "--teacher", "test_resnet", "--teacher-pretrained", teacher_ckpt,
            "--epochs", "4", "-b", "4", "--img-size", "32", "--workers", "0", "--model-ema", "--model-ema-decay",
            "0.9", "--eval-interval", "2", "--eval-interval-end", "0.9", "--output", tmp_path, "--experiment", "e",
            "--no-progress", "--opt", "adamw", "--lr", "1e-3", "--warmup-epochs", "0"]
    assert run_cli(train_kd.cli, argv) == 0
    rows = list(csv.DictReader(open(tmp_path / "e" / "summary.csv")))
    evaluated = [r["epoch"] for r in rows if r["eval_top1"] != ""]
    assert evaluated == ["0", "2", "3"]  # e % 2 == 0, and the last epoch
    assert all(r["ema_top1"] != "" for r in rows if r["eval_top1"] != "")
    ckpt = torch.load(tmp_path / "e" / "last.pth.tar", weights_only=True)
    assert set(ckpt["state_dict_ema"]) == set(ckpt["state_dict"])
    assert any(not torch.equal(ckpt["state_dict_ema"][k], ckpt["state_dict"][k]) for k in ckpt["state_dict"])
    assert (tmp_path / "e" / "model_best_ema.pth.tar").is_file()
    # validate --use-ema picks the EMA weights out of the same file
    out = tmp_path / "ema.csv"
    assert run_cli(validate.cli, [tiny_data, "--model", "test_resnet", "--checkpoint", tmp_path / "e" / "last.pth.tar",
                                  "--use-ema", "--img-size", "32", "-j", "0", "--results-file", out]) == 0
    assert float(next(csv.DictReader(open(out)))["top1"]) == pytest.approx(float(rows[-1]["ema_top1"]), abs=1e-3)


def test_two_students_one_teacher_pass(tiny_data, teacher_ckpt, tmp_path):
    """List-valued flags train several students from one teacher forward per batch, each in its own folder."""
    calls = []
    import vanillakd.teachers.live as models
    orig = models.FrozenTeacher.forward
    models.FrozenTeacher.forward = lambda self, x: calls.append(1) or orig(self, x)
    try:
        argv = [tiny_data, "--model", "test_resnet", "test_vit", "--kd-loss", "kd", "dkd", "--lr", "1e-3",
                "--teacher", "test_resnet", "--teacher-pretrained", teacher_ckpt, "--epochs", "1", "-b", "4",
                "--img-size", "32", "--workers", "0", "--output", tmp_path, "--experiment", "multi", "--no-progress"]
        assert run_cli(train_kd.cli, argv) == 0
    finally:
        models.FrozenTeacher.forward = orig
    # 24 train images / batch 4: one teacher pass per batch for both students; then one pass over the
    # 12 val images (3 batches) for the teacher's accuracy and the students' agreement with it
    assert len(calls) == 6 + 3
    dirs = sorted(p.name for p in (tmp_path / "multi").iterdir() if p.is_dir())
    assert dirs == ["student0-test_resnet-kd", "student1-test_vit-dkd"]
    for d in dirs:
        assert (tmp_path / "multi" / d / "model_best.pth.tar").is_file()
        assert (tmp_path / "multi" / d / "summary.csv").is_file()


def test_config_yaml_sets_defaults_and_flags_override(tiny_data, teacher_ckpt, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"model": "test_resnet", "kd-loss": "dist", "epochs": 1, "batch_size": 6,
                                   "img_size": 32, "workers": 0, "lr": [0.001], "no_progress": None}).replace(
        "no_progress: null\n", ""))
    argv = ["-c", cfg, tiny_data, "--teacher", "test_resnet", "--teacher-pretrained", teacher_ckpt, "-b", "4",
            "--output", tmp_path, "--experiment", "cfg", "--no-progress"]
    assert run_cli(train_kd.cli, argv) == 0
    args = yaml.safe_load(open(tmp_path / "cfg" / "args.yaml"))
    assert args["kd_loss"] == ["dist"] and args["batch_size"] == 4 and args["epochs"] == 1 and args["lr"] == [0.001]


def test_kd_loss_none_trains_without_a_teacher(tiny_data, tmp_path):
    argv = [tiny_data, "--model", "test_resnet", "--kd-loss", "none", "--teacher", "no_such_teacher", "--epochs", "1",
            "-b", "4", "--img-size", "32", "--workers", "0", "--output", tmp_path, "--experiment", "s", "--no-progress"]
    assert run_cli(train_kd.cli, argv) == 0
    rows = list(csv.DictReader(open(tmp_path / "s" / "summary.csv")))
    assert float(rows[0]["train_kd_loss"]) == 0.0


@pytest.mark.parametrize("workers", [2])
def test_real_fashion_mnist_subset(fashion_mnist, tmp_path, workers):
    """Everything above on real images: a teacher-less and a KD run on a Fashion-MNIST subset."""
    from vanillakd.data.fashion_mnist import make_subset
    data = make_subset(fashion_mnist, tmp_path / "fm", {"train": 16, "val": 8})
    teacher = save_teacher(tmp_path / "t.pth", "test_resnet", num_classes=10)
    argv = [data, "--model", "test_resnet", "--teacher", "test_resnet", "--teacher-pretrained", teacher,
            "--kd-loss", "kd", "--epochs", "1", "-b", "16", "--img-size", "32", "--workers", str(workers),
            "--output", tmp_path, "--experiment", "run", "--no-progress", "--aa", "rand-m7-mstd0.5", "--mixup", "0.1",
            "--cutmix", "1.0", "--bce-loss", "1"]
    assert run_cli(train_kd.cli, argv) == 0
    rows = list(csv.DictReader(open(tmp_path / "run" / "summary.csv")))
    assert float(rows[0]["eval_top1"]) >= 0 and len(rows) == 1


def test_students_trained_together_equal_students_trained_alone(tiny_data, teacher_ckpt, tmp_path):
    """Several students from one teacher pass = each student trained alone on the same data order."""
    common = ["--teacher", "test_resnet", "--teacher-pretrained", teacher_ckpt, "--epochs", "2", "-b", "4",
              "--img-size", "32", "--workers", "1", "--output", tmp_path, "--no-progress", "--aa", "rand-m7-mstd0.5",
              "--mixup", "0.2", "--cutmix", "1.0", "--opt", "adamw", "--seed", "5"]
    assert run_cli(train_kd.cli, [tiny_data, "--model", "test_vit", "test_resnet", "--kd-loss", "kd", "dist",
                                  "--lr", "1e-3", "2e-3", "--experiment", "both", *common]) == 0
    assert run_cli(train_kd.cli, [tiny_data, "--model", "test_vit", "--kd-loss", "kd", "--lr", "1e-3",
                                  "--experiment", "vit", *common]) == 0
    assert run_cli(train_kd.cli, [tiny_data, "--model", "test_resnet", "--kd-loss", "dist", "--lr", "2e-3",
                                  "--experiment", "resnet", *common]) == 0
    for alone, together in (("vit", "student0-test_vit-kd"), ("resnet", "student1-test_resnet-dist")):
        a = torch.load(tmp_path / alone / "last.pth.tar", weights_only=True)["state_dict"]
        b = torch.load(tmp_path / "both" / together / "last.pth.tar", weights_only=True)["state_dict"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), alone


def test_validate_reports_teacher_agreement(tiny_data, teacher_ckpt, tmp_path):
    out = tmp_path / "agree.json"
    # the teacher compared with itself agrees everywhere; with another model, somewhere in [0, 100]
    assert run_cli(validate.cli, [tiny_data, "--model", "test_resnet", "--checkpoint", teacher_ckpt, "--teacher",
                                  "test_resnet", "--teacher-pretrained", teacher_ckpt, "--img-size", "32", "-j", "0",
                                  "--results-file", out]) == 0
    res = json.loads(out.read_text())
    assert res["agreement"] == 100.0 and res["teacher"] == "test_resnet"
    other = tmp_path / "other.pth"
    import timm
    torch.manual_seed(123)
    torch.save(timm.create_model("test_resnet", num_classes=3).state_dict(), other)
    assert run_cli(validate.cli, [tiny_data, "--model", "test_resnet", "--checkpoint", other, "--teacher",
                                  "test_resnet", "--teacher-pretrained", teacher_ckpt, "--img-size", "32", "-j", "0",
                                  "--results-file", out]) == 0
    assert 0 <= json.loads(out.read_text())["agreement"] <= 100


def test_one_channel_student_reads_rgb_images_as_greyscale(tiny_data, tmp_path):
    """As timm's train.py: without --input-img-mode, a 1-channel input makes the loader convert to 'L'."""
    argv = [tiny_data, "--model", "test_resnet", "--kd-loss", "none", "--in-chans", "1", "--epochs", "1", "-b", "4",
            "--img-size", "32", "--workers", "0", "--output", tmp_path, "--experiment", "g", "--no-progress"]
    assert run_cli(train_kd.cli, argv) == 0
    state = torch.load(tmp_path / "g" / "last.pth.tar", weights_only=True)["state_dict"]
    assert next(iter(state.values())).shape[1] == 1


@pytest.mark.parametrize("teacher_chans", [1, 3])
def test_one_channel_run_builds_the_teacher_for_its_batch(tiny_data, tmp_path, teacher_chans):
    """The teacher sees the students' batch: a greyscale teacher file loads as it is, an RGB one gets its first
    conv adapted (timm's adapt_input_conv), and both distil."""
    import timm
    torch.save(timm.create_model("test_resnet", num_classes=3, in_chans=teacher_chans).state_dict(),
               tmp_path / "t.pth")
    argv = [tiny_data, "--model", "test_resnet", "--teacher", "test_resnet", "--teacher-pretrained",
            tmp_path / "t.pth", "--in-chans", "1", "--epochs", "1", "-b", "4", "--img-size", "32", "--workers", "0",
            "--output", tmp_path, "--experiment", "g", "--no-progress"]
    assert run_cli(train_kd.cli, argv) == 0
