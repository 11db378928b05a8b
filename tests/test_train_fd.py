"""Feature and contrastive distillation for any timm model: families in every direction, gradient flow,
the seed's train-fd / train-crd commands, the KD parts saved apart from the student, bad input."""
from __future__ import annotations

import csv
import shlex

import numpy as np
import pytest
import timm
import torch
from test_train_kd import A2, seed_command

from conftest import make_student, run_cli, save_teacher
from vanillakd.cli import train_crd, train_fd, validate
from vanillakd.cli.train_args import build_train_parser
from vanillakd.data.contrast import ContrastSampler
from vanillakd.errors import UserError
from vanillakd.features import FeatureModel, probe_shapes
from vanillakd.teachers.live import FrozenTeacher

FAMILIES = ["test_resnet", "test_vit", "test_convnext"]
PAIRS = [(s, t) for s in FAMILIES for t in FAMILIES]
METHODS = ["correlation", "rkd", "review", "crd"]
FD = A2.replace("--kd-loss kd", "--kd-loss {}").replace("--bce-loss 1", "--bce-loss 0")


def _features(name: str, preact: bool = False) -> FeatureModel:
    torch.manual_seed(0)
    return FeatureModel(timm.create_model(name, num_classes=5), preact=preact)


@pytest.mark.parametrize("name", FAMILIES + ["test_efficientnet", "resnet18"])
def test_feature_model_gives_maps_pooled_and_same_logits(name):
    fm = _features(name).eval()
    x = torch.randn(2, 3, 64, 64)
    out = fm(x)
    assert len(out.maps) == 4 and all(m.ndim == 4 and m.shape[0] == 2 for m in out.maps)
    assert out.pooled.shape[0] == 2 and out.pooled.ndim == 2
    torch.testing.assert_close(out.logits, fm.model(x))  # one pass, the model's own logits
    shapes = probe_shapes(fm, (3, 64, 64), torch.device("cpu"))
    assert shapes.channels == [m.shape[1] for m in out.maps] and shapes.pooled == out.pooled.shape[1]


def test_resnet_preact_maps_are_the_residual_sums():
    fm = _features("test_resnet", preact=True).eval()
    for m in fm.modules():  # timm zero-inits each block's last BN; give the residual branch some signal
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.normal_(m.weight)
    out = fm(torch.randn(2, 3, 64, 64))
    assert fm.has_preact and len(out.preact) == 4
    for pre, post in zip(out.preact, out.maps):
        torch.testing.assert_close(torch.relu(pre), post)  # post = ReLU(pre)
        assert (pre < 0).any()                              # and pre really is before the ReLU
    assert not _features("test_convnext", preact=True).has_preact  # other families: their usual outputs


def _student(tmp_path, student, kd_loss, teacher_shapes, input_size=(3, 32, 32), num_data=40):
    args = build_train_parser("t", "").parse_args(
        ["x", "--model", student, "--kd-loss", kd_loss, "--output", str(tmp_path), "--nce-k", "4", "--lr", "1e-3",
         "--opt", "adamw", "--mixup", "0.1"])
    return make_student(args, 5, tmp_path / kd_loss, updates_per_epoch=10, loss_kind="features",
                        teacher_shapes=teacher_shapes, num_data=num_data, input_size=input_size)


