"""The training step: loss composition, teacher handling, no host synchronisation per step."""
from __future__ import annotations

import argparse
import contextlib

import numpy as np
import pytest
import timm
import torch
from timm.data import Mixup

from conftest import make_student
from vanillakd.cli.run_config import student_settings
from vanillakd.cli.train_args import build_train_parser
from vanillakd.engine import should_evaluate
from vanillakd.losses import KLDiv
from vanillakd.objective import KDObjective, create_base_loss
from vanillakd.precision import Precision
from vanillakd.teachers.live import FrozenTeacher


def make_args(tmp_path, *extra: str) -> argparse.Namespace:
    return build_train_parser("t", "").parse_args(["x", "--model", "test_resnet", "--workers", "0",
                                                   "--output", str(tmp_path), *extra])


def test_teacher_stays_frozen_in_eval_mode():
    teacher = FrozenTeacher(timm.create_model("test_resnet", num_classes=3))
    parent = torch.nn.ModuleDict({"t": teacher})
    parent.train()
    assert not teacher.training and not teacher.model.training
    assert all(not p.requires_grad for p in teacher.parameters())
    out = teacher(torch.randn(2, 3, 32, 32))
    assert not out.requires_grad


def test_objective_combines_weighted_losses():
    torch.manual_seed(0)
    student = timm.create_model("test_resnet", num_classes=5)
    x, y, z_t = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,)), torch.randn(4, 5)
    obj = KDObjective(student, KLDiv(4.0), torch.nn.CrossEntropyLoss(), ori_loss_weight=0.3, kd_loss_weight=2.0)
    student.eval()
    out = obj(x, y, z_t)
    z_s = student(x)
    base = torch.nn.functional.cross_entropy(z_s, y)
    kd = KLDiv(4.0)(z_s=z_s, z_t=z_t)
    torch.testing.assert_close(out["loss"], 0.3 * base + 2.0 * kd)
    torch.testing.assert_close(out["kd_loss"], kd)


def test_per_student_smoothing_equals_timm_mixup_smoothing():
    """Smoothing applied by the objective to a mixed target equals timm's Mixup(label_smoothing=s)."""
    x = torch.randn(4, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 3])
    np.random.seed(1)  # timm draws the mixing coefficient with numpy
    _, t_smooth = Mixup(mixup_alpha=1.0, label_smoothing=0.1, num_classes=6)(x.clone(), y)
    np.random.seed(1)
    _, t_plain = Mixup(mixup_alpha=1.0, label_smoothing=0.0, num_classes=6)(x.clone(), y)
    captured = {}

    class Spy(torch.nn.Module):
        def forward(self, z, target):
            captured["t"] = target
            return z.sum() * 0

    obj = KDObjective(torch.nn.Flatten(), None, Spy(), smoothing=0.1)
    assert not torch.allclose(t_plain, t_smooth)
    obj(torch.randn(4, 6), t_plain, None)
    torch.testing.assert_close(captured["t"], t_smooth)


@pytest.mark.parametrize("soft,smoothing,bce,expected", [
    (True, 0.0, True, "BinaryCrossEntropy"), (True, 0.1, False, "SoftTargetCrossEntropy"),
    (False, 0.1, True, "BinaryCrossEntropy"), (False, 0.1, False, "LabelSmoothingCrossEntropy"),
    (False, 0.0, False, "CrossEntropyLoss")])
def test_base_loss_choice_follows_the_seed(soft, smoothing, bce, expected):
    assert type(create_base_loss(soft, smoothing, bce, None)).__name__ == expected


def test_eval_schedule():
    assert [e for e in range(10) if should_evaluate(e, 10, 3, 0.75)] == [0, 3, 6, 8, 9]
    assert [e for e in range(4) if should_evaluate(e, 4, 10, 1.0)] == [0, 3]


def test_settings_group_ema_decays(tmp_path):
    args = make_args(tmp_path, "--model", "test_resnet", "test_resnet", "test_vit", "--model-ema",
                     "--model-ema-decay", "0.99", "0.999", "0.99", "--kd-loss", "kd", "kd", "dkd")
    settings = student_settings(args)
    assert [(s.model, s.kd_loss, s.ema_decays) for s in settings] == [
        ("test_resnet", "kd", (0.99, 0.999)), ("test_vit", "dkd", (0.99,))]


