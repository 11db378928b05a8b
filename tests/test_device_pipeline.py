"""--data-pipeline gpu on the CPU device: file handling, batch outputs, mixup / cutmix draws, replay, training."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_dataset

from vanillakd.cli.run_config import run_config, run_train_argv
from vanillakd.cli.train_args import build_train_parser
from vanillakd.data.device_pipeline import DeviceAugmentConfig, DeviceStreamDataset, jpeg_header
from vanillakd.data.loader import build_train_loader, set_epoch
from vanillakd.errors import UserError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CONFIG = {"input_size": (3, 32, 32), "mean": MEAN, "std": STD}


def _args(*flags: str):
    return run_config(build_train_parser("t", "").parse_args(["x", "--img-size", "32", "--workers", "0",
                                                              "--data-pipeline", "gpu", *flags]))


def _mixed_folder(root: Path) -> Path:
    """One class of each file kind: RGB JPEG, progressive JPEG, grayscale JPEG, CMYK JPEG, PNG (RGBA)."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    files = {
        "a_rgb/0.jpg": lambda p: Image.fromarray(rgb).save(p, quality=90),
        "b_prog/0.jpg": lambda p: Image.fromarray(rgb).save(p, quality=90, progressive=True),
        "c_gray/0.jpg": lambda p: Image.fromarray(rgb[..., 0]).save(p, quality=90),
        "d_cmyk/0.jpg": lambda p: Image.fromarray(rgb).convert("CMYK").save(p, quality=90),
        "e_png/0.png": lambda p: Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(p),
    }
    for name, write in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
    return root


def _loader(root: Path, *flags: str, classes: int | None = None):
    ds = create_dataset("", root=str(root), is_training=True)
    n = classes or len({t for _, t in ds.reader.samples})
    return build_train_loader(ds, CONFIG, _args(*flags), n, torch.device("cpu")), ds


def test_jpeg_header_reads_kind_size_and_components(tmp_path):
    root = _mixed_folder(tmp_path)
    assert jpeg_header((root / "a_rgb/0.jpg").read_bytes()) == (0xC0, 48, 64, 3)
    assert jpeg_header((root / "b_prog/0.jpg").read_bytes()) == (0xC2, 48, 64, 3)
    assert jpeg_header((root / "c_gray/0.jpg").read_bytes())[3] == 1
    assert jpeg_header((root / "d_cmyk/0.jpg").read_bytes())[3] == 4
    assert jpeg_header((root / "e_png/0.png").read_bytes()) is None
    assert jpeg_header(b"\xff\xd8\xff") is None  # truncated


def test_worker_sends_jpeg_bytes_and_decodes_other_files(tmp_path):
    root = _mixed_folder(tmp_path)
    ds = create_dataset("", root=str(root), is_training=True)
    view = DeviceStreamDataset(ds, DeviceAugmentConfig.from_aug(_args().aug, CONFIG), seed=0)
    kinds = {}
    for i, (path, _) in enumerate(ds.reader.samples):
        payload, target, params, key = view[(0, i, i)]
        kinds[Path(path).parent.name] = payload[0]
        if payload[0] == "pixels":
            assert payload[1].dtype == torch.uint8 and payload[1].shape == (3, 48, 64)
        assert key == (0, i) and target == ds.reader.samples[i][1]
        assert 0 <= params.crop.top and params.crop.top + params.crop.height <= 48
    assert kinds == {"a_rgb": "jpeg", "b_prog": "jpeg", "c_gray": "pixels", "d_cmyk": "pixels", "e_png": "pixels"}


def test_batch_shape_dtype_labels_and_normalisation(tmp_path):
    root = tmp_path / "flat"
    for c, value in enumerate((30, 200)):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((40, 50, 3), value, np.uint8)).save(root / f"c{c}" / f"{i}.png")
    loader, _ = _loader(root, "-b", "8", "--no-aug")
    set_epoch(loader, 0)
    x, y = next(iter(loader))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    for img, label in zip(x, y):
        value = (30, 200)[int(label)]
        expected = torch.tensor([(value / 255 - m) / s for m, s in zip(MEAN, STD)])
        assert torch.allclose(img.mean(dim=(1, 2)), expected, atol=1e-4)
        assert img.std(dim=(1, 2)).max() < 1e-4  # a flat image stays flat