@pytest.mark.parametrize("student,teacher", PAIRS)
def test_every_method_any_pair(tmp_path, student, teacher):
    """A few steps of each feature method: finite losses, gradients reach the student's stages and the KD
    parts, the teacher gets none."""
    size = (3, 32, 32)
    t_model = FeatureModel(timm.create_model(teacher, num_classes=5), preact=True)
    t_shapes = probe_shapes(t_model, size, torch.device("cpu"))
    frozen = FrozenTeacher(t_model)
    x = torch.randn(4, 3, 32, 32)
    y = torch.softmax(torch.randn(4, 5), 1)
    extras = {"index": torch.tensor([0, 1, 2, 3]), "contrastive_index": torch.randint(0, 40, (4, 5))}
    extras["contrastive_index"][:, 0] = extras["index"]
    for method in METHODS:
        st = _student(tmp_path, student, method, t_shapes)
        st.train()
        before = [p.detach().clone() for p in st.kd_loss.parameters()]
        st.optimizer.zero_grad()
        st.objective.ori_loss_weight = 0.0  # the KD term alone must move the student's early stages
        out = st.objective(x, y, frozen(x), extras, epoch=1)
        st.objective.ori_loss_weight = 1.0
        assert torch.isfinite(out["loss"]) and out["kd_loss"] > 0, method
        out["loss"].backward()
        stage_params = [p for n, p in st.model.named_parameters() if n.startswith(("layer1", "stages.0", "blocks.0"))]
        assert stage_params and sum(float(p.grad.abs().sum()) for p in stage_params if p.grad is not None) > 0, method
        kd_params = list(st.kd_loss.parameters())
        assert kd_params or method == "rkd"
        assert all(p.grad is not None for p in kd_params if p.requires_grad), method
        assert all(p.grad is None for p in frozen.parameters()), method
        st.optimizer.step()
        assert any(not torch.equal(a, p) for a, p in zip(before, st.kd_loss.parameters())) or not before
        for _ in range(2):
            st.train_step(x, y, frozen(x), extras, epoch=1)
        assert np.isfinite(st.train_metrics()["loss"])
        st.close()


def test_kd_parts_are_in_the_optimizer_and_saved_apart(tmp_path):
    t_shapes = probe_shapes(_features("test_convnext"), (3, 32, 32), torch.device("cpu"))
    st = _student(tmp_path, "test_resnet", "review", t_shapes)
    opt_params = {id(p) for g in st.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in opt_params for p in st.kd_loss.parameters())
    ckpt = st.checkpoint(0, vars(build_train_parser("t", "").parse_args(["x"])), None)
    assert set(ckpt["state_dict"]) == set(st.model.state_dict())  # a plain timm checkpoint
    assert ckpt["kd_state"] and all(k.startswith("abfs.") for k in ckpt["kd_state"])
    st.close()


def test_model_without_forward_intermediates_is_refused():
    class Plain(torch.nn.Module):
        def forward(self, x):
            return x
    with pytest.raises(UserError, match="model plain_net has no forward_intermediates"):
        FeatureModel(Plain(), name="plain_net")


def test_contrast_sampler_draws_other_classes_seeded():
    labels = np.repeat(np.arange(5), [3, 1, 6, 2, 8])
    s = ContrastSampler(labels, k=50, seed=1)
    for i in range(len(labels)):
        row = s.draw(i)
        assert row[0] == i and len(row) == 51
        assert (labels[row[1:]] != labels[i]).all()
    assert np.array_equal(ContrastSampler(labels, 50, 1).draw(7), s.draw(7))
    s.epoch = 1
    assert not np.array_equal(ContrastSampler(labels, 50, 1).draw(7), s.draw(7))
    # uniform over the other classes' samples: every other sample is drawn
    big = ContrastSampler(labels, k=4000, seed=0).draw(0)
    assert set(big[1:].tolist()) == set(np.flatnonzero(labels != labels[0]).tolist())
    with pytest.raises(UserError, match="at least two classes"):
        ContrastSampler(np.zeros(10, dtype=int), k=3)


@pytest.fixture(scope="module")
def fd_teacher(tmp_path_factory):
    return save_teacher(tmp_path_factory.mktemp("fdt") / "t.pth", "test_resnet", num_classes=3)