class SyncCounter:
    """Counts the tensor-to-host reads that would stall a GPU (item, tolist, bool, float, numpy, cpu)."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "cpu")

    def __init__(self, ignore: tuple = ()):
        self.count = 0
        # optimizers keep their step counters as CPU tensors by design (reading them never stalls a GPU)
        self.ignore = {id(t) for t in ignore}

    @contextlib.contextmanager
    def watch(self):
        originals = {n: getattr(torch.Tensor, n) for n in self.NAMES}

        def wrap(fn):
            def inner(t, *a, **k):
                if id(t) not in self.ignore:
                    self.count += 1
                return fn(t, *a, **k)
            return inner
        try:
            for n, fn in originals.items():
                setattr(torch.Tensor, n, wrap(fn))
            yield self
        finally:
            for n, fn in originals.items():
                setattr(torch.Tensor, n, fn)


@pytest.mark.parametrize("kd_loss", ["kd", "bkd", "dkd", "dist"])
def test_train_step_has_no_host_sync(tmp_path, kd_loss):
    args = make_args(tmp_path, "--kd-loss", kd_loss, "--opt", "lamb", "--clip-grad", "1.0", "--model-ema",
                     "--lr", "1e-3", "--warmup-epochs", "1", "--amp", "--mixup", "0.1")
    st = make_student(args, 4, tmp_path / "s", precision=Precision.create(torch.device("cpu"), True),
                      updates_per_epoch=10)
    teacher = FrozenTeacher(timm.create_model("test_resnet", num_classes=4))
    x = torch.randn(4, 3, 32, 32)
    y = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 3]), 4).float() * 0.8 + 0.05
    st.train()
    st.train_step(x, y, teacher(x))  # first step: lazy optimizer state
    steps = [g["step"] for g in st.optimizer.param_groups if isinstance(g.get("step"), torch.Tensor)]
    steps += [s["step"] for s in st.optimizer.state.values() if isinstance(s.get("step"), torch.Tensor)]
    assert all(t.device.type == "cpu" for t in steps)
    counter = SyncCounter(ignore=tuple(steps))
    with counter.watch():
        for _ in range(3):
            z_t = teacher(x)
            st.train_step(x, y, z_t)
    assert counter.count == 0
    metrics = st.train_metrics()
    assert set(metrics) == {"loss", "base_loss", "kd_loss"} and metrics["kd_loss"] > 0
    st.close()


@pytest.mark.parametrize("topk", [0, 2])
def test_cached_teacher_step_has_no_host_sync(tmp_path, topk):
    from vanillakd.teachers.cache import CachedTeacher, EpochWriter, Storage, input_fingerprint
    args = make_args(tmp_path, "--kd-loss", "kd", "--opt", "adamw", "--lr", "1e-3", "--mixup", "0.1")
    st = make_student(args, 4, tmp_path / "s", updates_per_epoch=10)
    x = torch.randn(4, 3, 32, 32)
    y = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 3]), 4).float() * 0.8 + 0.05
    storage = Storage(topk=topk, dtype="float32" if topk == 0 else "float16", num_classes=4, batch_size=4, steps=4)
    writer = EpochWriter(tmp_path / "cache", 0, 0, storage)
    for step in range(4):
        writer.add(step, torch.randn(4, 4), input_fingerprint(x, y))
    writer.commit()
    manifest = {"stream": {"num_classes": 4}, "storage": {"topk": topk, "dtype": storage.dtype}, "teacher": {}}
    cache = CachedTeacher(tmp_path / "cache", manifest, 0, torch.device("cpu"))
    st.train()
    st.train_step(x, y, cache.batch_output(x, y, 0, 0))  # first step: lazy optimizer state
    steps = [s["step"] for s in st.optimizer.state.values() if isinstance(s.get("step"), torch.Tensor)]
    counter = SyncCounter(ignore=tuple(steps))
    with counter.watch():
        for step in range(1, 4):
            st.train_step(x, y, cache.batch_output(x, y, 0, step))
    assert counter.count == 0
    cache.check()  # the batches matched their fingerprints (one host read, at a log point)
    st.close()
