"""The fast-step defaults (speed.py), the frozen teacher's inference-mode outputs, --compile, and `vanillakd bench`."""
from __future__ import annotations

import inspect
import json
import os
import tempfile

import pytest
import timm
import torch
from torch import nn

from vanillakd.cli import bench, train_kd
from vanillakd.cli.train_args import build_train_parser
from vanillakd.config import SpeedConfig
from vanillakd.errors import run_cli
from vanillakd.features import FeatureModel
from vanillakd.speed import optimizer_speed_kwargs, resolve_speed
from vanillakd.teachers.live import FrozenTeacher

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def speed(amp=None, channels_last=None, pin_mem=None) -> SpeedConfig:
    """The speed switches (None: auto) with the other fields at their flags' defaults."""
    return SpeedConfig(device=None, amp=amp, amp_dtype="float16", pin_mem=pin_mem, fused_opt=None,
                       channels_last=channels_last, compile=False, compile_mode=None)


# ---------------------------------------------------------------- auto flags


@pytest.mark.parametrize("model,channels_last", [("test_resnet", True), ("test_vit", False)])
def test_auto_flags_on_cuda(model, channels_last):
    resolved, turned_on = resolve_speed(speed(), CUDA, [model])  # pure logic: no GPU needed
    assert (resolved.amp, resolved.pin_mem, resolved.channels_last) == (True, True, channels_last)
    assert set(turned_on) == {"amp", "pin_mem"} | ({"channels_last"} if channels_last else set())


def test_auto_channels_last_when_any_student_is_a_conv_net():
    resolved, _ = resolve_speed(speed(), CUDA, ["test_vit", "test_resnet"])
    assert resolved.channels_last is True


@pytest.mark.parametrize("model", ["test_resnet", "test_vit"])
def test_auto_flags_off_on_cpu(model):
    resolved, turned_on = resolve_speed(speed(), CPU, [model])
    assert turned_on == []
    assert (resolved.amp, resolved.pin_mem, resolved.channels_last) == (False, False, False)


@pytest.mark.parametrize("device", [CUDA, CPU])
@pytest.mark.parametrize("value", [True, False])
def test_explicit_speed_flags_are_kept(device, value):
    resolved, turned_on = resolve_speed(speed(amp=value, channels_last=value, pin_mem=value), device,
                                        ["test_resnet"])
    assert turned_on == []
    assert (resolved.amp, resolved.pin_mem, resolved.channels_last) == (value, value, value)


def test_optimizer_speed_kwargs():
    assert optimizer_speed_kwargs("adamw", CUDA) == {"fused": True}
    assert optimizer_speed_kwargs("sgd", CUDA) == {"fused": True}
    # timm's LAMB takes foreach only in later releases (1.0.23 does not): the kwarg follows the class
    lamb_foreach = "foreach" in inspect.signature(timm.optim.Lamb.__init__).parameters
    assert optimizer_speed_kwargs("lamb", CUDA) == ({"foreach": True} if lamb_foreach else {})
    for opt in ("adamw", "sgd", "lamb"):
        assert optimizer_speed_kwargs(opt, CPU) == {}, opt
        assert optimizer_speed_kwargs(opt, CUDA, fused=False) == {}, opt
    assert optimizer_speed_kwargs("no_such_optimizer", CUDA) == {}


@pytest.mark.parametrize("argv,expected", [
    ([], {"amp": None, "channels_last": None, "compile": False, "pin_mem": None, "fused_opt": None}),
    (["--amp"], {"amp": True}),
    (["--no-amp"], {"amp": False}),
    (["--channels-last"], {"channels_last": True}),
    (["--no-channels-last"], {"channels_last": False}),
    (["--compile"], {"compile": True}),
    (["--torchcompile"], {"compile": True}),
    (["--no-pin-mem", "--no-fused-opt"], {"pin_mem": False, "fused_opt": False}),
])
def test_speed_flags_parse(argv, expected):
    args = build_train_parser("train-kd.py", "").parse_args(["data"] + argv)
    assert {k: getattr(args, k) for k in expected} == expected


