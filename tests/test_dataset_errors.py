"""Each dataset problem stops the run with one line naming it (exit code 2)."""
from __future__ import annotations

import sys

import pytest

from conftest import run_cli
from dataset_files import trust_cifar_files, write_cifar, write_hf_disk, write_shards
from vanillakd.cli import train_kd, validate
from vanillakd.errors import UserError


def refusal(capsys, argv, entry=train_kd.cli):
    assert run_cli(entry, [str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1]


def base(data, *extra):
    return [data, "--model", "test_resnet", "--teacher", "test_resnet", "--kd-loss", "none", "--epochs", "1",
            "-b", "4", "--img-size", "32", "--workers", "0", "--no-progress", "--output", "/nonexistent-out", *extra]


def test_unknown_dataset_name(tmp_path, capsys):
    line = refusal(capsys, base(tmp_path, "--dataset", "imagenet22k"))
    assert "unknown --dataset 'imagenet22k'" in line and "torch/NAME" in line
    assert "not supported" in refusal(capsys, base(tmp_path, "--dataset", "tfds/imagenet2012"))
    assert "Unknown torchvision dataset nope" in refusal(capsys, base(tmp_path, "--dataset", "torch/nope"))


def test_missing_optional_package(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "webdataset", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "datasets", None)
    assert "needs the webdataset package: pip install 'vanillakd[wds]'" in refusal(
        capsys, base(tmp_path, "--dataset", "wds/tiny"))
    assert "needs the Hugging Face datasets package" in refusal(capsys, base(tmp_path, "--dataset", "hfds/x"))


def test_missing_files_and_splits(tmp_path, capsys, monkeypatch):
    line = refusal(capsys, base(tmp_path, "--dataset", "torch/cifar10"))
    assert "torch/cifar10" in line and "not found" in line and "--dataset-download" in line
    md5s = write_cifar(tmp_path / "c", "cifar10")
    trust_cifar_files(monkeypatch, md5s)
    assert "split 'holdout' missing" in refusal(capsys, base(tmp_path / "c", "--dataset", "torch/cifar10",
                                                           "--val-split", "holdout"))
    pytest.importorskip("datasets")
    write_hf_disk(tmp_path / "hf", val_name="test")  # 'validation' falls back to 'test'; other names do not
    line = refusal(capsys, base(tmp_path / "hf", "--dataset", "hfds/", "--val-split", "dev"))
    assert "split 'dev' missing" in line and "['test', 'train']" in line
    # a hub name with HF_HUB_OFFLINE set (conftest): one line, no wait on the network
    assert "Couldn't reach 'someorg/somedata'" in refusal(capsys, base(tmp_path, "--dataset", "hfds/someorg/somedata"))


def test_shards_without_info_json(tmp_path, capsys):
    pytest.importorskip("webdataset")
    write_shards(tmp_path / "s", info=False)
    line = refusal(capsys, base(tmp_path / "s", "--dataset", "wds/tiny"))
    assert "_info.json" in line and "shard names and sizes" in line
    write_shards(tmp_path / "i")
    assert "split 'dev' missing" in refusal(capsys, base(tmp_path / "i", "--dataset", "wds/tiny", "--val-split", "dev"))


def test_class_map_that_does_not_match(tmp_path, capsys, monkeypatch):
    from conftest import make_image_folder
    cmap = tmp_path / "map.txt"
    cmap.write_text("cat\ndog\nwolf\n")
    md5s = write_cifar(tmp_path / "c", "cifar100")
    trust_cifar_files(monkeypatch, md5s, "cifar100")
    line = refusal(capsys, base(tmp_path / "c", "--dataset", "torch/cifar100", "--class-map", cmap))
    assert "--class-map" in line and "does not match" in line and "fox" in line and "wolf" in line
    folder = make_image_folder(tmp_path / "f", per_class=(2, 1), size=16)
    line = refusal(capsys, base(folder, "--class-map", cmap))
    assert "does not match the data" in line and "wolf" in line
    line = refusal(capsys, [folder, "--model", "test_resnet", "--pretrained", "--class-map", cmap], validate.cli)
    assert "does not match the data" in line


def test_crd_fraction_and_gpu_pipeline_refused_for_shards(tmp_path, capsys):
    pytest.importorskip("webdataset")
    write_shards(tmp_path / "s")
    line = refusal(capsys, base(tmp_path / "s", "--dataset", "wds/tiny", "--train-fraction", "0.5"))
    assert "--train-fraction" in line and "streamed" in line
    line = refusal(capsys, base(tmp_path / "s", "--dataset", "wds/tiny", "--data-pipeline", "gpu"))
    assert "--data-pipeline cpu" in line


def test_bad_sample_in_a_shard_read_by_a_worker(tmp_path, capsys):
    pytest.importorskip("webdataset")
    import tarfile
    root = write_shards(tmp_path / "s", shards=2, per_shard=4)
    shard = root / "tiny-train-000001.tar"
    with tarfile.open(shard, "a") as tar:  # a fifth sample whose image is not an image
        for name, data in (("bad.png", b"not a png"), ("bad.cls", b"0")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, __import__("io").BytesIO(data))
    info = __import__("json").loads((root / "_info.json").read_text())
    info["splits"]["train"]["shard_lengths"] = [4, 5]
    (root / "_info.json").write_text(__import__("json").dumps(info))
    line = refusal(capsys, base(root, "--dataset", "wds/tiny", "--workers", "1", "-b", "3", "--epochs", "2",
                                "--output", tmp_path / "o"))
    assert "tiny-train-000001.tar: sample 'bad'" in line and "bad image" in line and "Traceback" not in line


def test_input_img_mode_reaches_every_kind(tmp_path, monkeypatch):
    from conftest import make_image_folder
    from vanillakd.data.sources import build_train_val_any
    folder = make_image_folder(tmp_path / "f", per_class=(2, 1), size=16)
    md5s = write_cifar(tmp_path / "c", "cifar10")
    trust_cifar_files(monkeypatch, md5s)
    for data, name in ((folder, ""), (tmp_path / "c", "torch/cifar10")):
        train, _, _ = build_train_val_any(str(data), name, input_img_mode="L")
        assert train.dataset[0][0].mode == "L", name


def test_class_map_with_a_name_listed_twice_is_one_line(tmp_path):
    from vanillakd.data.folder import read_class_map
    (tmp_path / "map.txt").write_text("fox\ndog\ncat\ncat\n")
    with pytest.raises(UserError, match=r"indices are not 0..2, one per class"):
        read_class_map(str(tmp_path / "map.txt"))


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_epoch_repeats_must_be_finite_and_not_negative(value):
    from vanillakd.data.repeats import check_epoch_repeats
    with pytest.raises(UserError, match="--epoch-repeats must be >= 0"):
        check_epoch_repeats(float(value), 0)


def test_dataset_download_creates_its_folder(tmp_path, monkeypatch):
    """--dataset-download into a folder that does not exist yet: the folder is made, then the download runs
    (here refused offline by a stand-in, which shows it was reached)."""
    import timm.data

    from vanillakd.data.sources import build_train_val_any

    def offline(*a, **k):
        raise RuntimeError("no network")
    monkeypatch.setattr(timm.data, "create_dataset", offline)
    target = tmp_path / "new" / "cifar"
    with pytest.raises(UserError, match="no network"):
        build_train_val_any(str(target), "torch/cifar10", download=True)
    assert target.is_dir()
