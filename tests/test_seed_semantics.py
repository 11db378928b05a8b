"""Training semantics of the seed's scripts (VanillaKD's train-kd / train-fd / train-crd) that a clean rewrite
easily gets "more right" than the baselines it must reproduce: ReviewKD's feature maps on ResNets, weight decay
of the KD parts' own parameters, the schedule under ``--start-epoch``."""
from __future__ import annotations

import copy
import csv

import pytest
import timm
import torch
from test_train_fd import _features
from timm.models.resnet import Bottleneck
from timm.scheduler import create_scheduler_v2
from torch import nn

from conftest import make_student, run_cli
from vanillakd.cli import train_kd
from vanillakd.cli.run_config import run_config
from vanillakd.cli.train_args import build_train_parser
from vanillakd.errors import UserError
from vanillakd.features import probe_shapes
from vanillakd.run_setup import build_teacher
from vanillakd.student import StudentRun

CPU = torch.device("cpu")
STAGES = ("layer1", "layer2", "layer3", "layer4")


def _args(*flags: str, data: str = "x"):
    return build_train_parser("t", "").parse_args([data, *flags])


def _student(tmp_path, args, teacher_shapes, num_classes: int = 3) -> StudentRun:
    return make_student(args, num_classes, tmp_path / "run", device=CPU, updates_per_epoch=10, loss_kind="features",
                        teacher_shapes=teacher_shapes, num_data=40, input_size=(3, 32, 32))


def _randomise_bn(model: nn.Module) -> None:
    # timm zero-inits each block's last BN, so a block's sum would equal its (post-ReLU) shortcut
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight)
            nn.init.normal_(m.bias)


def _stage_maps_by_hand(model: nn.Module, x: torch.Tensor, preact: bool) -> list[torch.Tensor]:
    """A timm ResNet's stage maps computed without vanillakd: the stem and blocks run one by one; with
    ``preact`` each stage's final block runs once more, on a copy without its last activation."""
    x = model.maxpool(model.act1(model.bn1(model.conv1(x))))
    maps = []
    for name in STAGES:
        layer = getattr(model, name)
        for block in layer[:-1]:
            x = block(x)
        last = layer[-1]
        if preact:
            bare = copy.deepcopy(last)
            setattr(bare, "act3" if isinstance(last, Bottleneck) else "act2", nn.Identity())
            maps.append(bare(x))
        x = last(x)
        if not preact:
            maps.append(x)
    return maps


def _kd_inputs(kd_loss: nn.Module) -> dict:
    """What the KD loss is called with, recorded on each call."""
    seen: dict = {}
    kd_loss.register_forward_pre_hook(lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True)
    return seen


@pytest.fixture(scope="module")
def bn_teacher(tmp_path_factory):
    """A test_resnet teacher (BasicBlock and Bottleneck stages) whose blocks' sums go negative."""
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3)
    _randomise_bn(model)
    path = tmp_path_factory.mktemp("bnt") / "t.pth"
    torch.save({"state_dict": model.state_dict()}, path)
    return path


@pytest.mark.parametrize("preact", [False, True])
def test_review_gets_post_relu_stage_maps_unless_review_preact(tmp_path, bn_teacher, preact):
    """The seed's ReviewKD read its ResNet maps beside an in-place ReLU, so it trained on the post-ReLU
    stage outputs; ``--review-preact`` gives the residual sums before that ReLU."""
    args = _args("--model", "test_resnet", "--kd-loss", "review", "--teacher", "test_resnet",
                 "--teacher-pretrained", str(bn_teacher), *(["--review-preact"] if preact else []))
    teacher_cfg = timm.create_model("test_resnet").pretrained_cfg
    data_cfg = {"input_size": (3, 32, 32), "mean": teacher_cfg["mean"], "std": teacher_cfg["std"]}
    run_cfg = run_config(args)
    teacher, t_shapes = build_teacher(run_cfg, [s.kd_loss for s in run_cfg.students if s.uses_teacher], 3, CPU,
                                      data_cfg)
    assert teacher.renorm is None and teacher.resize is None  # the teacher sees the batch as it is
    st = _student(tmp_path, args, t_shapes)
    _randomise_bn(st.model)
    st.objective.eval()
    seen = _kd_inputs(st.kd_loss)
    x = torch.randn(2, 3, 32, 32)
    st.objective(x, torch.tensor([0, 2]), teacher(x), epoch=1)
    with torch.no_grad():
        for side, model in (("feature_student", st.model), ("feature_teacher", teacher.model.model)):
            expected = _stage_maps_by_hand(model, x, preact)
            got = seen[side][:-1]  # the pooled feature comes last
            assert len(got) == len(expected) == 4, side
            for g, e in zip(got, expected):
                torch.testing.assert_close(g, e)
                assert bool((g < 0).any()) == preact, side  # post-ReLU maps never go negative
    st.close()


def test_other_feature_methods_never_hook_preact(tmp_path, bn_teacher):
    args = _args("--model", "test_resnet", "--kd-loss", "correlation", "--review-preact")
    t_shapes = probe_shapes(_features("test_resnet"), (3, 32, 32), CPU)
    st = _student(tmp_path, args, t_shapes)
    assert not st.objective.student.has_preact and not st.objective.preact
    st.close()


def _decay_of(optimizer: torch.optim.Optimizer) -> dict[int, float]:
    return {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}