def test_mixed_file_kinds_train_through_the_pipeline(tmp_path):
    root = _mixed_folder(tmp_path)
    loader, _ = _loader(root, "-b", "5", "--aa", "rand-m9-mstd0.5-inc1", "--reprob", "0.5")
    set_epoch(loader, 0)
    x, y = next(iter(loader))  # one batch holds all five files
    assert x.shape == (5, 3, 32, 32) and torch.isfinite(x).all()
    assert sorted(y.tolist()) == [0, 1, 2, 3, 4]
    with pytest.raises(UserError, match="--batch-size must be even"):
        _loader(root, "-b", "5", "--mixup", "0.8")


def _ks_beta(samples: np.ndarray, alpha: float) -> float:
    """Kolmogorov-Smirnov statistic of samples against Beta(alpha, alpha), CDF by numerical integration."""
    grid = np.linspace(0, 1, 20001)[1:-1]
    pdf = grid ** (alpha - 1) * (1 - grid) ** (alpha - 1)
    cdf = np.concatenate([[0], np.cumsum((pdf[1:] + pdf[:-1]) / 2)])
    cdf /= cdf[-1]
    s = np.sort(samples)
    model = np.interp(s, grid, cdf)
    n = len(s)
    return float(max(np.max(np.arange(1, n + 1) / n - model), np.max(model - np.arange(n) / n)))


def _two_image_folder(root: Path) -> Path:
    for c, value in enumerate((0, 255)):
        (root / f"c{c}").mkdir(parents=True)
        Image.fromarray(np.full((32, 32, 3), value, np.uint8)).save(root / f"c{c}" / "0.png")
    return root


def _lambdas(loader, batches: int) -> np.ndarray:
    """The label weight of the first sample's own class in each batch: the batch's lambda."""
    from vanillakd.data.stream import BATCH_KEY
    lams = []
    inner = loader.loader
    batch = next(iter(inner))
    for k in range(batches):
        payloads, targets, params, extras = batch
        extras = dict(extras)
        extras[BATCH_KEY] = torch.tensor([k, 0])
        _, y = loader._to_device((payloads, targets, params, extras))[:2]
        lams.append(float(y[0, targets[0]]))
    return np.array(lams)


def test_mixup_lambda_follows_its_beta_distribution(tmp_path):
    loader, _ = _loader(_two_image_folder(tmp_path), "-b", "2", "--no-aug", "--mixup", "0.8")
    lams = _lambdas(loader, 3000)
    # timm's batch mixup draws lam ~ Beta(0.8, 0.8); KS critical value at alpha = 0.001 is 1.95 / sqrt(n)
    assert _ks_beta(lams, 0.8) < 1.95 / math.sqrt(len(lams))
    assert _ks_beta(lams, 2.0) > 1.95 / math.sqrt(len(lams))  # the test can tell a wrong alpha


def test_cutmix_lambda_is_the_pasted_area(tmp_path):
    loader, _ = _loader(_two_image_folder(tmp_path), "-b", "2", "--no-aug", "--cutmix", "1.0")
    from vanillakd.data.stream import BATCH_KEY
    payloads, targets, params, extras = next(iter(loader.loader))
    lows = []
    for k in range(200):
        ex = dict(extras)
        ex[BATCH_KEY] = torch.tensor([k, 0])
        x, y = loader._to_device((payloads, targets, params, ex))[:2]
        own = 0 if int(targets[0]) == 0 else 255
        raw = x[0] * torch.tensor(STD).view(3, 1, 1) * 255 + torch.tensor(MEAN).view(3, 1, 1) * 255
        kept = float(((raw - own).abs() < 1).all(0).float().mean())
        assert abs(kept - float(y[0, targets[0]])) < 1e-6  # the label weight is the area kept
        lows.append(kept)
    # lam ~ Beta(1, 1) before area correction: the kept area covers the range
    assert min(lows) < 0.2 and max(lows) > 0.8


def test_stream_replays_whatever_the_worker_count(tmp_path):
    root = _mixed_folder(tmp_path)
    flags = ("-b", "4", "--aa", "rand-m9-mstd0.5", "--mixup", "0.8", "--cutmix", "1.0", "--reprob", "0.5",
             "--mixup-mode", "elem")
    a, _ = _loader(root, *flags)
    ds = create_dataset("", root=str(root), is_training=True)
    b = build_train_loader(ds, CONFIG, run_config(build_train_parser("t", "").parse_args(
        ["x", "--img-size", "32", "--workers", "2", "--data-pipeline", "gpu", *flags])), 5, torch.device("cpu"))
    out = []
    for loader in (a, b):
        set_epoch(loader, 1)
        out.append(next(iter(loader)))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
    set_epoch(a, 2)
    assert not torch.equal(next(iter(a))[0], out[0][0])


