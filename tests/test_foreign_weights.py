"""Weights files users actually hold, in layouts written elsewhere (see foreign_layouts.py), loaded through
every entry point and checked by their logits against forwards written from each architecture's description."""
from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import save_file

from conftest import make_image_folder, run_cli
from foreign_layouts import (
    beit_reference_logits,
    beit_release_state,
    convnextv2_fb_state,
    convnextv2_reference_logits,
    seed_training_checkpoint,
)
from vanillakd import zoo
from vanillakd.cli import train_kd, validate
from vanillakd.errors import UserError
from vanillakd.export import export_checkpoint
from vanillakd.models import create_student
from vanillakd.teachers.live import create_teacher

TOL = 1e-4


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x).double()


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    # float32 model against a float64 reference: absolute, relative to the logits' spread
    return (a - b).abs().max().item() < TOL * max(1.0, b.abs().max().item())


@pytest.fixture(scope="module")
def beit_base_release(tmp_path_factory):
    """BEiTv2-B at full size, as the official release stores it."""
    sd = beit_release_state(depth=12, dim=768, heads=12)
    path = tmp_path_factory.mktemp("beit") / "beitv2_base_patch16_224_pt1k_ft21kto1k.pth"
    torch.save({"model": sd}, path)
    return path, sd


def test_beitv2_base_release_loads_as_teacher_with_the_original_logits(beit_base_release, two_threads):
    path, sd = beit_base_release
    teacher = create_teacher("beitv2_base_patch16_224", 1000, str(path))
    x = torch.randn(2, 3, 224, 224)
    assert _close(_logits(teacher.model, x), beit_reference_logits(sd, x, heads=12))


def test_beitv2_large_release_layout_loads(tmp_path):
    """BEiTv2-L's layout at two blocks (the full model's 300 M parameters add nothing to the key layout)."""
    from vanillakd.weights import load_weights
    sd = beit_release_state(depth=2, dim=1024, heads=16, num_classes=10, seed=1)
    torch.save({"model": sd}, tmp_path / "beitv2_large.pth")
    model = timm.create_model("beitv2_large_patch16_224", depth=2, num_classes=10)
    load_weights(model, tmp_path / "beitv2_large.pth", what="teacher", use_ema=True)
    x = torch.randn(2, 3, 224, 224)
    assert _close(_logits(model, x), beit_reference_logits(sd, x, heads=16))


def test_beit_release_head_mismatch_is_still_one_line(beit_base_release):
    with pytest.raises(UserError, match="1000-class head but the teacher is built with 10 classes"):
        create_teacher("beitv2_base_patch16_224", 10, str(beit_base_release[0]))


# ---------------------------------------------------------------------------------------- ConvNeXt-V2 (FB)

@pytest.fixture(scope="module")
def atto_fb():
    return convnextv2_fb_state("convnextv2_atto", num_classes=3)


@pytest.mark.parametrize("wrap", [None, "state_dict", "state_dict_ema", "model"])
def test_convnextv2_facebook_layout_loads_as_student_and_teacher(tmp_path, atto_fb, wrap):
    path = tmp_path / "convnextv2_atto_fb.pth"
    torch.save(atto_fb if wrap is None else {wrap: atto_fb, "epoch": 10}, path)
    x = torch.randn(2, 3, 64, 64)
    reference = convnextv2_reference_logits(atto_fb, x)
    student = create_student("convnextv2_atto", 3, initial_checkpoint=str(path))
    teacher = create_teacher("convnextv2_atto", 3, str(path))
    assert _close(_logits(student, x), reference) and _close(_logits(teacher.model, x), reference)


