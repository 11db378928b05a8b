"""``--dataset``: CIFAR-10/100 (torchvision's files), a saved Hugging Face dataset and WebDataset shards, each
through train-kd, a mid-epoch resume, the teacher cache, train-crd and validate; the shard stream's layout."""
from __future__ import annotations

import csv
import shutil

import pytest
import torch

from conftest import run_cli, save_teacher
from dataset_files import trust_cifar_files, write_cifar, write_hf_disk, write_shards
from vanillakd.cli import cache_teacher, train_crd, train_kd, validate

KINDS = ["torch/cifar10", "torch/cifar100", "hfds", "wds"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return save_teacher(tmp_path_factory.mktemp("dst") / "t.pth", "test_resnet", num_classes=3)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Every kind's files, written once: {kind: (DIR, --dataset value, extra flags, cifar md5s)}."""
    root = tmp_path_factory.mktemp("dsfiles")
    return {
        "torch/cifar10": lambda: (root / "c10", "torch/cifar10", [], write_cifar(root / "c10", "cifar10")),
        "torch/cifar100": lambda: (root / "c100", "torch/cifar100", [], write_cifar(root / "c100", "cifar100")),
        "hfds": lambda: (write_hf_disk(root / "hf"), "hfds/", [], None),
        # two workers: two lanes per process, so a resume at an odd step exercises the lane rotation
        "wds": lambda: (write_shards(root / "wds", shards=4, per_shard=6), "wds/tiny", ["--workers", "2"], None),
    }


_written: dict = {}


@pytest.fixture
def dataset(request, files, monkeypatch):
    """One kind's files (written on first use); skipped when its optional package is missing."""
    package = {"hfds": "datasets", "wds": "webdataset"}.get(request.param)
    if package:
        pytest.importorskip(package)
    key = (id(files), request.param)
    if key not in _written:
        _written[key] = files[request.param]()
    data, name, extra, md5s = _written[key]
    if md5s is not None:
        trust_cifar_files(monkeypatch, md5s, request.param.split("/")[1])
    return data, name, extra


def argv(data, name, teacher, out, exp, *extra):
    return [data, "--dataset", name, "--model", "test_resnet", "--teacher", "test_resnet", "--teacher-pretrained",
            teacher, "--epochs", "2", "-b", "4", "--img-size", "32", "--workers", "0", "--output", out,
            "--experiment", exp, "--no-progress", "--opt", "adamw", "--lr", "1e-3", "--seed", "3", "--aa",
            "rand-m7-mstd0.5", "--mixup", "0.2", "--cutmix", "1.0", "--recovery-interval", "3", "--nce-k", "6",
            *extra]


def rows(path):
    return [{k: v for k, v in r.items() if k != "train_time"} for r in csv.DictReader(open(path))]


def same_weights(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dataset", KINDS, indirect=True)
def test_train_resume_cache_validate(dataset, teacher, tmp_path, capsys):
    data, name, extra = dataset
    assert run_cli(train_kd.cli, argv(data, name, teacher, tmp_path, "full", *extra)) == 0
    full = tmp_path / "full"
    recovery = torch.load(full / "recovery.pth.tar", weights_only=True)
    assert recovery["epoch"] == 1 and recovery["step"] == 3  # mid-epoch: 3 of 6 steps done
    # the folder of a run killed right after that recovery point: resuming it must end where the full run did
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    shutil.copy(full / "recovery.pth.tar", stopped / "recovery.pth.tar")
    shutil.copy(full / "checkpoint-0.pth.tar", stopped / "last.pth.tar")
    (stopped / "summary.csv").write_text("".join(open(full / "summary.csv").readlines()[:2]))
    assert run_cli(train_kd.cli, argv(data, name, teacher, tmp_path, "stopped", *extra, "--resume", "auto")) == 0
    assert "continuing at epoch 1, step 3" in capsys.readouterr().err
    a = torch.load(full / "last.pth.tar", weights_only=True)
    b = torch.load(stopped / "last.pth.tar", weights_only=True)
    assert same_weights(a["state_dict"], b["state_dict"])
    assert rows(full / "summary.csv") == rows(stopped / "summary.csv")

    cache = tmp_path / "cache"
    assert cache_teacher.main([str(x) for x in argv(data, name, teacher, tmp_path, "c", *extra)]
                              + ["--cache-dir", str(cache), "--cache-topk", "0"]) == 0
    manifest = (cache / "manifest.json").read_text()
    assert f'"dataset": "{name}"' in manifest and '"train_split": "train"' in manifest
    assert run_cli(train_kd.cli, argv(data, name, teacher, tmp_path, "cached", *extra, "--teacher-cache", cache)) == 0
    c = torch.load(tmp_path / "cached" / "last.pth.tar", weights_only=True)
    # the cache holds full float32 logits of the same stream: the same training to float rounding
    assert all(torch.allclose(a["state_dict"][k].float(), c["state_dict"][k].float(), atol=1e-4)
               for k in a["state_dict"])
    assert rows(tmp_path / "cached" / "summary.csv")[-1]["eval_agreement"] != ""
    if name.startswith("wds"):  # the shard stream's order depends on the worker count: the cache says so
        capsys.readouterr()
        assert run_cli(train_kd.cli, argv(data, name, teacher, tmp_path, "w1", "--workers", "1", "--teacher-cache",
                                          cache)) == 2
        assert "workers: cache 2, run 1" in capsys.readouterr().err

    r = run_cli(validate.cli, [data, "--dataset", name, "--model", "test_resnet", "--checkpoint",
                               full / "last.pth.tar", "--img-size", "32", "-b", "4", "--workers", "0",
                               "--teacher", "test_resnet", "--teacher-pretrained", teacher, "--results-file",
                               tmp_path / "v.json", "--no-progress"])
    assert r == 0
    result = __import__("json").loads((tmp_path / "v.json").read_text())
    assert result["images"] == 9 and 0 <= result["agreement"] <= 100
    assert float(rows(full / "summary.csv")[-1]["eval_top1"]) == pytest.approx(result["top1"], abs=1e-3)


@pytest.mark.parametrize("dataset", ["torch/cifar100", "hfds", "wds"], indirect=True)
def test_train_crd(dataset, teacher, tmp_path, capsys):
    data, name, extra = dataset
    rc = run_cli(train_crd.cli, argv(data, name, teacher, tmp_path, "crd", *extra, "--kd-loss", "crd",
                                     "--epochs", "1"))
    if name.startswith("wds"):
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert rc == 2 and "CRD's contrast sampling needs the label of every training sample" in err
        assert "streamed" in err
        return
    assert rc == 0
    assert torch.load(tmp_path / "crd" / "last.pth.tar", weights_only=True)["kd_state"]


@pytest.mark.parametrize("dataset", ["hfds"], indirect=True)
def test_train_fraction_and_class_map(dataset, teacher, tmp_path, capsys):
    data, name, _ = dataset
    cmap = tmp_path / "map.txt"
    cmap.write_text("fox\ndog\ncat\n")
    assert run_cli(train_kd.cli, argv(data, name, teacher, tmp_path, "f", "--epochs", "1", "--train-fraction", "0.5",
                                      "--class-map", cmap)) == 0
    assert "data: 12 train / 9 val images, 3 classes" in capsys.readouterr().err  # 4 of 8 per class
    ckpt = torch.load(tmp_path / "f" / "last.pth.tar", weights_only=True)
    assert ckpt["classes"] == ["fox", "dog", "cat"]


@pytest.mark.parametrize("dataset", ["torch/cifar10"], indirect=True)
def test_compare_and_report_take_the_dataset_flags(dataset, teacher, tmp_path, capsys):
    from vanillakd.cli import compare, report
    data, name, _ = dataset
    out = tmp_path / "cmp"
    assert compare.main([str(data), "--dataset", name, "--model", "test_resnet", "--methods", "none", "kd",
                         "--teacher", "test_resnet", "--teacher-pretrained", str(teacher), "--seeds", "0",
                         "--output", str(out), "--", "--epochs", "1", "-b", "4", "--img-size", "32", "--workers",
                         "0", "--no-progress"]) == 0
    result = list(csv.DictReader(open(out / "results.csv")))
    assert [r["dataset"] for r in result] == [name, name] and result[0]["train_images"] == "24"
    assert report.main([str(out / "cells"), "--out", str(tmp_path / "r"), "--dataset", name]) == 0
    assert len(list(csv.DictReader(open(tmp_path / "r" / "results.csv")))) == 2
    from vanillakd.errors import UserError
    with pytest.raises(UserError, match="none of the 2 runs was trained with"):
        report.main([str(out / "cells"), "--out", str(tmp_path / "r2"), "--dataset", "folder"])


@pytest.mark.parametrize("dataset", ["wds"], indirect=True)
def test_train_fd_over_shards(dataset, teacher, tmp_path):
    from vanillakd.cli import train_fd
    data, name, extra = dataset
    assert run_cli(train_fd.cli, argv(data, name, teacher, tmp_path, "fd", *extra, "--kd-loss", "rkd",
                                      "--epochs", "1")) == 0
    assert torch.load(tmp_path / "fd" / "last.pth.tar", weights_only=True)["num_updates"] == 6


def test_hf_saved_dataset_forms(tmp_path):
    """hfds/ with DIR the saved folder, or hfds/PATH; a missing 'validation' split falls back to 'test'."""
    pytest.importorskip("datasets")
    from vanillakd.data.sources import build_train_val_any
    path = write_hf_disk(tmp_path / "hf", n_train=6, n_val=3, val_name="test")
    for data, name in ((path, "hfds/"), (tmp_path, f"hfds/{path}")):
        train, val, n = build_train_val_any(str(data), name)
        assert (len(train.dataset), len(val.dataset), n) == (6, 3, 3) and train.identity() != val.identity()
        assert train.dataset.labels().tolist() == [0, 1, 2, 0, 1, 2]