def test_unsupported_policy_is_refused_in_one_line():
    with pytest.raises(UserError, match="--data-pipeline gpu supports RandAugment"):
        DeviceAugmentConfig.from_aug(_args("--aa", "original").aug, CONFIG)
    with pytest.raises(UserError, match="--train-interpolation"):
        DeviceAugmentConfig.from_aug(_args("--train-interpolation", "lanczos").aug, CONFIG)


def test_colour_jitter_without_policy_follows_timm(tmp_path):
    assert DeviceAugmentConfig.from_aug(_args().aug, CONFIG).color_jitter == 0.4
    cfg = DeviceAugmentConfig.from_aug(_args("--aa", "rand-m7-mstd0.5").aug, CONFIG)
    assert cfg.color_jitter is None and cfg.rand_augment is not None


def test_train_kd_with_the_device_pipeline(tiny_data, teacher_ckpt, tmp_path):
    res = run_train_argv([str(tiny_data), "--model", "test_resnet", "--teacher", "test_resnet",
                          "--teacher-pretrained", str(teacher_ckpt), "--img-size", "32", "-b", "4", "--epochs", "1",
                          "--workers", "1", "--data-pipeline", "gpu", "--aa", "rand-m9-mstd0.5-inc1", "--mixup",
                          "0.8", "--cutmix", "1.0", "--output", str(tmp_path), "--experiment", "gpu", "--no-progress"])
    last = res[0]["last"]
    assert math.isfinite(last["train_loss"]) and 0 <= last["eval_top1"] <= 100


def test_train_on_fashion_mnist_with_the_device_pipeline(fashion_mnist, tmp_path):
    res = run_train_argv([str(fashion_mnist), "--model", "test_resnet", "--kd-loss", "none", "--input-size", "3",
                          "32", "32", "--mean", "0.5", "0.5", "0.5", "--std", "0.5", "0.5", "0.5", "--train-fraction",
                          "0.01", "-b", "32", "--epochs", "1", "--max-train-steps", "10", "--workers", "1", "--lr",
                          "3e-3", "--opt", "adamw", "--data-pipeline", "gpu", "--aa", "rand-m7-mstd0.5-inc1",
                          "--output", str(tmp_path), "--experiment", "fm", "--no-progress", "--bad-images", "off",
                          "--val-split", "val", "-vb", "500"])
    assert res[0]["last"]["eval_top1"] > 10  # above chance after ten steps on real images


def test_teacher_cache_replays_the_device_pipeline(tiny_data, teacher_ckpt, tmp_path):
    """A cache written through the device pipeline trains exactly like the live teacher on it, and a run on the
    CPU pipeline refuses it."""
    from vanillakd.cli import cache_teacher, train_kd
    from vanillakd.errors import run_cli
    argv = [str(tiny_data), "--model", "test_resnet", "--teacher", "test_resnet", "--teacher-pretrained",
            str(teacher_ckpt), "--img-size", "32", "-b", "4", "--epochs", "2", "--warmup-epochs", "0", "--workers",
            "2", "--data-pipeline", "gpu", "--aa", "rand-m9-mstd0.5-inc1", "--mixup", "0.8", "--cutmix", "1.0",
            "--reprob", "0.25", "--seed", "5", "--opt", "adamw", "--lr", "1e-3", "--no-progress",
            "--output", str(tmp_path)]
    assert cache_teacher.main(argv + ["--cache-dir", str(tmp_path / "cache"), "--cache-topk", "0"]) == 0
    run_train_argv(argv + ["--experiment", "live"])
    run_train_argv(argv + ["--experiment", "cached", "--teacher-cache", str(tmp_path / "cache")])
    live = torch.load(tmp_path / "live" / "last.pth.tar", weights_only=True)["state_dict"]
    cached = torch.load(tmp_path / "cached" / "last.pth.tar", weights_only=True)["state_dict"]
    assert all(torch.allclose(live[k].float(), cached[k].float(), atol=1e-5) for k in live)
    cpu = [a if a != "gpu" else "cpu" for a in argv]
    assert run_cli(train_kd.main, cpu + ["--teacher-cache", str(tmp_path / "cache")]) == 2
