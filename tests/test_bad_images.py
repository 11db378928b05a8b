"""Every image file a loader can meet (damaged, truncated, huge, odd modes) gets the same treatment on both data
pipelines: decoded to the same RGB pixels, or skipped with the same warning naming the file (the next file in
the list taking its place, so a batch keeps its size and a resumed run stays exact); never a traceback."""
from __future__ import annotations

import io
import logging
import shutil
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_image_folder, run_cli
from vanillakd.cli.run_config import run_config
from vanillakd.cli.train_args import build_train_parser
from vanillakd.data import device_pipeline
from vanillakd.data.device_pipeline import DeviceAugmentConfig, DeviceStreamDataset, decode_batch
from vanillakd.data.folder import build_split, drop_bad_images
from vanillakd.data.loader import build_train_loader, set_epoch
from vanillakd.errors import UserError

CONFIG = {"input_size": (3, 32, 32), "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
_Y, _X = np.mgrid[0:40, 0:48]
PIXELS = np.dstack([_X * 5, _Y * 6, (_X + _Y) * 3]).astype(np.uint8)  # smooth, so JPEG damage shows as damage


def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _jpeg(**kw) -> bytes:
    return _encoded(Image.fromarray(PIXELS), "JPEG", quality=90, **kw)


def _scan_start(data: bytes) -> int:
    """Where the entropy-coded data of the first scan starts (after the SOS marker segment)."""
    i = data.index(b"\xff\xda")
    return i + 2 + int.from_bytes(data[i + 2:i + 4], "big")


def _overwrite_mid_scan(data: bytes, new: bytes) -> bytes:
    """``new`` written over the middle of the entropy-coded data: the header stays valid, the scan passes."""
    mid = (_scan_start(data) + len(data)) // 2
    return data[:mid] + new + data[mid + len(new):]


def _huge_header(data: bytes, side: int) -> bytes:
    """A JPEG whose frame header says side x side pixels (PIL's size limit reads the header only)."""
    i = data.index(b"\xff\xc0")
    return data[:i + 5] + side.to_bytes(2, "big") + side.to_bytes(2, "big") + data[i + 9:]


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    return _encoded(Image.fromarray(PIXELS), "JPEG", exif=exif.tobytes())


RGB = Image.fromarray(PIXELS)
# timm lists .png, .jpg and .jpeg files only (both pipelines): other formats are met under those names
_RANDOM16 = np.random.default_rng(0).integers(0, 256, 16, dtype=np.uint8).tobytes()
# file name -> (bytes, what both pipelines do with it, whether the start-up scan flags it)
KINDS = {
    "rgb.jpg": (lambda: _jpeg(), "decoded", False),
    "progressive.jpg": (lambda: _jpeg(progressive=True), "decoded", False),
    "grey.jpg": (lambda: _encoded(RGB.convert("L"), "JPEG"), "decoded", False),
    "cmyk.jpg": (lambda: _encoded(RGB.convert("CMYK"), "JPEG"), "decoded", False),
    "exif_rotated.jpg": (_exif_rotated, "decoded", False),  # neither pipeline applies the orientation (timm's)
    "jpeg_named.png": (lambda: _jpeg(), "decoded", False),
    "png_named.jpg": (lambda: _encoded(RGB, "PNG"), "decoded", False),
    "rgb.png": (lambda: _encoded(RGB, "PNG"), "decoded", False),
    "rgba.png": (lambda: _encoded(RGB.convert("RGBA"), "PNG"), "decoded", False),
    "la.png": (lambda: _encoded(RGB.convert("LA"), "PNG"), "decoded", False),
    "palette_transparent.png": (lambda: _encoded(RGB.convert("P"), "PNG", transparency=0), "decoded", False),
    "i16.png": (lambda: _encoded(Image.fromarray(PIXELS[..., 0].astype(np.uint16) * 257), "PNG"), "decoded", False),
    "one_bit.png": (lambda: _encoded(RGB.convert("1"), "PNG"), "decoded", False),
    "float_tiff.png": (lambda: _encoded(Image.fromarray(PIXELS[..., 0].astype(np.float32)), "TIFF"), "decoded", False),
    "int32_tiff.png": (lambda: _encoded(Image.fromarray(PIXELS[..., 0].astype(np.int32)), "TIFF"), "decoded", False),
    "rgb_tiff.png": (lambda: _encoded(RGB, "TIFF"), "decoded", False),
    "palette_gif.png": (lambda: _encoded(RGB.convert("P"), "GIF"), "decoded", False),
    "rgb_webp.jpg": (lambda: _encoded(RGB, "WEBP"), "decoded", False),
    "rgb_bmp.png": (lambda: _encoded(RGB, "BMP"), "decoded", False),
    # damage that libjpeg only warns about: both decode the same (partly grey) pixels
    "damaged_scan_decodable.jpg": (lambda: _overwrite_mid_scan(_jpeg(), _RANDOM16), "decoded", False),
    "truncated_then_end_marker.jpg": (lambda: _jpeg()[:_scan_start(_jpeg()) + 20] + b"\xff\xd9", "decoded", False),
    "png_without_iend.png": (lambda: _encoded(RGB, "PNG")[:-20], "decoded", True),  # pixel data all there
    # damage only decoding finds (the scan reads headers): the reported failure
    "damaged_scan.jpg": (lambda: _overwrite_mid_scan(_jpeg(), b"\xff\xb4"), "skipped", False),
    "progressive_damaged_scan.jpg": (lambda: _overwrite_mid_scan(_jpeg(progressive=True), _RANDOM16), "skipped",
                                     False),
    "damaged.png": (lambda: (lambda d: d[:60] + bytes(20) + d[80:])(_encoded(RGB, "PNG")), "skipped", False),
    # what the scan flags (reached mid-run with --bad-images off)
    "truncated_after_sos.jpg": (lambda: _jpeg()[:_scan_start(_jpeg()) + 20], "skipped", True),
    "truncated_header.jpg": (lambda: _jpeg()[:_scan_start(_jpeg()) - 10], "skipped", True),
    "text.jpg": (lambda: b"this is not an image\n", "skipped", True),
    "empty.jpg": (lambda: b"", "skipped", True),
    "html.png": (lambda: b"<html>404 not found</html>", "skipped", True),
    "decompression_bomb.jpg": (lambda: _huge_header(_jpeg(), 20000), "skipped", True),  # over PIL's limit x 2
}


def _flags(pipeline: str, *extra: str):
    return run_config(build_train_parser("t", "").parse_args(
        ["x", "--img-size", "32", "--workers", "0", "--data-pipeline", pipeline, *extra]))


def _folder(root: Path, name: str, data: bytes) -> Path:
    """a/0.jpg, a/1_<name> (the file under test), b/0.png, b/1.jpg: a skipped file's place goes to b/0.png."""
    for rel in ("a/0.jpg", "b/0.png", "b/1.jpg"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        RGB.save(root / rel)
    (root / "a" / f"1_{name}").write_bytes(data)
    return root


@pytest.fixture
def skipped_files():
    """The files named in 'skipped image ...' warnings while the test runs."""
    names: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            text = record.getMessage()
            if text.startswith("skipped image "):
                names.append(text[len("skipped image "):].split(": ", 1)[0])

    logger = logging.getLogger("vanillakd")
    handler, level = Collect(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield names
    logger.removeHandler(handler)
    logger.setLevel(level)


def _first_batch(root: Path, pipeline: str, *flags: str, epoch: int = 0, start: int = 0):
    split = build_split(root, is_training=True)
    loader = build_train_loader(split.dataset, CONFIG, _flags(pipeline, *flags), len(split.classes),
                                torch.device("cpu"))
    set_epoch(loader, epoch, start)
    return next(iter(loader))


@pytest.mark.parametrize("name", sorted(KINDS))
def test_both_pipelines_treat_each_file_kind_alike(name, tmp_path, skipped_files):
    write, outcome, _ = KINDS[name]
    root = _folder(tmp_path, name, write())
    bad = str(root / "a" / f"1_{name}")
    seen = {}
    for pipeline in ("cpu", "gpu"):
        skipped_files.clear()
        x, y = _first_batch(root, pipeline, "-b", "4")
        assert x.shape == (4, 3, 32, 32) and torch.isfinite(x).all()  # a skipped file's place is filled
        seen[pipeline] = (list(skipped_files), sorted(y.tolist()))
    assert seen["cpu"] == seen["gpu"]
    skipped, labels = seen["gpu"]
    if outcome == "skipped":
        assert skipped == [bad] and labels == [0, 1, 1, 1]  # b/0.png took its place, with its label
    else:
        assert skipped == [] and labels == [0, 0, 1, 1]


@pytest.mark.parametrize("name", sorted(n for n, (_, outcome, _) in KINDS.items() if outcome == "decoded"))
def test_decoded_pixels_are_the_cpu_pipelines(name, tmp_path):
    """The device pipeline's image before augmentation is PIL's convert('RGB') of the file, as timm's."""
    path = tmp_path / "c" / name
    path.parent.mkdir()
    path.write_bytes(KINDS[name][0]())
    split = build_split(tmp_path, is_training=True)
    view = DeviceStreamDataset(split.dataset, DeviceAugmentConfig.from_aug(_flags("gpu").aug, CONFIG), seed=0)
    payload = view[(0, 0, 0)][0]
    (image,), failed = decode_batch([payload], torch.device("cpu"))
    expected = torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1)
    assert not failed and image.shape == expected.shape
    # PIL's pixels travel as they are; a JPEG decoded by torchvision (libjpeg-turbo, as PIL) may differ by a step
    tolerance = 0 if payload[0] == "pixels" else 2
    assert (image.int() - expected.int()).abs().max() <= tolerance


@pytest.mark.parametrize("name", sorted(KINDS))
def test_start_up_scan_flags_or_passes_without_traceback(name, tmp_path, skipped_files):
    _, _, flagged = KINDS[name]
    root = _folder(tmp_path, name, KINDS[name][0]())
    split = build_split(root, is_training=True)
    if not flagged:
        drop_bad_images(split, "fail")
        return
    with pytest.raises(UserError, match=f"1 bad image file.*1_{name}"):
        drop_bad_images(split, "fail")
    drop_bad_images(split, "skip")
    assert len(split.dataset.reader.samples) == 3


def _twin_folders(tmp_path: Path, bad: bytes) -> tuple[Path, Path]:
    """The same folder twice, a/1_x.jpg holding ``bad`` in the first and a copy of the file after it (same
    class) in the second."""
    one = make_image_folder(tmp_path / "one", classes=("a", "b"), per_class=(6, 1), size=40) / "train"
    (one / "a" / "1_x.jpg").write_bytes(bad)
    two = tmp_path / "two"
    shutil.copytree(one, two)
    paths = [p for p, _ in build_split(one, is_training=True).dataset.reader.samples]
    following = Path(paths[paths.index(str(one / "a" / "1_x.jpg")) + 1])
    assert following.parent.name == "a"
    shutil.copy(following, two / "a" / "1_x.jpg")
    return one, two


@pytest.mark.parametrize("pipeline", ["cpu", "gpu"])
@pytest.mark.parametrize("bad", ["damaged_scan.jpg", "progressive_damaged_scan.jpg", "text.jpg"])
def test_a_skipped_file_is_the_next_one_exactly_and_replays(pipeline, bad, tmp_path, skipped_files):
    """A skipped file's place holds exactly what a copy of the next file there would give (its pixels, label and
    the place's own draws), and a resumed epoch replays its batches."""
    one, two = _twin_folders(tmp_path, KINDS[bad][0]())
    flags = ("-b", "4", "--aa", "rand-m9-mstd0.5-inc1", "--mixup", "0.8", "--cutmix", "1.0", "--reprob", "0.5")
    for epoch in (0, 1):
        for start in (0, 1):
            a = _first_batch(one, pipeline, *flags, epoch=epoch, start=start)
            b = _first_batch(two, pipeline, *flags, epoch=epoch, start=start)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert skipped_files and set(skipped_files) == {str(one / "a" / "1_x.jpg")}


@pytest.mark.parametrize("pipeline", ["cpu", "gpu"])
@pytest.mark.parametrize("bad", ["damaged_scan.jpg", "text.jpg"])
def test_many_bad_files_in_a_row_stop_in_one_line(pipeline, bad, tmp_path, skipped_files):
    root = tmp_path / "d"
    (root / "a").mkdir(parents=True)
    for i in range(10):
        (root / "a" / f"{i:02d}.jpg").write_bytes(KINDS[bad][0]())
    for i in (10, 11):
        RGB.save(root / "a" / f"{i:02d}.jpg")
    with pytest.raises(UserError, match="10 image files in a row cannot be decoded, the last .*09.jpg") as e:
        _first_batch(root, pipeline, "-b", "12")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["rgb.jpg", "rgb.png"])
def test_pil_size_limit_warns_then_refuses_on_both_pipelines(name, tmp_path, monkeypatch, skipped_files):
    """The file under test has 40 x 48 = 1920 pixels, the others 64: PIL warns over Image.MAX_IMAGE_PIXELS and
    refuses over twice that, on both pipelines (the device one checks JPEG headers itself)."""
    root = _folder(tmp_path, name, KINDS[name][0]())
    for other in ("a/0.jpg", "b/0.png", "b/1.jpg"):
        Image.fromarray(PIXELS[:8, :8]).save(root / other)
    for limit, refused in ((1000, False), (900, True)):
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        for pipeline in ("cpu", "gpu"):
            skipped_files.clear()
            with pytest.warns(Image.DecompressionBombWarning) if not refused else nullcontext():
                _first_batch(root, pipeline, "-b", "4")
            assert skipped_files == ([str(root / "a" / f"1_{name}")] if refused else []), (limit, pipeline)


def test_jpegs_the_device_decoder_rejects_get_pils_pixels(tmp_path, monkeypatch):
    """JPEGs the device decoder (nvjpeg, then torchvision on the CPU) rejects but PIL reads are PIL's pixels, as
    in the CPU pipeline."""
    def rejects(data, device):
        raise RuntimeError("decode_jpeg: unsupported")

    monkeypatch.setattr(device_pipeline, "_decode_jpegs", rejects)
    root = _folder(tmp_path, "rgb.jpg", _jpeg())
    view = DeviceStreamDataset(build_split(root, True).dataset,
                               DeviceAugmentConfig.from_aug(_flags("gpu").aug, CONFIG), seed=0)
    payloads = [view[(0, i, i)][0] for i in range(4)]
    images, failed = decode_batch(payloads, torch.device("cpu"))
    assert not failed and [p[0] for p in payloads] == ["jpeg", "jpeg", "pixels", "jpeg"]
    for (path, _), image in zip(view.samples, images):
        assert torch.equal(image, torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1))