@pytest.mark.parametrize("method", METHODS)
def test_seed_fd_commands_run_and_validate(method, tiny_data, fd_teacher, tmp_path):
    entry = train_crd.cli if method == "crd" else train_fd.cli
    argv = seed_command(FD.format(method), tiny_data, "test_vit", "test_resnet", fd_teacher, tmp_path, method,
                        epochs=2)
    assert run_cli(entry, argv + ["--img-size", "32", "--nce-k", "8"]) == 0
    rows = list(csv.DictReader(open(tmp_path / method / "summary.csv")))
    assert len(rows) == 2 and all(np.isfinite(float(r["train_loss"])) for r in rows)
    if method == "review":
        assert float(rows[0]["train_kd_loss"]) == 0.0 and float(rows[1]["train_kd_loss"]) > 0  # warm-up
    ckpt = torch.load(tmp_path / method / "last.pth.tar", weights_only=True)
    if method != "rkd":
        assert ckpt["kd_state"]
    if method == "crd":
        assert ckpt["kd_state"]["memory_s"].shape[0] == 24 and (ckpt["kd_state"]["z"] > 0).all()
    assert run_cli(validate.cli, [tiny_data, "--model", "test_vit", "--checkpoint",
                                  tmp_path / method / "model_best.pth.tar", "--img-size", "32", "-j", "0"]) == 0


@pytest.fixture(scope="module")
def resnet152_teacher(tmp_path_factory):
    return save_teacher(tmp_path_factory.mktemp("r152") / "r152.pth", "resnet152", num_classes=3)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_seed_fd_command_with_original_models_runs_a_step(tiny_data, tmp_path, two_threads, resnet152_teacher,
                                                           method):
    """The seed's commands keep resnet50 <- resnet152 (random weights): one step each, on a few images."""
    entry = train_crd.cli if method == "crd" else train_fd.cli
    argv = seed_command(FD.format(method), tiny_data, "resnet50", "resnet152", resnet152_teacher, tmp_path, "orig",
                        batch=2)
    assert run_cli(entry, argv + ["--max-train-steps", "1", "--img-size", "64", "--nce-k", "8", "-vb", "12"]) == 0
    assert torch.load(tmp_path / "orig" / "last.pth.tar", weights_only=True)["arch"] == "resnet50"


def test_crd_with_one_class_is_refused(tmp_path, fd_teacher, capsys):
    from conftest import make_image_folder
    data = make_image_folder(tmp_path / "one", classes=("only",), per_class=(4, 2), size=16)
    one = save_teacher(tmp_path / "t1.pth", "test_resnet", num_classes=1)
    argv = seed_command(FD.format("crd"), data, "test_resnet", "test_resnet", one, tmp_path, "c")
    assert run_cli(train_crd.cli, argv + ["--img-size", "32"]) == 2
    assert "at least two classes" in capsys.readouterr().err


def test_feature_loss_in_train_kd_is_refused(tiny_data, fd_teacher, tmp_path, capsys):
    from vanillakd.cli import train_kd
    argv = seed_command(FD.format("rkd"), tiny_data, "test_resnet", "test_resnet", fd_teacher, tmp_path, "x")
    assert run_cli(train_kd.cli, argv + ["--img-size", "32"]) == 2
    assert "use train-fd.py" in capsys.readouterr().err


def test_fd_help_lists_methods(capsys):
    assert run_cli(train_fd.cli, shlex.split("--help")) == 0
    out = capsys.readouterr().out
    assert all(m in out for m in ("correlation", "rkd", "review", "crd"))


def test_feature_teacher_stays_frozen_in_eval(tiny_data, fd_teacher):
    """The teacher wrapped for features stays in eval mode (its BN statistics never move) and gets no grad."""
    from vanillakd.cli.run_config import run_config
    from vanillakd.run_setup import build_teacher
    args = build_train_parser("t", "").parse_args([str(tiny_data), "--model", "test_vit", "--kd-loss", "review",
                                                   "--teacher", "test_resnet", "--teacher-pretrained",
                                                   str(fd_teacher)])
    cfg = run_config(args)
    data_cfg = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3}
    distillers = [s.kd_loss for s in cfg.students if s.uses_teacher]
    teacher, shapes = build_teacher(cfg, distillers, 3, torch.device("cpu"), data_cfg)
    assert shapes.channels and not any(m.training for m in teacher.modules())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    teacher(torch.randn(4, 3, 32, 32))
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