def test_convnextv2_facebook_layout_exports_to_plain_timm(tmp_path, atto_fb):
    torch.save({"model": atto_fb}, tmp_path / "fb.pth")
    out = export_checkpoint(tmp_path / "fb.pth", tmp_path / "export", model="convnextv2_atto")
    assert json.loads((out / "config.json").read_text())["num_classes"] == 3
    plain = timm.create_model("convnextv2_atto", pretrained=True, num_classes=3,
                              pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"), num_classes=3))
    x = torch.randn(2, 3, 64, 64)
    assert _close(_logits(plain, x), convnextv2_reference_logits(atto_fb, x))


def test_train_kd_runs_with_facebook_layout_student_and_teacher(tmp_path, atto_fb):
    data = make_image_folder(tmp_path / "data", per_class=(4, 2), size=32)
    torch.save({"model": atto_fb}, tmp_path / "teacher.pth")
    torch.save(atto_fb, tmp_path / "student.pth")
    argv = [data, "--model", "convnextv2_atto", "--initial-checkpoint", tmp_path / "student.pth",
            "--teacher", "convnextv2_atto", "--teacher-pretrained", tmp_path / "teacher.pth", "--epochs", "1",
            "-b", "4", "--img-size", "32", "--workers", "0", "--max-train-steps", "1", "--output", tmp_path / "out",
            "--experiment", "fb", "--no-progress"]
    assert run_cli(train_kd.cli, argv) == 0
    assert (tmp_path / "out" / "fb" / "last.pth.tar").is_file()


# ------------------------------------------------------------------------- the seed's zoo and validate

def _zoo_state(name: str) -> tuple[dict, torch.nn.Module]:
    """A file for each published student in the layout it was released in (random weights)."""
    arch = zoo.get(name).arch
    if arch.startswith("convnextv2"):
        sd = convnextv2_fb_state(arch, seed=2)
        return sd, None
    torch.manual_seed(2)
    model = timm.create_model(arch, num_classes=1000)
    return model.state_dict(), model


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory):
    """The seed's four zoo files: ConvNeXt-V2-T in Facebook's layout (raw), ResNet-50 and ViT-T/S as timm
    0.6.5 training checkpoints (flags as a Namespace, EMA weights beside the plain ones)."""
    d = tmp_path_factory.mktemp("zoo")
    for name in zoo.ZOO:
        sd, model = _zoo_state(name)
        if model is None:
            torch.save(sd, d / zoo.get(name).file)
        else:
            ema = {k: v + 0.01 if v.is_floating_point() else v for k, v in sd.items()}
            torch.save(seed_training_checkpoint(zoo.get(name).arch, type(model).__name__, sd, ema),
                       d / zoo.get(name).file)
    return d


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_zoo_files_verify_and_validate(zoo_dir, tmp_path, name, two_threads):
    zoo.verify(zoo.get(name), zoo_dir / zoo.get(name).file)
    data = make_image_folder(tmp_path / "data", classes=("a", "b"), per_class=(1, 2), size=48)
    results = tmp_path / "r.json"
    argv = [data, "--zoo", name, "--zoo-dir", zoo_dir, "--workers", "0", "-b", "4", "--results-file", results,
            "--no-progress"]
    if not name.startswith("vit"):
        argv += ["--img-size", "64"]  # convnets evaluate at any size; ViTs keep their 224 px position table
    assert run_cli(validate.cli, argv) == 0
    r = json.loads(results.read_text())
    assert r["num_classes"] == 1000 and r["images"] == 4 and 0 <= r["top1"] <= 100