# ---------------------------------------------------------------- the frozen teacher


def test_frozen_teacher_outputs_are_ordinary_tensors():
    torch.manual_seed(0)
    teacher = FrozenTeacher(timm.create_model("test_resnet", num_classes=3), resize=24)
    x = torch.randn(2, 3, 32, 32)
    z_t = teacher(x)
    assert not z_t.is_inference() and not z_t.requires_grad and z_t.shape == (2, 3)
    assert torch.equal(z_t, teacher.batch_output(x, None, 0, 0))
    z_s = torch.randn(2, 3, requires_grad=True)
    (z_s * z_t).sum().backward()  # mul saves z_t for the backward: an inference tensor would raise here
    assert torch.equal(z_s.grad, z_t)
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not teacher.model.training


@pytest.mark.parametrize("preact", [False, True])
def test_frozen_feature_teacher_outputs_are_ordinary_tensors(preact):
    torch.manual_seed(0)
    teacher = FrozenTeacher(FeatureModel(timm.create_model("test_resnet", num_classes=3), preact=preact,
                                         name="test_resnet"))
    out = teacher(torch.randn(2, 3, 32, 32))
    tensors = [out.logits, out.pooled, *out.maps, *(out.preact or [])]
    assert len(out.maps) >= 2 and (out.preact is not None) == preact
    assert all(isinstance(t, torch.Tensor) and not t.is_inference() for t in tensors)
    loss = sum((t * torch.ones_like(t, requires_grad=True)).square().sum() for t in tensors)
    w = torch.ones(out.pooled.shape[1], requires_grad=True)
    (loss + (out.pooled * w).sum()).backward()
    assert w.grad is not None and torch.equal(w.grad, out.pooled.sum(0))


def test_compile_forward_keeps_plain_state_dict_keys():
    teacher = FrozenTeacher(timm.create_model("test_resnet", num_classes=3))
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    teacher.compile_forward()  # lazy: nothing is compiled until a forward
    after = teacher.model.state_dict()
    assert list(after) == list(before) and not any("_orig_mod" in k for k in after)
    assert all(torch.equal(before[k], after[k]) for k in before)
    timm.create_model("test_resnet", num_classes=3).load_state_dict(after, strict=True)


def test_compile_forward_runs_the_compiled_module(monkeypatch):
    teacher = FrozenTeacher(timm.create_model("test_resnet", num_classes=3))
    keys = list(teacher.state_dict())
    teacher.compile_forward()
    assert isinstance(teacher._compiled, torch._dynamo.eval_frame.OptimizedModule)
    assert teacher._compiled._orig_mod is teacher.model
    assert list(teacher.state_dict()) == keys  # the compiled wrapper is not a submodule


def test_compile_forward_routes_the_forward_through_the_compiler(monkeypatch):
    calls = []

    class Compiled(nn.Module):  # stands in for torch.compile's OptimizedModule (also an nn.Module)
        def __init__(self, model):
            super().__init__()
            self.inner = model

        def forward(self, x):
            calls.append(x.shape)
            return self.inner(x)

    monkeypatch.setattr(torch, "compile", lambda model, mode=None, **kw: Compiled(model))
    teacher = FrozenTeacher(timm.create_model("test_resnet", num_classes=3))
    teacher.compile_forward()
    teacher(torch.randn(2, 3, 32, 32))
    assert calls == [torch.Size([2, 3, 32, 32])]



def test_compile_forward_runs_torch_compiles_own_wrapper(monkeypatch):
    """The real OptimizedModule (its eager backend: no inductor, seconds on the CPU), whose truth value is not the
    plain module's: len() on a wrapped ResNet raises."""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, mode=None, **kw: compile_(model, backend="eager"))
    teacher = FrozenTeacher(timm.create_model("test_resnet", num_classes=3))
    x = torch.randn(2, 3, 32, 32)
    eager = teacher(x)
    teacher.compile_forward()
    torch.testing.assert_close(teacher(x), eager)

