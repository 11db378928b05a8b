"""Every registered KD method, found through the registry (nothing here names a method to test it): finite losses
and gradients in float32 / bfloat16 / float16, its flags on the training scripts' command line, a short training
run each; the registry's declaration checks; and a new method added as one file and trained with, untouched
otherwise. (Each method's numbers against an independent computation: test_losses.py, test_feature_losses.py.)
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import inspect
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import REPO, run_cli
from vanillakd.cli import method_flags as cli_flags
from vanillakd.cli.method_flags import add_method_args, method_args_from
from vanillakd.errors import UserError
from vanillakd.features import FeatureShapes
from vanillakd.losses import (
    FeatureKDLoss,
    MethodDeclarationError,
    MethodFlag,
    create_kd_loss_for,
    get_kd_loss_entry,
    list_kd_losses,
    method_flags,
    register_kd_loss,
    registry,
)

METHODS = list_kd_losses()
LOGIT_METHODS = list_kd_losses("logits")
FEATURE_METHODS = list_kd_losses("features")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# small synthetic models: two stage maps and a pooled feature each, a 3-class head, a 12-image training set
STUDENT = FeatureShapes(channels=[4, 6], sizes=[(4, 4), (2, 2)], pooled=6)
TEACHER = FeatureShapes(channels=[5, 8], sizes=[(4, 4), (2, 2)], pooled=10)
BATCH, CLASSES, NUM_DATA, CONTRAST = 4, 3, 12, 4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def default_method_args() -> dict:
    """What the training scripts pass when no method flag is given."""
    return method_args_from(argparse.Namespace())


def build(name: str, method_args=None) -> nn.Module:
    torch.manual_seed(0)
    return create_kd_loss_for(name, default_method_args() if method_args is None else method_args,
                              STUDENT, TEACHER, NUM_DATA)


def loss_inputs(name: str, dtype: torch.dtype, seed: int = 0) -> dict:
    """What the training objective passes (student tensors leaves requiring grad, in the models' dtype)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    def features(shapes: FeatureShapes):
        maps = [randn(BATCH, c, h, w) for c, (h, w) in zip(shapes.channels, shapes.sizes)]
        return maps + [randn(BATCH, shapes.pooled)]

    kw = dict(z_s=randn(BATCH, CLASSES, scale=5.0).requires_grad_(True), z_t=randn(BATCH, CLASSES, scale=5.0),
              target=torch.randint(0, CLASSES, (BATCH,), generator=g), feature_student=None, feature_teacher=None,
              epoch=5.0)
    if get_kd_loss_entry(name).uses_features:
        kw["feature_student"] = [f.requires_grad_(True) for f in features(STUDENT)]
        kw["feature_teacher"] = features(TEACHER)
    if get_kd_loss_entry(name).uses_contrast:
        idx = torch.randperm(NUM_DATA, generator=g)[:BATCH]
        draws = torch.randint(0, NUM_DATA, (BATCH, CONTRAST), generator=g)
        kw.update(index=idx, contrastive_index=torch.cat([idx[:, None], draws], 1))
    return kw


def student_leaves(kw: dict) -> list[torch.Tensor]:
    return [kw["z_s"]] + list(kw["feature_student"] or [])


def precision(dtype):
    return contextlib.nullcontext() if dtype == torch.float32 else torch.autocast("cpu", dtype=dtype)


# ----------------------------------------------------------------------------------------------------------
# every method: numbers stay finite, gradients reach the student and the method's own parameters
# ----------------------------------------------------------------------------------------------------------

def test_registry_finds_the_methods():
    assert METHODS == sorted(METHODS) and set(LOGIT_METHODS) | set(FEATURE_METHODS) == set(METHODS)
    assert not set(LOGIT_METHODS) & set(FEATURE_METHODS)
    assert {"kd", "bkd", "dkd", "dist"} <= set(LOGIT_METHODS)
    assert {"correlation", "rkd", "review", "crd"} <= set(FEATURE_METHODS)
    assert list_kd_losses("contrast") == [n for n in METHODS if get_kd_loss_entry(n).uses_contrast]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("name", METHODS)
def test_finite_loss_and_gradients(name, dtype):
    """The model outputs arrive in the autocast dtype and the loss runs under autocast, as in mixed-precision
    training (float32: no autocast)."""
    loss = build(name).train()
    kw = loss_inputs(name, dtype)
    with precision(dtype):
        value = loss(**kw)
    assert isinstance(value, torch.Tensor) and value.ndim == 0
    assert value.dtype == torch.float32, "losses are float32 whatever the inputs"
    assert torch.isfinite(value) and value.requires_grad
    value.backward()
    reached = [t for t in student_leaves(kw) if t.grad is not None]
    assert reached, "no gradient reaches the student"
    assert any(t.grad.abs().sum() > 0 for t in reached)
    for t in reached:
        assert t.grad.dtype == dtype and torch.isfinite(t.grad).all()
    for f in [kw["z_t"]] + list(kw["feature_teacher"] or []):
        assert f.grad is None and not f.requires_grad
    for pname, p in loss.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname
    for bname, b in loss.named_buffers():
        assert torch.isfinite(b).all(), bname


@pytest.mark.parametrize("dtype", DTYPES[1:], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("name", METHODS)
def test_half_inputs_equal_float32_of_the_same_values(name, dtype):
    """The arithmetic is float32 inside: half-precision inputs (no autocast) give the float32 loss of the same
    rounded values."""
    kw_h = loss_inputs(name, dtype, seed=1)
    kw_f = dict(kw_h, z_s=kw_h["z_s"].detach().float(), z_t=kw_h["z_t"].float())
    if kw_h["feature_student"] is not None:
        kw_f.update(feature_student=[f.detach().float() for f in kw_h["feature_student"]],
                    feature_teacher=[f.float() for f in kw_h["feature_teacher"]])
    a, b = build(name).eval()(**kw_h), build(name).eval()(**kw_f)
    assert torch.isfinite(a)
    torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", METHODS)
def test_entry_declaration(name):
    e = get_kd_loss_entry(name)
    assert e.name == name and e.needs <= registry.NEEDS and e.kind in ("logits", "features")
    assert e.uses_features == (e.kind == "features") == issubclass(e.cls, FeatureKDLoss)
    assert type(e.needs) is frozenset
    init = inspect.signature(e.cls.__init__).parameters
    merged = {g.option: g for g in method_flags()}
    for f in e.flags:
        assert f.option in merged and merged[f.option]._spec() == f._spec()
        # no flag value given: the same module as the class's own default
        if f.keyword in init and init[f.keyword].default is not inspect.Parameter.empty:
            assert init[f.keyword].default == f.default, f.option
    # the default flag values build the registered class
    assert type(create_kd_loss_for(name, default_method_args(), STUDENT, TEACHER, NUM_DATA)) is e.cls


@pytest.mark.parametrize("name", METHODS)
def test_preact_follows_its_flag(name):
    e = get_kd_loss_entry(name)
    assert e.wants_preact(default_method_args()) is False
    assert e.wants_preact({}) is False
    if e.preact is None:
        assert e.wants_preact({f.dest: True for f in method_flags() if f.is_switch}) is False
        return
    dest = next(f.dest for f in e.flags if f.option == e.preact)
    assert e.wants_preact({dest: True}) is True
    assert e.wants_preact({dest: False}) is False
    assert e.wants_preact({dest: None}) is False


def test_review_declares_preact_and_crd_contrast():
    assert get_kd_loss_entry("review").preact == "--review-preact"
    assert get_kd_loss_entry("review").wants_preact({"review_preact": True})
    assert get_kd_loss_entry("crd").uses_contrast and get_kd_loss_entry("crd").needs == {"features", "contrast"}
    assert not any(get_kd_loss_entry(n).uses_contrast for n in METHODS if n != "crd")


# ----------------------------------------------------------------------------------------------------------
# the flags: merged, on the command line as before, values collected by dest
# ----------------------------------------------------------------------------------------------------------

# today's hand-written flags (cli/train_args.py before the methods declared them): option -> (type, default,
# positive)
EXPECTED = {
    "--temperature": (float, 1.0, True), "--dkd-alpha": (float, 1.0, False), "--dkd-beta": (float, 2.0, False),
    "--dist-beta": (float, 1.0, False), "--dist-gamma": (float, 1.0, False), "--feat-dim": (int, 128, True),
    "--rkd-distance-weight": (float, 25.0, False), "--rkd-angle-weight": (float, 50.0, False),
    "--review-warmup-epochs": (float, 1.0, True), "--review-preact": (bool, False, False),
    "--nce-k": (int, 16384, True), "--nce-t": (float, 0.07, True), "--nce-mom": (float, 0.5, False),
}


def test_method_flags_merged_stable_and_as_before():
    flags = method_flags()
    options = [f.option for f in flags]
    assert len(options) == len(set(options))
    assert options == [f.option for f in method_flags()]
    declared = {f.option for n in METHODS for f in get_kd_loss_entry(n).flags}
    assert set(options) == declared
    logit = {f.option for n in LOGIT_METHODS for f in get_kd_loss_entry(n).flags}
    assert options == [o for o in options if o in logit] + [o for o in options if o not in logit]
    got = {f.option: (f.type, f.default, f.positive) for f in flags if f.option in EXPECTED}
    assert got == EXPECTED
    for option, (_, default, _) in EXPECTED.items():
        assert type(got[option][1]) is type(default), option
    by_option = {f.option: f for f in flags}
    assert by_option["--temperature"].help == "KD / DKD temperature, DIST tau"
    assert {n for n in METHODS if any(f.option == "--temperature" for f in get_kd_loss_entry(n).flags)} >= \
        {"kd", "dkd", "dist"}


def _parser():
    p = argparse.ArgumentParser(prog="t")
    add_method_args(p)
    return p


def test_add_method_args_defaults_types_and_groups():
    p = _parser()
    args = p.parse_args([])
    assert method_args_from(args) == {f.dest: f.default for f in method_flags()} == default_method_args()
    titles = [g.title for g in p._action_groups]
    assert cli_flags.LOGIT_TITLE in titles and cli_flags.FEATURE_TITLE in titles
    args = p.parse_args(["--temperature", "4", "--dkd-alpha", "-0.5", "--nce-k", "8", "--review-preact"])
    vals = method_args_from(args)
    assert vals["temperature"] == 4.0 and type(vals["temperature"]) is float
    assert vals["dkd_alpha"] == -0.5 and vals["nce_k"] == 8 and vals["review_preact"] is True
    one = argparse.ArgumentParser()
    group = one.add_argument_group("Distillation")
    add_method_args(group)
    assert {a.dest for a in group._group_actions} == {f.dest for f in method_flags()}


@pytest.mark.parametrize("argv,message", [
    (["--temperature", "0"], "argument --temperature: must be > 0, got 0"),
    (["--nce-k", "-3"], "argument --nce-k: must be > 0, got -3"),
    (["--feat-dim", "1.5"], "argument --feat-dim: invalid int value: '1.5'"),
    (["--dkd-beta", "x"], "argument --dkd-beta: invalid float value: 'x'"),
])
def test_add_method_args_checks_like_argparse(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.fixture(scope="module")
def script_help() -> dict[str, str]:
    """``python SCRIPT --help`` of the three training scripts, whitespace removed (argparse wraps help)."""
    out = {}
    for script in ("train-kd.py", "train-fd.py", "train-crd.py"):
        r = subprocess.run([sys.executable, str(REPO / script), "--help"], capture_output=True, text=True,
                           cwd=REPO, env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO)), timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        out[script] = "".join(r.stdout.split())
    return out


@pytest.mark.parametrize("name", METHODS)
def test_flags_in_script_help(name, script_help):
    e = get_kd_loss_entry(name)
    scripts = ["train-kd.py"] if e.kind == "logits" else ["train-fd.py", "train-crd.py"]
    merged = {f.option: f for f in method_flags()}
    for script in scripts:
        text = script_help[script]
        assert name in text, script
        for f in e.flags:
            assert f.option in text, (script, f.option)
            help_text = merged[f.option].help.replace("%%", "%")
            assert "".join(help_text.split()) in text, (script, f.option)


# ----------------------------------------------------------------------------------------------------------
# building from flag values
# ----------------------------------------------------------------------------------------------------------

def test_create_kd_loss_for_maps_values_and_ignores_other_methods():
    dkd = create_kd_loss_for("dkd", {"temperature": 3.0, "dkd_alpha": 0.5, "nce_k": 7, "unrelated": "x"})
    assert (dkd.alpha, dkd.beta, dkd.temperature) == (0.5, 2.0, 3.0)  # dkd_beta missing: its default
    dist = create_kd_loss_for("dist", {"temperature": 2.0, "dist_beta": None})
    assert (dist.beta, dist.gamma, dist.tau) == (1.0, 1.0, 2.0)
    assert create_kd_loss_for("dkd", {"dkd_alpha": 0.5}, alpha=4.0).alpha == 4.0  # overrides win
    crd = create_kd_loss_for("crd", {"nce_k": 5, "nce_t": 0.2, "nce_mom": 0.3, "feat_dim": 16}, STUDENT, TEACHER, 50)
    assert (crd.k, crd.temperature, crd.momentum, crd.num_data) == (5, 0.2, 0.3, 50)
    assert crd.memory_s.shape == (50, 16) and crd.embed_s.linear.in_features == STUDENT.pooled
    rev = create_kd_loss_for("review", {"review_preact": True, "review_warmup_epochs": 2.5}, STUDENT, TEACHER)
    assert rev.preact is True and rev.warmup_epochs == 2.5


@pytest.mark.parametrize("name", FEATURE_METHODS)
def test_create_kd_loss_for_feature_method_needs_shapes(name):
    with pytest.raises(ValueError, match="feature shapes"):
        create_kd_loss_for(name, {}, None, TEACHER, NUM_DATA)
    with pytest.raises(ValueError, match="feature shapes"):
        create_kd_loss_for(name, {}, STUDENT, None, NUM_DATA)


def test_create_kd_loss_for_unknown_name_and_bad_value():
    with pytest.raises(UserError, match="unknown kd loss 'nope'.*dkd"):
        create_kd_loss_for("nope", {})
    with pytest.raises(UserError, match="--temperature must be > 0, got 0"):
        create_kd_loss_for("kd", {"temperature": 0})


# ----------------------------------------------------------------------------------------------------------
# declarations are checked when a method registers
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture
def scratch_registry(monkeypatch):
    """The registry as it is, in a copy that is dropped after the test."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    return registry._REGISTRY


class Scaled(nn.Module):
    def __init__(self, scale: float = 1.0, temperature: float = 1.0):
        super().__init__()
        self.scale, self.temperature = scale, temperature

    def forward(self, z_s, z_t, **kwargs):
        return self.scale * (z_s.float() - z_t.float()).pow(2).mean()


class Shaped(FeatureKDLoss):
    def __init__(self, channels: int, weight: float = 1.0):
        super().__init__()
        self.channels, self.weight = channels, weight

    @classmethod
    def from_shapes(cls, student_shapes, teacher_shapes, num_data, width: int = 0, **kwargs):
        return cls(student_shapes.pooled + width, **kwargs)

    def forward(self, feature_student, feature_teacher, **kwargs):
        return feature_student[-1].float().mean() * self.weight


SCALE = MethodFlag("--scratch-scale", "scale", float, 1.0, help="scale", positive=True)


def test_registering_a_method_makes_it_complete(scratch_registry):
    register_kd_loss("scratch", needs={"logits"}, flags=(SCALE, registry.MethodFlag(
        "--temperature", "temperature", float, 1.0, positive=True)))(Scaled)
    register_kd_loss("scratchfeat", needs={"features"}, flags=(
        MethodFlag("--scratch-weight", "weight", float, 1.0),
        MethodFlag("--scratch-width", "width", int, 0, minimum=0)))(Shaped)
    assert "scratch" in list_kd_losses("logits") and "scratchfeat" in list_kd_losses("features")
    options = [f.option for f in method_flags()]
    assert options.count("--temperature") == 1 and "--scratch-scale" in options
    assert options.index("--scratch-scale") < options.index("--feat-dim") < options.index("--scratch-width")
    args = _parser().parse_args(["--scratch-scale", "3", "--scratch-width", "2"])
    values = method_args_from(args)
    assert create_kd_loss_for("scratch", values).scale == 3.0
    m = create_kd_loss_for("scratchfeat", values, STUDENT, TEACHER, 1)
    assert isinstance(m, Shaped) and m.channels == STUDENT.pooled + 2  # a from_shapes keyword is fed too
    with pytest.raises(SystemExit):
        _parser().parse_args(["--scratch-width", "-1"])


@pytest.mark.parametrize("declare,message", [
    (lambda: register_kd_loss("bad", flags=(MethodFlag("--bad-scale", "scael", float, 1.0),))(Scaled),
     r"flag --bad-scale feeds keyword 'scael', which Scaled.__init__ does not take \(it takes: scale, temperature\)"),
    (lambda: register_kd_loss("bad", needs={"features"}, flags=(MethodFlag("--bad-w", "w", float, 1.0),))(Shaped),
     r"feeds keyword 'w', which Shaped.__init__ or its from_shapes does not take"),
    (lambda: register_kd_loss("kd")(Scaled), r"kd loss 'kd' is registered twice"),
    (lambda: register_kd_loss("bad", flags=(MethodFlag("--temperature", "temperature", float, 2.0),))(Scaled),
     r"declares --temperature as float, default 2.0, but kd loss '\w+' declares it as float > 0, default 1.0"),
    (lambda: register_kd_loss("bad", flags=(MethodFlag("--temperature", "temperature", float, 1.0,
                                                       positive=True, help="other words"),))(Scaled),
     r"different help texts"),
    (lambda: register_kd_loss("bad", flags=(MethodFlag("--feat-dim", "scale", float, 128.0, positive=True),))(Scaled),
     r"declares --feat-dim as float > 0, default 128.0, but kd loss '\w+' declares it as int > 0, default 128"),
    (lambda: register_kd_loss("bad", flags=(SCALE, SCALE))(Scaled), r"declares --scratch-scale twice"),
    (lambda: register_kd_loss("bad", flags=(SCALE, MethodFlag("--bad-other", "scale")))(Scaled),
     r"two flags feed the keyword 'scale'"),
    (lambda: register_kd_loss("bad", needs={"features"})(Scaled), r"derive it from registry.FeatureKDLoss"),
    (lambda: register_kd_loss("bad", needs={"contrast"})(Scaled), r"needs must hold 'logits' or 'features'"),
    (lambda: register_kd_loss("bad", needs={"pixels", "logits"})(Scaled), r"needs must hold"),
    (lambda: register_kd_loss("bad", flags=(SCALE,), preact="--scratch-scale")(Scaled), r"its bool flags"),
    (lambda: register_kd_loss("none")(Scaled), r"other than 'none'"),
    (lambda: register_kd_loss("bad")(object), r"register an nn.Module class"),
    (lambda: MethodFlag("--Bad_name", "x"), r"--lower-case-words"),
    (lambda: MethodFlag("--bad-t", "x", float, 0.0, positive=True), r"default 0.0 must be > 0"),
    (lambda: MethodFlag("--bad-t", "x", bool, True), r"store_true switch"),
    (lambda: MethodFlag("--bad-t", "x", list, None), r"type must be int, float, str or bool"),
])
def test_bad_declarations_are_refused(declare, message, scratch_registry):
    before = dict(scratch_registry)
    with pytest.raises(MethodDeclarationError, match=message):
        declare()
    assert scratch_registry == before  # nothing half-registered


# ----------------------------------------------------------------------------------------------------------
# a new method is one file: a copy of the package, one file dropped in, trained with through train-kd.py
# ----------------------------------------------------------------------------------------------------------

MYKD = '''
"""A method added as one file: a scaled KL divergence, with its own flag."""
import os

import torch.nn.functional as F
from torch import nn

from .registry import MethodFlag, register_kd_loss


@register_kd_loss("mykd", needs={"logits"}, flags=(
    MethodFlag("--mykd-scale", "scale", float, 1.0, help="MyKD: weight of its KL term", positive=True),
))
class MyKD(nn.Module):
    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale
        if os.environ.get("MYKD_RECORD"):
            with open(os.environ["MYKD_RECORD"], "a") as f:
                f.write(f"{scale!r}\\n")

    def forward(self, z_s, z_t, **kwargs):
        return self.scale * F.kl_div(F.log_softmax(z_s.float(), 1), F.log_softmax(z_t.float(), 1),
                                     reduction="batchmean", log_target=True)
'''

BAD = '''
from torch import nn

from .registry import MethodFlag, register_kd_loss


@register_kd_loss("badkd", flags=(MethodFlag("--badkd-scale", "scael", float, 1.0),))
class BadKD(nn.Module):
    def __init__(self, scale: float = 1.0):
        super().__init__()

    def forward(self, z_s, z_t, **kwargs):
        return (z_s - z_t).float().mean()
'''


def package_copy(root: Path, **new_files: str) -> Path:
    """The repository's vanillakd/ under ``root``, plus ``losses/<name>.py`` files; nothing else changes."""
    shutil.copytree(REPO / "vanillakd", root / "vanillakd", ignore=shutil.ignore_patterns("__pycache__"))
    for name, text in new_files.items():
        (root / "vanillakd" / "losses" / f"{name}.py").write_text(textwrap.dedent(text))
    return root


def run_with(root: Path, argv: list, **env: str) -> subprocess.CompletedProcess:
    """The repository's ``train-kd.py`` importing the package copy under ``root``: PYTHONSAFEPATH keeps the
    script's folder (the repository) off sys.path, so PYTHONPATH's copy is the one found."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(root), PYTHONSAFEPATH="1", **env)
    return subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True, cwd=root, env=env,
                          timeout=600)


@pytest.mark.slow
def test_new_method_is_one_file(tmp_path, tiny_data, teacher_ckpt):
    root = package_copy(tmp_path / "pkg", mykd=MYKD)
    r = run_with(root, [REPO / "train-kd.py", "--help"])
    assert r.returncode == 0, r.stderr[-2000:]
    text = "".join(r.stdout.split())
    assert "--mykd-scale" in text and "MyKD:weightofitsKLterm" in text and "mykd" in text
    record = tmp_path / "record.txt"
    out = tmp_path / "out"
    r = run_with(root, [REPO / "train-kd.py", tiny_data, "--model", "test_resnet", "--teacher", "test_resnet",
                        "--teacher-pretrained", teacher_ckpt, "--kd-loss", "mykd", "--mykd-scale", "2",
                        "--epochs", "1", "--batch-size", "4", "--max-train-steps", "2", "--img-size", "32",
                        "--workers", "0", "--output", out, "--experiment", "mykd", "--no-progress"],
                 MYKD_RECORD=str(record))
    assert r.returncode == 0, r.stderr[-3000:]
    assert record.read_text().split() == ["2.0"]  # the copy was imported and the flag reached the method
    rows = list(csv.DictReader(open(out / "mykd" / "summary.csv")))
    assert len(rows) == 1 and math.isfinite(float(rows[0]["train_kd_loss"])) and float(rows[0]["train_kd_loss"]) > 0
    r = run_with(root, [REPO / "train-kd.py", tiny_data, "--kd-loss", "mykd", "--mykd-scale", "0"])
    assert r.returncode == 2 and "argument --mykd-scale: must be > 0, got 0" in r.stderr


def test_method_file_with_a_wrong_keyword_fails_at_import(tmp_path):
    root = package_copy(tmp_path / "pkg", badkd=BAD)
    r = run_with(root, ["-c", "import vanillakd.losses"])
    assert r.returncode != 0
    assert "MethodDeclarationError" in r.stderr
    assert ("kd loss 'badkd' (BadKD): flag --badkd-scale feeds keyword 'scael', which BadKD.__init__ does not take "
            "(it takes: scale)") in r.stderr


# ----------------------------------------------------------------------------------------------------------
# one short training run per method, through its script
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_short_training_run(name, tiny_data, teacher_ckpt, tmp_path, capfd):
    from vanillakd.cli import train_crd, train_fd, train_kd
    e = get_kd_loss_entry(name)
    entry = train_kd.cli if e.kind == "logits" else train_crd.cli if e.uses_contrast else train_fd.cli
    argv = [tiny_data, "--model", "test_resnet", "--teacher", "test_resnet", "--teacher-pretrained", teacher_ckpt,
            "--kd-loss", name, "--epochs", "1", "--batch-size", "4", "--max-train-steps", "2", "--img-size", "32",
            "--workers", "0", "--output", tmp_path, "--experiment", name, "--no-progress"]
    rc = run_cli(entry, argv)
    assert rc == 0, capfd.readouterr().err[-3000:]
    rows = list(csv.DictReader(open(tmp_path / name / "summary.csv")))
    assert len(rows) == 1
    assert math.isfinite(float(rows[0]["train_loss"])) and math.isfinite(float(rows[0]["train_kd_loss"]))
    assert (tmp_path / name / "last.pth.tar").is_file()