def test_validate_reads_the_facebook_layout_as_its_timm_equivalent(zoo_dir, tmp_path):
    """validate on the Facebook-layout zoo file and on the same weights mapped into timm's layout (by hand,
    from the key description) gives the same loss: the file was read, not just accepted."""
    fb = torch.load(zoo_dir / zoo.get("convnextv2_tiny").file, weights_only=True)
    torch.save(_fb_to_timm_by_hand(fb), tmp_path / "timm_layout.pth")
    data = make_image_folder(tmp_path / "data", classes=("a", "b"), per_class=(1, 2), size=48)
    losses = []
    for ckpt in (zoo_dir / zoo.get("convnextv2_tiny").file, tmp_path / "timm_layout.pth"):
        out = tmp_path / f"{ckpt.stem}.json"
        assert run_cli(validate.cli, [data, "--model", "convnextv2_tiny", "--checkpoint", ckpt, "--img-size", "64",
                                      "--workers", "0", "--results-file", out, "--no-progress"]) == 0
        losses.append(json.loads(out.read_text())["loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def _fb_to_timm_by_hand(fb: dict) -> dict:
    out = {}
    for k, v in fb.items():
        p = k.split(".")
        if p[0] == "downsample_layers":
            stage, idx = int(p[1]), int(p[2])
            k = (f"stem.{idx}." if stage == 0 else f"stages.{stage}.downsample.{idx}.") + p[3]
        elif p[0] == "stages":
            name = {"dwconv": "conv_dw", "norm": "norm", "pwconv1": "mlp.fc1", "pwconv2": "mlp.fc2",
                    "grn": "mlp.grn"}[p[3]]
            leaf = {"gamma": "weight", "beta": "bias"}.get(p[4], p[4])
            k, v = f"stages.{p[1]}.blocks.{p[2]}.{name}.{leaf}", (v.flatten() if p[3] == "grn" else v)
        elif p[0] == "norm":
            k = f"head.norm.{p[1]}"
        elif p[0] == "head":
            k = f"head.fc.{p[1]}"
        out[k] = v
    return out


@pytest.mark.parametrize("arch", ["resnet50", "vit_tiny_patch16_224"])
def test_seed_training_checkpoint_takes_ema_first_as_initial_checkpoint(tmp_path, arch):
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=10)
    plain_sd = model.state_dict()
    ema = {k: v * 0.5 if v.is_floating_point() else v for k, v in plain_sd.items()}
    path = tmp_path / "seed_last.pth.tar"
    torch.save(seed_training_checkpoint(arch, type(model).__name__, plain_sd, ema), path)
    x = torch.randn(2, 3, 224, 224)
    reference_ema = timm.create_model(arch, num_classes=10)
    reference_ema.load_state_dict(ema)
    got_ema = create_student(arch, 10, initial_checkpoint=str(path))
    got_plain = create_student(arch, 10, initial_checkpoint=str(path), initial_ema=False)
    assert _close(_logits(got_ema, x), _logits(reference_ema, x))
    assert _close(_logits(got_plain, x), _logits(model, x))


def test_no_ema_checkpoint_flag_reaches_the_student(tmp_path):
    torch.manual_seed(0)
    plain_sd = timm.create_model("test_resnet", num_classes=3).state_dict()
    ema = {k: v * 0.5 if v.is_floating_point() else v for k, v in plain_sd.items()}
    torch.save({"state_dict": plain_sd, "state_dict_ema": ema}, tmp_path / "init.pth")
    data = make_image_folder(tmp_path / "data", per_class=(4, 2), size=32)
    for flag, expect in (([], ema), (["--no-ema-checkpoint"], plain_sd)):
        out = tmp_path / f"out{len(flag)}"
        argv = [data, "--model", "test_resnet", "--kd-loss", "none", "--initial-checkpoint", tmp_path / "init.pth",
                "--epochs", "1", "-b", "4", "--img-size", "32", "--workers", "0", "--lr", "1e-12",
                "--warmup-lr", "1e-12",
                "--weight-decay", "0", "--output", out, "--experiment", "e", "--no-progress", *flag]
        assert run_cli(train_kd.cli, argv) == 0
        saved = torch.load(out / "e" / "last.pth.tar", weights_only=True)["state_dict"]
        key = next(iter(expect))  # the stem's first weight
        assert torch.allclose(saved[key], expect[key], atol=1e-7)  # an lr of 1e-12 moves nothing visible


# ------------------------------------------------------------------------ prefixes, hub files, formats

@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
@pytest.mark.parametrize("fmt", ["pth", "safetensors", "bin"])
def test_prefixed_files_load_in_every_format(tmp_path, prefix, fmt):
    torch.manual_seed(0)
    src = timm.create_model("test_vit", num_classes=4)
    sd = {prefix + k: v.contiguous() for k, v in src.state_dict().items()}
    path = tmp_path / f"w.{fmt}"
    if fmt == "safetensors":
        save_file(sd, str(path))
    elif fmt == "bin":  # a timm hub pytorch_model.bin: a raw state_dict
        torch.save(sd, path)
    else:
        torch.save({"state_dict": sd, "epoch": 1}, path)
    x = torch.randn(2, 3, *src.pretrained_cfg["input_size"][1:])
    got = create_teacher("test_vit", 4, str(path)).model
    assert _close(_logits(got, x), _logits(src, x))


def test_a_layout_timm_does_not_know_is_still_explained(tmp_path):
    sd = {f"encoder.layer{i}.weight": torch.ones(3) for i in range(4)}
    torch.save({"model": sd}, tmp_path / "odd.pth")
    with pytest.raises(UserError, match=r"does not fit architecture convnextv2_atto: .*missing keys.*unexpected"):
        create_teacher("convnextv2_atto", 3, str(tmp_path / "odd.pth"))


# ------------------------------------------- what timm's pretrained loader accepts, found by adversarial use

def test_a_file_without_batchnorm_counters_loads(tmp_path):
    """torchvision's original ResNet / DenseNet files predate ``num_batches_tracked``: torch's strict load
    (and so timm's) accepts them, so must we."""
    torch.manual_seed(0)
    src = timm.create_model("test_resnet", num_classes=3)
    torch.save({k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")},
               tmp_path / "old_tv.pth")
    got = create_student("test_resnet", 3, initial_checkpoint=str(tmp_path / "old_tv.pth"))
    x = torch.randn(2, 3, 32, 32)
    assert _close(_logits(got, x), _logits(src, x))


def test_deit3_facebook_release_layout_loads(tmp_path):
    """DeiT-III as Facebook's code stores it (``gamma_1`` / ``gamma_2`` layer scales): timm's loader reads it
    through the filter its deit3 builder registers (with ``adapt_layer_scale``), not the module's plain one."""
    torch.manual_seed(0)
    src = timm.create_model("deit3_small_patch16_224", depth=2, num_classes=5)
    fb = {k.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2"): v for k, v in src.state_dict().items()}
    torch.save({"model": fb}, tmp_path / "deit_3_small_224_1k.pth")
    got = timm.create_model("deit3_small_patch16_224", depth=2, num_classes=5)
    from vanillakd.weights import load_weights
    load_weights(got, tmp_path / "deit_3_small_224_1k.pth", what="teacher", use_ema=True)
    x = torch.randn(1, 3, 224, 224)
    assert _close(_logits(got, x), _logits(src, x))


def test_the_filter_is_the_one_timms_builder_registers():
    import functools

    from timm.models import crossvit, vision_transformer

    from vanillakd.weights import timm_filter_fn
    with torch.device("meta"):
        deit3 = timm.create_model("deit3_small_patch16_224", depth=1)
        cross = timm.create_model("crossvit_tiny_240", depth=((1, 1, 0),) * 1)
    fn = timm_filter_fn(deit3)
    assert isinstance(fn, functools.partial) and fn.func is vision_transformer.checkpoint_filter_fn
    assert fn.keywords.get("adapt_layer_scale") is True
    fn = timm_filter_fn(cross)
    assert fn is not None and fn.__module__ == crossvit.__name__  # the builder's local pos_embed renamer


def test_a_trusted_pickled_module_gives_its_weights(tmp_path):
    torch.manual_seed(0)
    src = timm.create_model("test_resnet", num_classes=3)
    torch.save(src, tmp_path / "whole_model.pth")
    with pytest.raises(UserError, match="--trust-checkpoint"):
        create_teacher("test_resnet", 3, str(tmp_path / "whole_model.pth"))
    torch.save({"model": src, "epoch": 3}, tmp_path / "wrapped_model.pth")
    x = torch.randn(2, 3, 32, 32)
    for name in ("whole_model.pth", "wrapped_model.pth"):
        got = create_teacher("test_resnet", 3, str(tmp_path / name), trust=True).model
        assert _close(_logits(got, x), _logits(src, x))


def test_an_rgb_file_loads_into_a_model_of_other_input_channels(tmp_path):
    """timm's pretrained loader adapts the first conv to ``in_chans`` (summing RGB for one channel)."""
    from timm.models import adapt_input_conv
    torch.manual_seed(0)
    src = timm.create_model("test_resnet", num_classes=3)
    torch.save(src.state_dict(), tmp_path / "rgb.pth")
    got = create_student("test_resnet", 3, initial_checkpoint=str(tmp_path / "rgb.pth"), in_chans=1)
    first = src.pretrained_cfg["first_conv"] + ".weight"
    assert torch.allclose(got.state_dict()[first], adapt_input_conv(1, src.state_dict()[first]))


def test_resampling_a_position_table_is_said(tmp_path, caplog):
    torch.manual_seed(0)
    src = timm.create_model("test_vit", num_classes=3)
    torch.save(src.state_dict(), tmp_path / "vit.pth")
    from vanillakd.weights import load_weights
    model = timm.create_model("test_vit", num_classes=3, img_size=96)
    with caplog.at_level("WARNING", logger="vanillakd"):
        load_weights(model, tmp_path / "vit.pth", what="teacher")
    said = [r.getMessage() for r in caplog.records if "resampled" in r.getMessage()]
    assert len(said) == 1 and "pos_embed" in said[0] and str(tuple(src.pos_embed.shape)) in said[0]


def test_a_big_vision_npz_is_explained(tmp_path):
    import numpy as np
    np.savez(tmp_path / "ViT-B_16.npz", **{"Transformer/encoder_norm/scale": np.ones(3, np.float32)})
    with pytest.raises(UserError, match=r"\.npz.*timm"):
        create_teacher("test_vit", 3, str(tmp_path / "ViT-B_16.npz"))


@pytest.mark.parametrize("empty", ["state_dict_ema", "model"])
def test_an_empty_weights_entry_does_not_hide_the_weights(tmp_path, empty):
    torch.manual_seed(0)
    src = timm.create_model("test_resnet", num_classes=3)
    other = "state_dict" if empty == "state_dict_ema" else "model_ema"
    torch.save({other: src.state_dict(), empty: {}}, tmp_path / "w.pth")
    got = create_teacher("test_resnet", 3, str(tmp_path / "w.pth")).model  # the teacher prefers EMA weights
    x = torch.randn(2, 3, 32, 32)
    assert _close(_logits(got, x), _logits(src, x))
    from vanillakd.weights import has_ema
    assert has_ema(torch.load(tmp_path / "w.pth", weights_only=True)) is (empty == "model")


def test_swin_original_layout_loads_without_a_false_resampling_note(tmp_path, caplog):
    """Swin's original code downsamples at the end of a stage (timm: at the start) and names its head
    ``head``: timm's filter renames keys whose names exist in both layouts with other shapes, which is not a
    resampling and must not be reported as one."""
    import re
    torch.manual_seed(0)
    src = timm.create_model("swin_tiny_patch4_window7_224", depths=(1, 1, 1, 1), num_classes=5)
    sd = {}
    for k, v in src.state_dict().items():
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)", k)
        sd[f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}" if m else k.replace("head.fc.", "head.")] = v
    for i, layer in enumerate(src.layers):
        for j, blk in enumerate(layer.blocks):
            sd[f"layers.{i}.blocks.{j}.attn.relative_position_index"] = blk.attn.relative_position_index
    torch.save({"model": sd}, tmp_path / "swin_tiny_patch4_window7_224.pth")
    from vanillakd.weights import load_weights
    got = timm.create_model("swin_tiny_patch4_window7_224", depths=(1, 1, 1, 1), num_classes=5)
    with caplog.at_level("WARNING", logger="vanillakd"):
        load_weights(got, tmp_path / "swin_tiny_patch4_window7_224.pth", what="teacher", use_ema=True)
    assert not [r for r in caplog.records if "resampled" in r.getMessage()]
    x = torch.randn(1, 3, 224, 224)
    assert _close(_logits(got, x), _logits(src, x))


def test_validate_refuses_fewer_classes_than_folders(tmp_path, capsys):
    torch.save(timm.create_model("test_resnet", num_classes=2).state_dict(), tmp_path / "r2.pth")
    data = make_image_folder(tmp_path / "data", per_class=(1, 1), size=32)
    argv = [data, "--model", "test_resnet", "--checkpoint", tmp_path / "r2.pth", "--workers", "0", "--no-progress"]
    assert run_cli(validate.cli, [*argv, "--num-classes", "2"]) == 2
    assert "--num-classes 2 is fewer than the 3 classes" in capsys.readouterr().err
    assert run_cli(validate.cli, argv) == 2
    assert "has a 2-class head but" in capsys.readouterr().err


def test_export_rebuilds_the_students_input_channels_and_pooling(tmp_path):
    torch.manual_seed(0)
    net = timm.create_model("test_resnet", num_classes=3, in_chans=1, global_pool="max")
    torch.save({"arch": "test_resnet", "state_dict": net.state_dict(), "args": {"in_chans": 1, "gp": "max"}},
               tmp_path / "g.pth.tar")
    out = export_checkpoint(tmp_path / "g.pth.tar", tmp_path / "export")
    plain = timm.create_model(f"local-dir:{out}", pretrained=True)
    x = torch.randn(2, 1, 32, 32)
    assert _close(_logits(plain, x), _logits(net, x))