@pytest.mark.parametrize("method,opt", [("correlation", "sgd"), ("review", "lamb"), ("crd", "adamw"),
                                        ("review", "adamw --layer-decay 0.75")])
def test_kd_parts_get_no_weight_decay_on_1d_params_and_biases(tmp_path, method, opt):
    """As the seed's KD modules, submodules of the student: timm's rule for the student's own parameters."""
    args = _args("--model", "test_resnet", "--kd-loss", method, "--opt", *opt.split(), "--weight-decay", "0.05",
                 "--nce-k", "4")
    t_shapes = probe_shapes(_features("test_convnext"), (3, 32, 32), CPU)
    st = _student(tmp_path, args, t_shapes)
    decay = _decay_of(st.optimizer)
    kinds = set()
    for name, p in st.kd_loss.named_parameters():
        flat = p.ndim <= 1 or name.endswith(".bias")
        kinds.add(flat)
        assert decay[id(p)] == (0.0 if flat else 0.05), name
    assert kinds == {True, False}  # both kinds exist in each method
    kd_ids = {id(p) for p in st.kd_loss.parameters()}
    kd_groups = [g for g in st.optimizer.param_groups if any(id(p) in kd_ids for p in g["params"])]
    # and they keep the student's lr, unscaled by layer decay (their names match none of its layers)
    assert all(g["initial_lr"] == st.setting.lr and g.get("lr_scale", 1.0) == 1.0 for g in kd_groups)
    st.close()


def _old_layout(ckpt: dict) -> dict:
    """A checkpoint as written when the KD parts were one weight-decayed group: the last two groups merged."""
    old = copy.deepcopy(ckpt)
    groups = old["optimizer"]["param_groups"]
    groups[-2]["params"] += groups.pop()["params"]
    for key, value in old["scheduler"].items():
        if isinstance(value, list) and len(value) == len(groups) + 1:
            old["scheduler"][key] = value[:-1]
    return old


def test_resume_of_a_checkpoint_with_one_kd_group(tmp_path, caplog):
    args = _args("--model", "test_resnet", "--kd-loss", "review", "--opt", "adamw", "--warmup-epochs", "2",
                 "--epochs", "4")
    t_shapes = probe_shapes(_features("test_resnet"), (3, 32, 32), CPU)
    st = _student(tmp_path, args, t_shapes)
    old = _old_layout(st.checkpoint(0, vars(args), None))
    with pytest.raises(UserError, match=r"parameter groups, this run .*; pass --no-resume-opt"):
        st.resume(old, "old.pth.tar")
    assert st.resume(old, "old.pth.tar", load_optimizer=False) == (1, 0)
    assert "lr schedule was saved for" in caplog.text
    # every group, the KD ones too, stands at epoch 1 of the schedule
    lrs = {g["lr"] for g in st.optimizer.param_groups}
    assert len(lrs) == 1 and lrs != {args.lr[0]}
    st.close()


def _expected_lr(epoch: int, lr: float, on_updates: bool, updates_per_epoch: int) -> float:
    """timm's own scheduler for the same flags, at the end of ``epoch``'s training."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    sched, _ = create_scheduler_v2(opt, sched="cosine", num_epochs=4, warmup_epochs=5, warmup_lr=1e-6,
                                   min_lr=1e-5, step_on_epochs=not on_updates, updates_per_epoch=updates_per_epoch)
    if on_updates:
        sched.step_update((epoch + 1) * updates_per_epoch)
    else:
        sched.step(epoch)
    return opt.param_groups[0]["lr"]


@pytest.mark.parametrize("on_updates", [False, True])
def test_start_epoch_moves_the_schedule(tiny_data, tmp_path, on_updates):
    """``--start-epoch 2`` trains its first epoch at epoch 2's lr, not at the warm-up's start."""
    argv = [tiny_data, "--model", "test_resnet", "--kd-loss", "none", "--start-epoch", "2", "--epochs", "4",
            "--warmup-epochs", "5", "--warmup-lr", "1e-6", "--lr", "2.5e-3", "--min-lr", "1e-5", "--sched", "cosine",
            "-b", "4", "--max-train-steps", "2", "--img-size", "32", "--workers", "0", "--output", tmp_path,
            "--experiment", "s", "--no-progress", "--eval-interval", "100",
            *(["--sched-on-updates"] if on_updates else [])]
    assert run_cli(train_kd.cli, argv) == 0
    rows = list(csv.DictReader(open(tmp_path / "s" / "summary.csv")))
    assert [int(r["epoch"]) for r in rows] == [2, 3]
    for r in rows:
        assert float(r["lr"]) == pytest.approx(_expected_lr(int(r["epoch"]), 2.5e-3, on_updates, 2), rel=1e-9)


def test_start_epoch_past_the_run_and_review_preact_elsewhere_are_one_line_errors(tiny_data, tmp_path, capsys):
    base = [tiny_data, "--model", "test_resnet", "--kd-loss", "none", "--epochs", "2", "-b", "4",
            "--img-size", "32", "--workers", "0", "--output", tmp_path, "--no-progress"]
    assert run_cli(train_kd.cli, [*base, "--start-epoch", "2"]) == 2
    assert "--start-epoch 2 leaves nothing to train: the run has 2 epochs" in capsys.readouterr().err
    assert run_cli(train_kd.cli, [*base, "--review-preact"]) == 2
    assert "--review-preact applies to --kd-loss review only" in capsys.readouterr().err
