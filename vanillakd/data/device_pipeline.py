"""``--data-pipeline gpu``: loader workers only read JPEG bytes and draw each sample's augmentation parameters;
decoding (nvjpeg through torchvision, batched), random-resized-crop, flips, RandAugment / colour jitter, mixup /
cutmix, normalisation and random erasing run on the training device, batched.

Why: on a GPU node the CPU loader, mostly JPEG decoding and PIL augmentation, caps KD training well below what
the GPU step can take. The same code runs with ``--device cpu`` (decoding on the CPU), which is how CI tests it.

Randomness: every parameter is drawn in the worker from a generator seeded with (seed, rank, epoch, position)
and the batch mixup from (seed, rank, epoch, first position), so the stream is replayable exactly as the CPU
pipeline's is (mid-epoch resume, teacher cache), whatever the worker count. The distribution is timm's
(device_augment.py reproduces its transforms); the pixels are not bit-identical to PIL's.

Files that are not 3-component JPEGs (PNG, grayscale or CMYK JPEG, ...), or that lack the end-of-image marker,
are decoded by PIL in the worker and travel as uint8 pixels; a batch the device decoder rejects is decoded image
by image on the CPU, and a JPEG torchvision rejects there is decoded by PIL. So PIL has the last word on every
file, as in the CPU pipeline: a file it cannot decode either is skipped with the same warning, the next file in
the list taking its place with the sample's own draws (folder.skip_unreadable), in the worker or, for a JPEG
found bad on the device, in the main process.
"""
from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass, fields

import numpy as np
import torch

from ..config import AugConfig
from ..errors import UserError
from . import device_augment as aug
from .folder import UNREADABLE, open_image, skip_unreadable, warn_skipped
from .prefetch import ExtrasPrefetchLoader
from .stream import BATCH_KEY, mix_seed, seeded

