"""Teacher-output cache (vanillakd cache-teacher, train-kd.py --teacher-cache): exactness, top-k error, refusals,
fingerprints, continuation, and the storage format."""
from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import save_teacher
from vanillakd.cli import cache_teacher, train_fd, train_kd
from vanillakd.errors import run_cli
from vanillakd.losses.kd import KLDiv
from vanillakd.teachers import cache as tc

STRONG_AUG = ["--mixup", "0.8", "--cutmix", "1.0", "--aa", "rand-m9-mstd0.5", "--reprob", "0.25", "--workers", "2",
              "--seed", "3", "--opt", "adamw", "--lr", "1e-3"]
LIGHT_AUG = ["--mixup", "0.8", "--cutmix", "1.0", "--workers", "0", "--seed", "3", "--opt", "adamw", "--lr", "1e-3"]


def flags(data, teacher, out, extra=STRONG_AUG, model=("test_resnet",)) -> list[str]:
    return [str(data), "--model", *model, "--teacher", "test_resnet", "--teacher-pretrained", str(teacher),
            "--img-size", "32", "-b", "4", "--epochs", "2", "--warmup-epochs", "0", "--no-progress",
            "--output", str(out), *extra]


def with_flag(argv: list[str], flag: str, value: str) -> list[str]:
    """argv with ``flag``'s value replaced (or the flag appended)."""
    argv = list(argv)
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    return argv


def write_cache(argv: list[str], cache: Path, topk: int = 0) -> dict:
    assert cache_teacher.main(argv + ["--cache-dir", str(cache), "--cache-topk", str(topk)]) == 0
    return json.loads((cache / "manifest.json").read_text())


def train(argv: list[str], name: str, cache: Path | None = None, entry=train_kd.main) -> int:
    return run_cli(entry, argv + ["--experiment", name] + (["--teacher-cache", str(cache)] if cache else []))


def summary(run: Path) -> list[dict]:
    return list(csv.DictReader((run / "summary.csv").read_text().splitlines()))


def last(run: Path) -> dict:
    return torch.load(run / "last.pth.tar", weights_only=True)