@pytest.mark.parametrize("pipeline", ["cpu", "gpu"])
def test_training_skips_a_damaged_jpeg_the_scan_passes(pipeline, teacher_ckpt, tmp_path):
    from vanillakd.cli import train_kd
    data = make_image_folder(tmp_path / "d", per_class=(4, 2), size=32)
    bad = data / "train" / "dog" / "9_damaged.jpg"
    bad.write_bytes(KINDS["progressive_damaged_scan.jpg"][0]())
    argv = [data, "--model", "test_resnet", "--teacher", "test_resnet", "--teacher-pretrained", teacher_ckpt,
            "--epochs", "1", "-b", "4", "--img-size", "32", "--workers", "1", "--data-pipeline", pipeline,
            "--output", tmp_path, "--experiment", "r", "--no-progress"]
    assert run_cli(train_kd.cli, argv) == 0
    assert f"skipped image {bad}: broken data stream" in (tmp_path / "r" / "log.txt").read_text()


def test_an_input_mode_other_than_rgb_is_refused_by_the_device_pipeline(tmp_path):
    """The CPU pipeline converts every file to the model's image mode ('L' for one channel); the device pipeline
    decodes to RGB, so it refuses in one line rather than hand the model three channels."""
    root = _folder(tmp_path, "rgb.jpg", _jpeg())
    split = build_split(root, is_training=True, input_img_mode="L")
    x, _ = next(iter(build_train_loader(split.dataset, {**CONFIG, "input_size": (1, 32, 32)},
                                        _flags("cpu", "-b", "4"), 2, torch.device("cpu"))))
    assert x.shape == (4, 1, 32, 32)
    with pytest.raises(UserError, match="image mode L .*use --data-pipeline cpu"):
        build_train_loader(split.dataset, CONFIG, _flags("gpu", "-b", "4"), 2, torch.device("cpu"))


@pytest.mark.parametrize("tail", [b"\0" * 500, b"ftyp mp4 video after the image " * 40])
def test_data_after_the_end_marker_is_not_truncation(tmp_path, tail):
    """A phone's motion photo appends a video to the JPEG, other writers long padding: PIL decodes both, so
    the scan must pass them; a file cut inside its scan still fails."""
    import io

    import numpy as np
    from PIL import Image

    from vanillakd.data.check import image_problem
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, "JPEG")
    good, cut = tmp_path / "good.jpg", tmp_path / "cut.jpg"
    good.write_bytes(buf.getvalue() + tail)
    cut.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2] + tail.replace(b"\xff\xd9", b""))
    assert image_problem(str(good)) is None
    Image.open(good).convert("RGB")  # PIL agrees
    assert image_problem(str(cut)) == "truncated JPEG (no end-of-image marker)"