# SOF markers (baseline, extended, progressive; Huffman coded) a JPEG decoder on the device handles
_DEVICE_SOF = {0xC0, 0xC1, 0xC2}
_ALL_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_header(data: bytes) -> tuple[int, int, int, int] | None:
    """(SOF marker, height, width, components) of a JPEG, or None when ``data`` is not a readable JPEG."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        length = struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker in _ALL_SOF:
            if i + 10 > n:
                return None
            h, w = struct.unpack(">HH", data[i + 5:i + 9])
            return marker, h, w, data[i + 9]
        i += 2 + length
    return None


@dataclass
class DeviceAugmentConfig:
    """What the device pipeline does, resolved from the training flags (timm's train-transform rules)."""
    size: tuple[int, int]
    scale: tuple[float, float]
    ratio: tuple[float, float]
    hflip: float
    vflip: float
    interpolation: str
    no_aug: bool
    rand_augment: aug.RandAugmentConfig | None
    color_jitter: float | tuple | None

    @classmethod
    def from_aug(cls, augment: AugConfig, data_config: dict) -> DeviceAugmentConfig:
        size = tuple(data_config["input_size"][-2:])
        ra, jitter = None, None
        if not augment.no_aug:
            if augment.aa:
                if not str(augment.aa).startswith("rand"):
                    raise UserError(f"--data-pipeline gpu supports RandAugment (--aa rand-...), not --aa "
                                    f"{augment.aa}; use --data-pipeline cpu for other policies")
                try:
                    # timm fixes the geometric ops' filter to --train-interpolation unless that is 'random'
                    ra = aug.RandAugmentConfig.from_timm(augment.aa, min(size), tuple(data_config["mean"]),
                                                         interpolation=augment.train_interpolation)
                except ValueError as e:
                    raise UserError(f"--aa {augment.aa}: {e}") from None
            elif augment.color_jitter:
                jitter = augment.color_jitter  # timm: colour jitter only without an auto-augment policy
        interpolation = augment.train_interpolation
        if interpolation not in ("random", "bilinear", "bicubic"):
            raise UserError(f"--data-pipeline gpu: --train-interpolation {interpolation} is not supported "
                            "(random, bilinear or bicubic)")
        return cls(size, tuple(augment.scale), tuple(augment.ratio), augment.hflip, augment.vflip, interpolation,
                   augment.no_aug, ra, jitter)


class DeviceStreamDataset(torch.utils.data.Dataset):
    """Worker side: ``(payload, target, params, key)`` per stream key ``(epoch, position, index)``.

    ``payload`` is ``('jpeg', bytes tensor, index)`` for files the device decodes, else ``('pixels', uint8 CHW,
    index)``; ``index``: the sample read, ``index`` or the one that took the place of an unreadable file."""

    def __init__(self, dataset, config: DeviceAugmentConfig, seed: int, rank: int = 0):
        mode = getattr(dataset, "input_img_mode", "") or "RGB"
        if mode != "RGB":  # the CPU pipeline would hand the model mode-converted images: another channel count
            raise UserError(f"--data-pipeline gpu decodes images to RGB, and the model's input takes image mode "
                            f"{mode} (--in-chans / --input-size / --input-img-mode); use --data-pipeline cpu")
        self.config, self.seed, self.rank = config, seed, rank
        self.samples = dataset.reader.samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        epoch, position, index = key
        (payload, (h, w)), target, index = skip_unreadable(self.samples, index, read_payload)
        return (*payload, index), int(target), self.params(epoch, position, h, w), (epoch, position)

    def params(self, epoch: int, position: int, h: int, w: int) -> SampleParams:
        gen = torch.Generator().manual_seed(mix_seed(self.seed, self.rank, epoch, position))
        return sample_params(self.config, h, w, gen)

    def replacement(self, epoch: int, position: int, index: int, error: BaseException,
                    device: torch.device) -> tuple[torch.Tensor, int, SampleParams]:
        """(image on ``device``, target, params) of the sample that takes the place of file ``index`` when the
        device cannot decode it (``error``: PIL's): the next decodable file, drawn as the CPU pipeline draws it."""
        nxt = (index + 1) % len(self.samples)
        warn_skipped(self.samples[index][0], error, self.samples[nxt][0])
        image, target, _ = skip_unreadable(self.samples, nxt, lambda path: _decode_file(path, device), skipped=1)
        return image, int(target), self.params(epoch, position, *image.shape[1:])


def read_payload(path: str) -> tuple[tuple[str, torch.Tensor], tuple[int, int]]:
    """``(payload, (height, width))`` of a file: its bytes when the device can decode it, else PIL's pixels.

    Raises what PIL raises for a file it cannot decode (folder.UNREADABLE)."""
    with open(path, "rb") as f:
        data = f.read()
    header = jpeg_header(data)
    # without its end-of-image marker a JPEG is truncated: PIL decides, as for the CPU pipeline, whatever a
    # device decoder would make of it
    if header is not None and header[0] in _DEVICE_SOF and header[3] == 3 and _has_end_marker(data):
        h, w = header[1], header[2]
        _check_size(h, w)
        return ("jpeg", torch.frombuffer(bytearray(data), dtype=torch.uint8)), (h, w)
    pixels = _pil_pixels(io.BytesIO(data))
    return ("pixels", pixels), tuple(pixels.shape[1:])


def _has_end_marker(data: bytes) -> bool:
    """As check.py's scan: padding may follow the marker; otherwise the file goes through PIL."""
    return b"\xff\xd9" in data[-64:].rstrip(b"\x00")


def _check_size(h: int, w: int) -> None:
    """PIL's decompression-bomb rule for a JPEG it does not open here: a warning over Image.MAX_IMAGE_PIXELS,
    an error over twice that (the CPU pipeline's PIL refuses such a file)."""
    from PIL import Image
    limit = Image.MAX_IMAGE_PIXELS
    if not limit or h * w <= limit:
        return
    text = f"Image size ({h * w} pixels) exceeds limit of {{}} pixels, could be decompression bomb DOS attack."
    if h * w > 2 * limit:
        raise Image.DecompressionBombError(text.format(2 * limit))
    warnings.warn(text.format(limit), Image.DecompressionBombWarning, stacklevel=3)


def _pil_pixels(source) -> torch.Tensor:
    """uint8 RGB CHW pixels of a file (path or binary file) as the CPU pipeline decodes it (convert('RGB'))."""
    arr = np.asarray(open_image(source, "RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def _decode_file(path: str, device: torch.device) -> torch.Tensor:
    """One file decoded on ``device`` in the main process, as a batch would decode it."""
    payload, _ = read_payload(path)
    images, failed = decode_batch([(*payload, -1)], device)
    if failed:
        raise failed[0]
    return images[0]


@dataclass
class SampleParams:
    crop: aug.CropParams
    interpolation: str
    rand_augment: aug.RandAugmentParams | None
    color_jitter: aug.ColorJitterParams | None


def sample_params(config: DeviceAugmentConfig, h: int, w: int, gen: torch.Generator) -> SampleParams:
    """One sample's augmentation draws, in timm's order: crop (+ interpolation), flips, then the colour ops."""
    if config.no_aug:  # timm's no_aug: resize the shorter side, centre crop
        side = min(h, w)
        crop = aug.CropParams((h - side) // 2, (w - side) // 2, side, side, False, False)
        return SampleParams(crop, "bilinear", None, None)
    crop = aug.sample_crop(h, w, config.scale, config.ratio, config.hflip, config.vflip, gen)
    interpolation = aug.sample_interpolation(config.interpolation, gen)
    ra = aug.sample_rand_augment(config.rand_augment, 1, gen) if config.rand_augment is not None else None
    cj = aug.sample_color_jitter(config.color_jitter, 1, gen) if config.color_jitter else None
    return SampleParams(crop, interpolation, ra, cj)


def _cat_params(items: list):
    """Concatenate per-sample dataclasses of (1, ...) tensors into one batch dataclass."""
    if items[0] is None:
        return None
    cls = type(items[0])
    out = {}
    for f in fields(cls):
        values = [getattr(it, f.name) for it in items]
        out[f.name] = None if values[0] is None else torch.cat(values)
    return cls(**out)


def device_collate(batch: list) -> tuple:
    """Worker-side collate: payloads stay a list (images differ in size), parameters are batched."""
    payloads = [b[0] for b in batch]
    targets = torch.tensor([b[1] for b in batch], dtype=torch.int64)
    params = [b[2] for b in batch]
    key = torch.tensor(batch[0][3])
    return payloads, targets, {"crops": [p.crop for p in params], "interp": [p.interpolation for p in params],
                               "ra": _cat_params([p.rand_augment for p in params]),
                               "cj": _cat_params([p.color_jitter for p in params]),
                               "positions": [b[3][1] for b in batch]}, {BATCH_KEY: key}


def _set_params(params: dict, i: int, one: SampleParams) -> None:
    """Put one sample's draws at row ``i`` of a collated batch's parameters."""
    params["crops"][i], params["interp"][i] = one.crop, one.interpolation
    for name, single in (("ra", one.rand_augment), ("cj", one.color_jitter)):
        if single is None:
            continue
        for f in fields(single):
            rows = getattr(params[name], f.name)
            if rows is not None:
                rows[i] = getattr(single, f.name)[0]


def _decode_jpegs(data, device: torch.device):
    from torchvision.io import ImageReadMode, decode_jpeg
    # torchvision 0.29 flags its image decoders as deprecated in favour of TorchCodec; they remain the batched
    # nvjpeg path we need, so the notice is silenced for these calls only
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The image decoding and encoding", category=DeprecationWarning)
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def _decode_alone(data: torch.Tensor) -> torch.Tensor:
    """One JPEG on the CPU: torchvision, else PIL, whose verdict the CPU pipeline follows (it decodes some
    damaged scans torchvision rejects); raises PIL's error when PIL cannot decode it either."""
    try:
        return _decode_jpegs(data.cpu(), torch.device("cpu"))
    except RuntimeError:
        return _pil_pixels(io.BytesIO(data.cpu().numpy().tobytes()))


def decode_batch(payloads: list, device: torch.device) -> tuple[list[torch.Tensor | None], dict[int, Exception]]:
    """uint8 CHW images on ``device``: JPEGs decoded in one batched call (nvjpeg on CUDA), pixels moved; and
    PIL's error for each payload that no decoder can read (its image is None)."""
    out: list[torch.Tensor | None] = [None] * len(payloads)
    failed: dict[int, Exception] = {}
    jpeg_idx = [i for i, p in enumerate(payloads) if p[0] == "jpeg"]
    if jpeg_idx:
        data = [payloads[i][1] for i in jpeg_idx]
        try:
            decoded = _decode_jpegs(data, device)
        except RuntimeError:  # a JPEG variant the device decoder rejects, or a damaged file: one by one on the CPU
            decoded = []
            for i, d in zip(jpeg_idx, data):
                try:
                    decoded.append(_decode_alone(d).to(device))
                except UNREADABLE as e:
                    failed[i] = e
                    decoded.append(None)
        for i, img in zip(jpeg_idx, decoded):
            out[i] = img
    for i, p in enumerate(payloads):
        if p[0] == "pixels":
            out[i] = p[1].to(device, non_blocking=True)
    return out, failed


class DeviceAugmentLoader(ExtrasPrefetchLoader):
    """The training loader's device side for ``--data-pipeline gpu``: decode, augment, mix, normalise, erase.

    Runs on the prefetcher's side stream on CUDA, so batch n+1 is prepared while the step of batch n runs."""

    def __init__(self, loader, config: DeviceAugmentConfig, mixup=None, mixup_off_epoch: int = 0, **kwargs):
        super().__init__(loader, **kwargs)
        self.config, self.mixup, self.mixup_off_epoch = config, mixup, mixup_off_epoch

    def _to_device(self, batch):
        payloads, targets, params, extras = batch
        key = extras.pop(BATCH_KEY, None)
        images, failed = decode_batch(payloads, self.device)
        for i, error in failed.items():  # files only the decoding shows bad: replaced as the CPU pipeline does
            image, target, one = self.loader.dataset.replacement(int(key[0]), params["positions"][i],
                                                                 payloads[i][2], error, self.device)
            images[i], targets[i] = image, target
            _set_params(params, i, one)
        x = aug.crop_resize(images, params["crops"], self.config.size, params["interp"])
        if params["ra"] is not None:
            x = aug.apply_rand_augment(x, self.config.rand_augment, params["ra"])
        if params["cj"] is not None:
            x = aug.apply_color_jitter(x, params["cj"])
        # PIL hands timm's pipeline whole numbers: round as it does before normalising
        x = x.round_().clamp_(0, 255).to(self.img_dtype).sub_(self.mean).div_(self.std)
        y = targets.to(self.device, non_blocking=True)
        if self.mixup is not None:  # mixing normalised images = normalising mixed ones (an affine map)
            x, y = self._mix(x, y, key)
        if self.random_erasing is not None:  # after mixup, as in the CPU pipeline
            x = self._erase(x, key)
        out = [x, y]
        if extras:
            out.append({k: v.to(device=self.device, non_blocking=True) for k, v in extras.items()})
        return tuple(out)

    def _mix(self, x, y, key):
        """timm's Mixup on the device, its draws seeded from the batch's place in the stream."""
        epoch, position = (int(v) for v in key)
        if self.mixup_off_epoch:
            self.mixup.mixup_enabled = epoch < self.mixup_off_epoch
        with seeded(mix_seed(self.seed, self.rank, epoch, position, 1), self.device):
            return self.mixup(x, y)