# ---------------------------------------------------------------- --compile end to end


@pytest.mark.skipif(os.environ.get("VANILLAKD_SLOW_TESTS") != "1",
                    reason="torch.compile on the CPU takes ~100 s with a cold inductor cache; "
                           "set VANILLAKD_SLOW_TESTS=1 to run it")
def test_compile_end_to_end_saves_plain_checkpoints(tiny_data, teacher_ckpt, tmp_path):
    argv = [tiny_data, "--model", "test_resnet", "--teacher", "test_resnet", "--teacher-pretrained", teacher_ckpt,
            "--img-size", "32", "-b", "4", "--epochs", "1", "--max-train-steps", "2", "--warmup-epochs", "0",
            "--workers", "0", "--no-progress", "--compile", "--output", tmp_path, "--experiment", "c"]
    assert run_cli(train_kd.main, [str(a) for a in argv]) == 0
    ckpt = torch.load(tmp_path / "c" / "last.pth.tar", weights_only=True)
    sd = ckpt["state_dict"]
    assert sd and not any("_orig_mod" in k for k in sd)
    timm.create_model("test_resnet", num_classes=3).load_state_dict(sd, strict=True)
    assert ckpt["arch"] == "test_resnet" and ckpt["args"]["compile"] is True


# ---------------------------------------------------------------- vanillakd bench


def test_bench_smoke(tmp_path, monkeypatch, capsys):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where bench makes (and removes) its scratch folder
    out = tmp_path / "bench.json"
    argv = ["--steps", "1", "--rounds", "1", "--warmup", "1", "--batch-size", "4"]
    assert bench.main(argv + ["--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["mode"] == "step" and res["device_type"] == "cpu" and res["batch_size"] == 4
    for key in bench.STEP_KEYS:
        assert res[f"{key}_img_s"] > 0 and res[f"{key}_ms"] > 0, key
        assert res[f"{key}_img_s"] == pytest.approx(4000 / res[f"{key}_ms"]), key
    for key in ("kd_over_teacher_plus_student", "cached_over_student", "speedup_over_original"):
        assert res[key] > 0, key
    assert "(c) our KD step" in capsys.readouterr().out
    only = tmp_path / "only.json"
    assert bench.main(argv + ["--only", "student_step", "--json", str(only)]) == 0
    res = json.loads(only.read_text())
    assert [k for k in res if k.endswith("_img_s")] == ["student_step_img_s"]
    assert not {"kd_over_teacher_plus_student", "cached_over_student", "speedup_over_original"} & res.keys()
    assert res["command"] == "vanillakd bench " + " ".join(argv + ["--only", "student_step", "--json", str(only)])
    assert list(scratch.iterdir()) == []


def test_bench_data_smoke(tmp_path, monkeypatch, capsys):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    out = tmp_path / "data.json"
    argv = ["--data", "--num-images", "16", "--data-img-size", "32", "--data-batch-size", "4", "--data-workers", "0",
            "--with-kd", "--json", str(out)]
    assert bench.main(argv) == 0
    res = json.loads(out.read_text())
    rows = {(r["pipeline"], r["stage"], r["workers"]): r["img_s"] for r in res["rows"]}
    assert set(rows) == {(p, s, w) for p in ("cpu", "gpu") for s, w in (("per worker", 1), ("loader", 0),
                                                                       ("with KD step", 0))}
    assert all(v > 0 for v in rows.values())
    assert res["images"] == 16 and "rand-m7-mstd0.5-inc1" in res["recipe"]
    assert "with KD step" in capsys.readouterr().out
    assert list(scratch.iterdir()) == []  # the generated JPEGs are removed
