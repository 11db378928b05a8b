"""Model zoo, export to plain timm, teachers from anywhere with their own normalisation."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import timm
import torch

from conftest import REPO, run_cli, run_script
from vanillakd import zoo
from vanillakd.cli import train_kd, validate
from vanillakd.errors import UserError
from vanillakd.export import export_checkpoint
from vanillakd.teachers.live import FrozenTeacher, teacher_input_adapter

PLAIN_TIMM = """
import json, sys, torch, timm
assert 'vanillakd' not in sys.modules
out, arch, n, x = sys.argv[1], sys.argv[2], int(sys.argv[3]), torch.load(sys.argv[4])
a = timm.create_model('local-dir:' + out, pretrained=True).eval()
b = timm.create_model(arch, pretrained=True, num_classes=n,
                      pretrained_cfg_overlay=dict(file=out + '/model.safetensors', num_classes=n)).eval()
with torch.no_grad():
    torch.save({'a': a(x), 'b': b(x), 'mean': a.pretrained_cfg['mean']}, sys.argv[5])
assert 'vanillakd' not in sys.modules
"""


@pytest.fixture(scope="module")
def trained(tiny_data, teacher_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    argv = [tiny_data, "--model", "test_vit", "--teacher", "test_resnet", "--teacher-pretrained", teacher_ckpt,
            "--epochs", "1", "-b", "4", "--img-size", "32", "--workers", "0", "--output", out, "--experiment", "s",
            "--no-progress", "--model-ema", "--model-ema-decay", "0.5", "--mean", "0.4", "0.4", "0.4",
            "--save-safetensors"]
    assert run_cli(train_kd.cli, argv) == 0
    return out / "s" / "last.pth.tar"


def test_save_safetensors_exports_the_best_student(trained):
    export = trained.parent / "export"
    assert (export / "model.safetensors").is_file() and (export / "config.json").is_file()
    from safetensors.torch import load_file
    best = torch.load(trained.parent / "model_best.pth.tar", weights_only=True)["state_dict"]
    saved = load_file(str(export / "model.safetensors"))
    assert saved.keys() == best.keys() and all(torch.equal(saved[k], best[k]) for k in best)


@pytest.mark.parametrize("use_ema", [False, True])
def test_export_loads_in_plain_timm_with_identical_logits(trained, tmp_path, use_ema):
    out = export_checkpoint(trained, tmp_path / "export", use_ema=use_ema)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "test_vit" and cfg["num_classes"] == 3
    assert cfg["pretrained_cfg"]["input_size"] == [3, 32, 32] and cfg["pretrained_cfg"]["mean"] == [0.4] * 3
    assert cfg["label_names"] == ["cat", "dog", "fox"]
    x = torch.randn(2, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    # same thread count as this process (conftest: 1), so the same kernels sum in the same order
    env = dict({k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", PLAIN_TIMM, str(out), "test_vit", "3", str(tmp_path / "x.pt"),
                        str(tmp_path / "y.pt")], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    y = torch.load(tmp_path / "y.pt")
    ckpt = torch.load(trained, weights_only=True)
    ref = timm.create_model("test_vit", num_classes=3).eval()
    ref.load_state_dict(ckpt["state_dict_ema" if use_ema else "state_dict"])
    with torch.no_grad():
        expected = ref(x)
    assert torch.equal(y["a"], expected) and torch.equal(y["b"], expected)


def test_export_cli_and_errors(trained, tmp_path, capsys):
    r = run_script("-m vanillakd", "export", trained, "--out", tmp_path / "e")
    assert r.returncode == 0 and (tmp_path / "e" / "model.safetensors").is_file(), r.stderr
    raw = tmp_path / "raw.pth"
    torch.save(timm.create_model("test_resnet", num_classes=4).state_dict(), raw)
    with pytest.raises(UserError, match="pass --model"):
        export_checkpoint(raw, tmp_path / "x")
    assert export_checkpoint(raw, tmp_path / "x", model="test_resnet").is_dir()
    with pytest.raises(UserError, match="no EMA weights"):
        export_checkpoint(raw, tmp_path / "y", model="test_resnet", use_ema=True)


def test_zoo_layout_checkpoint_validates(tiny_data, tmp_path):
    """A file laid out like the zoo's (a plain timm resnet50 state_dict, 1000 classes) loads in validate.py,
    by --model/--checkpoint and by --zoo with a local zoo folder."""
    m = zoo.get("resnet50")
    torch.save(timm.create_model(m.arch, num_classes=1000).state_dict(), tmp_path / m.file)
    out = tmp_path / "r.json"
    common = [tiny_data, "--num-classes", "1000", "--img-size", "64", "-j", "0", "-b", "12"]
    assert run_cli(validate.cli, common + ["--model", "resnet50", "--checkpoint", tmp_path / m.file,
                                           "--results-file", out]) == 0
    first = json.loads(out.read_text())
    assert first["images"] == 12
    assert run_cli(validate.cli, common + ["--zoo", "resnet50", "--zoo-dir", tmp_path, "--results-file", out]) == 0
    assert json.loads(out.read_text())["top1"] == first["top1"]


def test_zoo_list(capsys):
    from vanillakd.cli import zoo as zoo_cli
    assert zoo_cli.main([]) == 0
    out = capsys.readouterr().out
    for name, top1 in (("resnet50", "83.08"), ("vit_tiny_patch16_224", "78.11"), ("vit_small_patch16_224", "84.33"),
                       ("convnextv2_tiny", "85.03")):
        assert name in out and top1 in out


@pytest.mark.parametrize("offline_env", [True, False])
def test_zoo_fetch_offline_fails_fast(tmp_path, offline_env):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("HF_HUB_OFFLINE", None)
    if offline_env:
        env["HF_HUB_OFFLINE"] = "1"
    start = time.time()
    r = subprocess.run([sys.executable, "-m", "vanillakd", "zoo", "fetch", "resnet50", "--dir", str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=60)
    assert time.time() - start < 10
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "resnet50-83.078.pth" in r.stderr and not list(tmp_path.iterdir())


def test_teacher_sees_its_own_normalisation():
    """Student normalised with mean/std 0.5; teacher (ImageNet mean/std) gets exactly its own normalisation."""
    teacher = timm.create_model("test_efficientnet", num_classes=3)
    assert tuple(teacher.pretrained_cfg["mean"]) != (0.5, 0.5, 0.5)
    student_cfg = {"mean": (0.5,) * 3, "std": (0.5,) * 3, "input_size": (3, 32, 32)}
    logged = []
    resize, renorm = teacher_input_adapter(teacher, student_cfg, None, logged.append)
    assert renorm is not None and resize is None and "re-normalised" in logged[0]
    frozen = FrozenTeacher(teacher, resize, renorm)
    seen = {}
    teacher.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].clone()))
    raw = torch.rand(2, 3, 32, 32)
    frozen((raw - 0.5) / 0.5)
    mean = torch.tensor(teacher.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(teacher.pretrained_cfg["std"]).view(1, 3, 1, 1)
    torch.testing.assert_close(seen["x"], (raw - mean) / std)
    same = teacher_input_adapter(timm.create_model("test_resnet"), student_cfg, None)
    assert same == (None, None)


def test_fixed_size_teacher_is_resized_for():
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=3)
    resize, _ = teacher_input_adapter(vit, {"mean": vit.pretrained_cfg["mean"], "std": vit.pretrained_cfg["std"],
                                            "input_size": (3, 160, 160)}, None)
    assert resize == 224


def test_teacher_hub_offline_is_a_fast_clear_error(tiny_data, tmp_path, capsys, monkeypatch):
    from vanillakd.teachers.live import _pretrained_teacher
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.time()
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set"):
        _pretrained_teacher("test_resnet", 1000)
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set"):
        _pretrained_teacher("hf-hub:timm/resnet18.a1_in1k", 1000)
    assert time.time() - start < 5
    # without a weights file, a hub teacher with another class count is refused before any download
    rc = run_cli(train_kd.cli, [tiny_data, "--model", "test_resnet", "--teacher", "test_resnet", "--epochs", "1",
                                "-b", "4", "--workers", "0", "--output", tmp_path, "--no-progress"])
    assert rc == 2 and "has 1000 classes but the data has 3" in capsys.readouterr().err