def refusal(capsys, entry, argv) -> str:
    """The one error line of a refused run (exit code 2)."""
    capsys.readouterr()
    rc = run_cli(entry, [str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1, err[-2000:]
    assert err.rstrip("\n").splitlines()[-1] == lines[0]  # nothing (no traceback) after it
    return lines[0]


@pytest.fixture(scope="module")
def full_cache(tiny_data, teacher_ckpt, tmp_path_factory) -> tuple[list[str], Path]:
    """(the training flags, a full-precision cache of their 2-epoch stream)."""
    root = tmp_path_factory.mktemp("full_cache")
    argv = flags(tiny_data, teacher_ckpt, root / "runs")
    manifest = write_cache(argv, root / "cache")
    assert manifest["epochs_done"] == [0, 1] and manifest["storage"]["topk"] == 0
    return argv, root / "cache"


# ---------------------------------------------------------------- exactness of a full cache


def _assert_tensors_close(a, b, what: str, tol: float = 1e-5):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape, what
        assert (a.double() - b.double()).abs().max().item() <= tol if a.numel() else True, what
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), what
        for k in a:
            _assert_tensors_close(a[k], b[k], f"{what}.{k}", tol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_tensors_close(x, y, f"{what}[{i}]", tol)
    elif isinstance(a, float):
        assert b == pytest.approx(a, abs=tol), what
    else:
        assert a == b, what


def test_full_cache_trains_like_the_live_teacher(full_cache, tmp_path):
    argv, cache = full_cache
    argv = with_flag(argv, "--output", str(tmp_path))
    assert train(argv, "live") == 0
    assert train(argv, "cached", cache) == 0
    live, cached = last(tmp_path / "live"), last(tmp_path / "cached")
    assert live["epoch"] == cached["epoch"] == 1
    _assert_tensors_close(live["state_dict"], cached["state_dict"], "state_dict")
    _assert_tensors_close(live["optimizer"], cached["optimizer"], "optimizer")
    rows_live, rows_cached = summary(tmp_path / "live"), summary(tmp_path / "cached")
    assert len(rows_live) == len(rows_cached) == 2
    for a, b in zip(rows_live, rows_cached):
        for col in ("train_loss", "train_base_loss", "train_kd_loss", "eval_loss", "eval_top1", "eval_agreement"):
            assert float(b[col]) == pytest.approx(float(a[col]), abs=1e-5), col
        assert float(a["train_kd_loss"]) > 0
    # the agreement comes from the teacher's val predictions stored in the cache
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["val"]["images"] == 12 and (cache / "val_top1.npy").is_file()


def test_two_students_reuse_one_cache(full_cache, tiny_data, teacher_ckpt, tmp_path):
    _, cache = full_cache
    argv = flags(tiny_data, teacher_ckpt, tmp_path, model=("test_resnet", "test_resnet")) + ["--kd-loss", "kd", "dkd"]
    assert train(argv, "live") == 0
    assert train(argv, "cached", cache) == 0
    for sub in ("student0-test_resnet-kd", "student1-test_resnet-dkd"):
        a, b = last(tmp_path / "live" / sub), last(tmp_path / "cached" / sub)
        _assert_tensors_close(a["state_dict"], b["state_dict"], f"{sub} state_dict")
        for ra, rb in zip(summary(tmp_path / "live" / sub), summary(tmp_path / "cached" / sub)):
            assert float(rb["train_kd_loss"]) == pytest.approx(float(ra["train_kd_loss"]), abs=1e-5), sub


# ---------------------------------------------------------------- top-k storage: its error and its bound


def _roundtrip(z: torch.Tensor, k: int, dtype: str = "float16") -> torch.Tensor:
    storage = tc.Storage(topk=k, dtype=dtype, num_classes=z.shape[1], batch_size=z.shape[0], steps=1)
    enc = {name: torch.from_numpy(v) for name, v in tc.encode(z, storage).items()}
    return tc.decode(enc, z.shape[1])


def _kd_grad(z_s: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
    """Gradient of the SUM over samples of KL(softmax(z_t) || softmax(z_s)) with respect to z_s."""
    z_s = z_s.clone().requires_grad_(True)
    (KLDiv(temperature=1.0)(z_s, z_t) * z_s.shape[0]).backward()  # KLDiv takes the batch mean
    return z_s.grad


def _reference_bound(z: torch.Tensor, z2: torch.Tensor, k: int, t: float = 1.0) -> torch.Tensor:
    """Per-sample bound on ||softmax(z2 / t) - softmax(z / t)||_1 for top-k float16 storage, t >= 1, derived here
    independently of topk_bound: the k stored logits are exact up to float16 rounding of log p_i (relative
    2^-11), the tail keeps (at t = 1) its mean probability, so by the power-mean inequality the tail mass at t
    can only grow: L1 <= 2 max(tail_t(p), tail_t(p')) + 2 sum_topk p_t,i (exp(2^-11 |log p_i| / t) - 1), plus
    float32 rounding of the reconstructed logits log p_i + lse (a few ulp of |lse|)."""
    z, z2 = z.double(), z2.double()
    logp = torch.log_softmax(z, 1)
    top, idx = logp.topk(k, dim=1)
    p_t, q_t = torch.softmax(z / t, 1), torch.softmax(z2 / t, 1)
    tail = torch.maximum(1 - p_t.gather(1, idx).sum(1), 1 - q_t.gather(1, idx).sum(1)).clamp_min(0)
    fp16 = (p_t.gather(1, idx) * torch.expm1(top.abs() * 2.0 ** -11 / t)).sum(1)
    return 2 * tail + 2 * fp16 + 2.0 ** -21 * (torch.logsumexp(z, 1).abs() / t + 1)


SHAPES = [(c, k) for c in (10, 100) for k in (1, 3, 5)]


def _logits(c: int, k: int, scale: float, n: int = 1024) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * c + 10 * k + int(scale))
    return torch.randn(n, c, generator=g) * scale


@pytest.mark.parametrize("c,k", SHAPES)
@pytest.mark.parametrize("scale", [1, 5, 20])
def test_topk_kd_gradient_error_within_a_derived_bound(c, k, scale):
    """The KD gradient from decoded top-k logits differs from the live one by at most the derived bound, at
    T = 1 (gradient of the KD loss) and T = 4 (the probabilities)."""
    z = _logits(c, k, scale)
    z2 = _roundtrip(z, k)
    z_s = torch.randn(z.shape, generator=torch.Generator().manual_seed(7))
    err = (_kd_grad(z_s, z) - _kd_grad(z_s, z2)).abs().sum(1)
    assert torch.isfinite(err).all() and err.max() > 0
    assert (err.double() <= _reference_bound(z, z2, k)).all()
    err4 = (torch.softmax(z2 / 4, 1) - torch.softmax(z / 4, 1)).abs().sum(1)
    assert (err4.double() <= _reference_bound(z, z2, k, 4.0)).all()


@pytest.mark.parametrize("c,k", SHAPES)
@pytest.mark.parametrize("scale", [1, 5, 20])
def test_topk_kd_gradient_error_within_topk_bound(c, k, scale):
    """Per sample, ||grad(live) - grad(cached)||_1 <= teacher_cache.topk_bound (the bound the module documents)."""
    z = _logits(c, k, scale)
    z_s = torch.randn(z.shape, generator=torch.Generator().manual_seed(7))
    err = (_kd_grad(z_s, z) - _kd_grad(z_s, _roundtrip(z, k))).abs().sum(1)
    bound = tc.topk_bound(z, k)
    assert (err <= bound).all(), f"{int((err > bound).sum())} samples, worst err / bound {(err / bound).max():.2f}"


def test_topk_bound_counts_the_float16_error_twice():
    """Two equally likely classes and a negligible tail: both stored log p round the same way, and the tail
    takes up their rounding error again, so the L1 error is twice the float16 term."""
    z = torch.tensor([[0.0, 0.0, -20.0]])
    err = (torch.softmax(_roundtrip(z, 2), 1) - torch.softmax(z, 1)).abs().sum(1)
    assert (err <= tc.topk_bound(z, 2)).all(), (err, tc.topk_bound(z, 2))


@pytest.mark.parametrize("c,k", SHAPES)
def test_topk_bound_is_tight_for_peaked_logits(c, k):
    z = _logits(c, k, 20)
    err = (torch.softmax(_roundtrip(z, k), 1) - torch.softmax(z, 1)).abs().sum(1)
    assert tc.topk_bound(z, k).max() <= 10 * err.max()


def test_decode_full_is_exact_and_topk_keeps_the_top_logits():
    z = torch.randn(64, 10) * 8 + 3
    full = tc.Storage(topk=0, dtype="float32", num_classes=10, batch_size=64, steps=1)
    enc = {n: torch.from_numpy(v) for n, v in tc.encode(z, full).items()}
    assert set(enc) == {"logits"} and torch.equal(tc.decode(enc, 10), z)
    assert torch.equal(_roundtrip(z, 10, "float32"), z)  # k >= C: stored in full
    for k in (1, 3, 5):
        z2 = _roundtrip(z, k)
        assert z2.dtype == torch.float32 and z2.shape == z.shape
        logp = torch.log_softmax(z, 1)
        top, idx = logp.topk(k, dim=1)
        lse = torch.logsumexp(z, 1, keepdim=True)
        # each kept logit: float16 rounding of log p (half an ulp, relative 2^-11) plus float32 rounding of + lse
        tol = top.abs() * 2.0 ** -11 + 4 * 2.0 ** -24 * (lse.abs() + top.abs() + 1)
        assert ((z2.gather(1, idx) - z.gather(1, idx)).abs() <= tol).all(), k
        assert torch.allclose(torch.softmax(z2, 1).sum(1), torch.ones(64), atol=1e-6)
        # the tail keeps its mass at T = 1: exp(z2 - lse) sums to one before normalising
        assert torch.allclose((z2 - lse).exp().sum(1), torch.ones(64), atol=1e-3)


def test_topk_cache_trains_and_records_its_error(tiny_data, teacher_ckpt, tmp_path, monkeypatch):
    argv = flags(tiny_data, teacher_ckpt, tmp_path, LIGHT_AUG) + ["--temperature", "4"]
    seen: dict[int, list[torch.Tensor]] = {}
    add = tc.EpochWriter.add

    def spy(self, step, logits, fingerprint):
        seen.setdefault(int(self.final.name[5:9]), []).append(logits.detach().float().clone())
        return add(self, step, logits, fingerprint)

    monkeypatch.setattr(tc.EpochWriter, "add", spy)
    manifest = write_cache(argv, tmp_path / "cache", topk=2)
    monkeypatch.undo()
    assert manifest["storage"] == {"topk": 2, "dtype": "float16", "bytes_per_sample": 24}
    assert set(manifest["error"]) == {"0", "1"} and sorted(seen) == [0, 1]
    for epoch, logits in seen.items():
        z = torch.cat(logits)
        assert z.shape == (24, 3)
        z2 = _roundtrip(z, 2)
        entry = manifest["error"][str(epoch)]
        assert set(entry) == {"l1_T1", "l1_T4"}
        for key, t, bound in (("l1_T1", 1.0, tc.topk_bound(z, 2)), ("l1_T4", 4.0, _reference_bound(z, z2, 2, 4.0))):
            stat = entry[key]
            assert 0 <= stat["mean"] <= stat["max"], key
            assert stat["max"] <= bound.max().item(), (key, stat, bound.max())
            # the recorded numbers are the reconstruction error of these very logits
            err = (torch.softmax(z2 / t, 1) - torch.softmax(z / t, 1)).abs().sum(1)
            assert stat["max"] == pytest.approx(err.max().item(), rel=1e-4, abs=1e-7), key
            assert stat["mean"] == pytest.approx(err.mean().item(), rel=1e-4, abs=1e-7), key
    assert train(argv, "cached", tmp_path / "cache") == 0
    rows = summary(tmp_path / "cached")
    assert len(rows) == 2
    for row in rows:
        for col in ("train_loss", "train_base_loss", "train_kd_loss", "eval_loss"):
            assert math.isfinite(float(row[col])), col
        assert float(row["train_kd_loss"]) > 0


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("flag,value,expected", [
    ("--seed", "4", "seed: cache 3, run 4"),
    ("-b", "2", "batch_size: cache 4, run 2"),
    ("--aa", "rand-m7-mstd0.5", 'aa: cache "rand-m9-mstd0.5", run "rand-m7-mstd0.5"'),
    ("--epochs", "3", "epoch 2 missing"),
    ("--teacher", "test_vit", "teacher: cache test_resnet, run test_vit"),
    ("--teacher-resize", "48", "teacher resize: cache None, run 48"),
    ("--data-pipeline", "gpu", 'data_pipeline: cache "cpu", run "gpu"'),
])
def test_train_refuses_a_cache_of_another_stream(full_cache, tmp_path, capsys, flag, value, expected):
    argv, cache = full_cache
    argv = with_flag(with_flag(argv, "--output", str(tmp_path)), flag, value)
    line = refusal(capsys, train_kd.main, argv + ["--experiment", "r", "--teacher-cache", cache])
    assert "--teacher-cache" in line and expected in line, line


def test_train_refuses_other_teacher_weights(full_cache, tmp_path, capsys):
    argv, cache = full_cache
    other = save_teacher(tmp_path / "other.pth", seed=1)
    argv = with_flag(with_flag(argv, "--output", str(tmp_path)), "--teacher-pretrained", str(other))
    line = refusal(capsys, train_kd.main, argv + ["--experiment", "r", "--teacher-cache", cache])
    assert "--teacher-pretrained is not the file the cache was written with" in line, line


def test_train_refuses_a_folder_that_is_not_a_cache(full_cache, tmp_path, capsys):
    argv, _ = full_cache
    (tmp_path / "nocache").mkdir()
    (tmp_path / "nocache" / "notes.txt").write_text("x")
    argv = with_flag(argv, "--output", str(tmp_path))
    line = refusal(capsys, train_kd.main, argv + ["--experiment", "r", "--teacher-cache", tmp_path / "nocache"])
    assert "has no manifest.json" in line and "not a teacher cache" in line, line
    line = refusal(capsys, train_kd.main, argv + ["--experiment", "r", "--teacher-cache", tmp_path / "missing"])
    assert "does not exist" in line, line


def test_feature_methods_refuse_a_cache(full_cache, tmp_path, capsys):
    argv, cache = full_cache
    argv = with_flag(argv, "--output", str(tmp_path))
    line = refusal(capsys, train_fd.main, argv + ["--kd-loss", "rkd", "--experiment", "r", "--teacher-cache", cache])
    assert "feature methods" in line and "run the teacher live" in line, line
    assert not (tmp_path / "r").exists()


def test_cache_teacher_refusals(full_cache, tmp_path, capsys):
    argv, cache = full_cache
    argv = with_flag(argv, "--output", str(tmp_path))
    line = refusal(capsys, cache_teacher.main, argv + ["--kd-loss", "none", "--cache-dir", tmp_path / "c1"])
    assert "--kd-loss none" in line and "nothing to cache" in line, line
    assert not (tmp_path / "c1").exists()
    line = refusal(capsys, cache_teacher.main, argv + ["--kd-loss", "crd", "--cache-dir", tmp_path / "c2"])
    assert "--kd-loss crd needs the teacher's features" in line, line
    assert not (tmp_path / "c2").exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "data.txt").write_text("keep me")
    line = refusal(capsys, cache_teacher.main, argv + ["--cache-dir", tmp_path / "busy"])
    assert "is not empty and holds no teacher cache" in line, line
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["data.txt"]
    before = (cache / "manifest.json").read_bytes()
    line = refusal(capsys, cache_teacher.main, with_flag(argv, "--seed", "4") + ["--cache-dir", cache,
                                                                                "--cache-topk", "0"])
    assert "holds a cache of another stream or teacher" in line and "seed: cache 3, run 4" in line, line
    assert (cache / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in cache.iterdir()) == ["epoch0000-rank0", "epoch0001-rank0", "manifest.json",
                                                      "val_top1.npy"]
    # a second writer of the same cache (e.g. the command started twice) is refused while the first holds it
    import fcntl
    fd = os.open(cache, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        line = refusal(capsys, cache_teacher.main, argv + ["--cache-dir", cache, "--cache-topk", "0"])
        assert "another `vanillakd cache-teacher` is writing this cache" in line, line
    finally:
        os.close(fd)
    assert (cache / "manifest.json").read_bytes() == before


# ---------------------------------------------------------------- fingerprints


def test_changed_image_is_caught_by_the_fingerprint(tiny_data, teacher_ckpt, tmp_path, capsys):
    data = Path(shutil.copytree(tiny_data, tmp_path / "data"))
    argv = flags(data, teacher_ckpt, tmp_path, LIGHT_AUG + ["--log-interval", "1"])
    write_cache(argv, tmp_path / "cache")
    image = data / "train" / "dog" / "0.jpg"
    pixels = np.asarray(Image.open(image).convert("RGB"))
    Image.fromarray(255 - pixels).save(image)  # same name, other pixels
    # where the stream first differs: the fingerprints of a cache of the changed data
    write_cache(argv, tmp_path / "changed")
    first = None
    for epoch in (0, 1):
        a = np.load(tc.epoch_dir(tmp_path / "cache", epoch, 0) / "fingerprint.npy")
        b = np.load(tc.epoch_dir(tmp_path / "changed", epoch, 0) / "fingerprint.npy")
        steps = np.flatnonzero(np.abs(a - b).max(axis=(1, 2)) > tc.FINGERPRINT_TOL)
        if first is None and len(steps):
            first = (epoch, int(steps[0]))
    assert first is not None
    line = refusal(capsys, train_kd.main, argv + ["--experiment", "fp", "--teacher-cache", tmp_path / "cache"])
    assert f"epoch {first[0]} step {first[1]} " in line and "not the one the cache was written for" in line, line
    # the unchanged cache of the changed data is accepted
    capsys.readouterr()
    assert train(argv, "ok", tmp_path / "changed") == 0


# ---------------------------------------------------------------- continuing, atomicity, sizes


def _files(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir())}


def test_cache_continues_and_replaces_a_partial_epoch(tiny_data, teacher_ckpt, tmp_path):
    argv = flags(tiny_data, teacher_ckpt, tmp_path, LIGHT_AUG)
    cache = tmp_path / "cache"
    manifest = write_cache(with_flag(argv, "--epochs", "1"), cache, topk=2)
    assert manifest["epochs_done"] == [0] and set(manifest["error"]) == {"0"}
    epoch0 = _files(cache / "epoch0000-rank0")
    assert set(epoch0) == {"values.npy", "indices.npy", "lse.npy", "tail.npy", "fingerprint.npy"}
    partial = cache / "epoch0001-rank0.partial"
    partial.mkdir()
    (partial / "values.npy").write_bytes(b"half written")
    manifest = write_cache(argv, cache, topk=2)
    assert manifest["epochs_done"] == [0, 1] and set(manifest["error"]) == {"0", "1"}
    assert _files(cache / "epoch0000-rank0") == epoch0
    assert sorted(p.name for p in cache.iterdir()) == ["epoch0000-rank0", "epoch0001-rank0", "manifest.json",
                                                      "val_top1.npy"]
    assert set(_files(cache / "epoch0001-rank0")) == set(epoch0)
    # the sizes the manifest and disk_bytes announce are the payloads on disk
    storage = tc.Storage(topk=2, dtype="float16", num_classes=3, batch_size=4, steps=6)
    assert manifest["storage"]["bytes_per_sample"] == storage.bytes_per_sample() == 8 + 4 + 4 + 4 + 4
    payload = 0
    for epoch in (0, 1):
        for path in tc.epoch_dir(cache, epoch, 0).glob("*.npy"):
            arr = np.load(path, mmap_mode="r")
            assert path.stat().st_size - arr.offset == arr.nbytes and arr.offset <= 256, path
            assert arr.shape[:2] == (6, 4), path
            payload += arr.nbytes
    assert payload == tc.disk_bytes(24, 2, storage)
    indices = np.load(cache / "epoch0001-rank0" / "indices.npy")
    assert indices.dtype == np.int16 and indices.min() >= 0 and indices.max() <= 2


def test_full_storage_sizes():
    storage = tc.Storage(topk=0, dtype="float32", num_classes=1000, batch_size=8, steps=3)
    assert storage.full and set(storage.arrays()) == {"fingerprint", "logits"}
    assert storage.bytes_per_sample() == 8 + 4000
    wide = tc.Storage(topk=5, dtype="float16", num_classes=40000, batch_size=8, steps=3)
    assert wide.arrays()["indices"][1] == np.int32 and wide.bytes_per_sample() == 8 + 10 + 20 + 4 + 4


# ---------------------------------------------------------------- staging


def test_staging_on_cpu_copies(tmp_path):
    mm = np.lib.format.open_memmap(tmp_path / "a.npy", mode="w+", dtype=np.float16, shape=(3, 4, 5))
    mm[:] = np.arange(60, dtype=np.float16).reshape(3, 4, 5)
    staging = tc._Staging(torch.device("cpu"))  # what CachedTeacher copies rows with
    row = mm[1]
    out = staging.to_device("values", row)
    staging.next_step()
    assert out.dtype == torch.float16 and out.shape == (4, 5)
    assert torch.equal(out, torch.from_numpy(np.array(row)))
    assert not np.shares_memory(out.numpy(), mm)
    mm[1] = -1
    assert out[0, 0].item() == 20.0  # the returned tensor keeps the values it was given


def test_cached_teacher_serves_decoded_rows_on_cpu(tmp_path):
    z = torch.randn(4, 3) * 3
    x, target = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    storage = tc.Storage(topk=0, dtype="float32", num_classes=3, batch_size=4, steps=2)
    writer = tc.EpochWriter(tmp_path, 0, 0, storage)
    for step in range(2):
        writer.add(step, z + step, tc.input_fingerprint(x, target))
    writer.commit()
    manifest = {"stream": {"num_classes": 3}, "storage": {"topk": 0, "dtype": "float32"}, "teacher": {"name": "t"}}
    teacher = tc.CachedTeacher(tmp_path, manifest, 0, torch.device("cpu"))
    assert torch.equal(teacher.batch_output(x, target, 0, 1), z + 1)
    teacher.check()
    teacher.batch_output(x + 1, target, 0, 0)  # another input: caught at the next check
    with pytest.raises(tc.UserError, match=re.escape("epoch 0 step 0 is not the one the cache was written for")):
        teacher.check()
