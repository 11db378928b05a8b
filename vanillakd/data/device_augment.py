"""timm's A1/A2 training augmentation (RandomResizedCrop + flips, RandAugment, ColorJitter) as batched tensor ops.

Why: timm's transforms run per image on PIL in the DataLoader workers, which starves fast accelerators. Here the
same augmentation distribution is produced in two separate steps:

1. **Sampling on the host.** Every random choice (crop box, flips, interpolation, RandAugment op / magnitude /
   sign / apply flag / resample filter, ColorJitter factors and order) is drawn up front, per sample, from a
   ``torch.Generator``. Parameters are plain host tensors / dataclasses, so a batch is replayable from a seed and
   the result does not depend on the device that executes it.
2. **Execution on the device.** The ops take a whole batch: for each RandAugment op slot, samples are grouped by
   op and each op runs once per group with per-sample arguments (no Python loop over samples in the pixel work;
   the geometric ops only build their six affine coefficients per sample on the host, with Python floats, to be
   bit-identical to timm's). Only :func:`crop_resize` loops over samples, because its inputs differ in size.

The ops follow PIL's uint8 semantics bit for bit where that is cheap: results are clamped to [0, 255] and
rounded / truncated exactly as Pillow does after every op (blends truncate, filters round, affine resampling
truncates), PIL's fixed-point grayscale ``L = (19595 R + 38470 G + 7471 B + 2**15) >> 16`` (which is the
``(299 R + 587 G + 114 B) / 1000`` of the docs, rounded), PIL's edge handling for affine transforms (a
source pixel outside the image gives the fill colour, taps beyond the border are clamped) and PIL's BICUBIC
kernel for transforms (a = -1, not the a = -0.5 PIL uses for resizing). Coordinates and interpolation are
computed in float64 (float32 on MPS, which lacks float64) because PIL truncates its double results: float32
rounding would flip some exact integers to the integer below.

Deliberate differences from timm + Pillow 13 (details in the docstrings of the functions concerned):

* ``Posterize*`` with 0 (or fewer) bits kept returns black, which is what Pillow < 10 did and what timm /
  TF intend ("keep 0 MSB"). Pillow >= 10 raises ``ValueError`` there, which makes timm's ``PosterizeIncreasing``
  crash whenever the noisy magnitude reaches 10 (about 2% of its calls at ``rand-m9-mstd0.5-inc1``).
* Weighted / named op sets (``rand-...-tweights``, ``-t3a``) and sections without a number are refused by
  :meth:`RandAugmentConfig.from_timm` instead of being ignored silently.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = [
    "RAND_INCREASING_TRANSFORMS",
    "RAND_TRANSFORMS",
    "ColorJitterParams",
    "CropParams",
    "RandAugmentConfig",
    "RandAugmentParams",
    "apply_color_jitter",
    "apply_rand_augment",
    "crop_resize",
    "sample_color_jitter",
    "sample_crop",
    "sample_interpolation",
    "sample_rand_augment",
]

_LEVEL_DENOM = 10.0  # timm: magnitude M maps to the fraction M / 10 of each op's range

# timm.data.auto_augment._RAND_TRANSFORMS / _RAND_INCREASING_TRANSFORMS, same order (the op index refers to it)
RAND_TRANSFORMS: tuple[str, ...] = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color", "Contrast",
    "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)
RAND_INCREASING_TRANSFORMS: tuple[str, ...] = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
    "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
    "TranslateXRel", "TranslateYRel",
)
# ops whose level timm passes through _randomly_negate
_SIGNED_OPS = frozenset({
    "Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
    "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
})
_GEOMETRIC_OPS = frozenset({"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"})
_RESAMPLE_CODES = {"nearest": 0, "bilinear": 1, "bicubic": 2}
_RESIZE_MODES = ("bilinear", "bicubic")


def _work_dtype(device: torch.device) -> torch.dtype:
    """float64 for coordinates / LUT arithmetic where the device has it (PIL computes in double)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _uniform(gen: torch.Generator, shape: Sequence[int] | int) -> torch.Tensor:
    """U[0, 1) float64 on the host, drawn with ``gen`` (on whatever device ``gen`` lives)."""
    if isinstance(shape, int):
        shape = (shape,)
    return torch.rand(tuple(shape), generator=gen, dtype=torch.float64, device=gen.device).cpu()


# ----------------------------------------------------------------------------------------------------------------
# RandomResizedCropAndInterpolation + RandomHorizontalFlip / RandomVerticalFlip
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class CropParams:
    """One sample's random-resized-crop box (pixels of the source image) and flips (applied after resizing)."""
    top: int
    left: int
    height: int
    width: int
    hflip: bool
    vflip: bool


def sample_crop(img_h: int, img_w: int, scale: tuple[float, float], ratio: tuple[float, float],
                hflip: float, vflip: float, gen: torch.Generator) -> CropParams:
    """timm ``RandomResizedCropAndInterpolation.get_params`` plus torchvision's flips, drawn from ``gen``.

    Exactly timm's algorithm: up to 10 attempts with area ``U(scale) * H * W`` and aspect ``exp(U(log ratio))``,
    sides rounded, accepted when the box fits, position uniform over the valid integer offsets; otherwise the
    centred fallback crop (whole image, with its aspect ratio clamped into ``ratio``). Then horizontal /
    vertical flip with probabilities ``hflip`` / ``vflip``. Always consumes 24 uniforms from ``gen`` (all 10
    attempts drawn up front) so that the generator state after a sample does not depend on the image size.
    """
    if img_h <= 0 or img_w <= 0:
        raise ValueError(f"image size must be positive, got {img_h}x{img_w}")
    u = _uniform(gen, 24).tolist()
    area = img_h * img_w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for attempt in range(10):
        # random.uniform(a, b) == a + (b - a) * random.random()
        target_area = (scale[0] + (scale[1] - scale[0]) * u[2 * attempt]) * area
        aspect_ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[2 * attempt + 1])
        target_w = round(math.sqrt(target_area * aspect_ratio))
        target_h = round(math.sqrt(target_area / aspect_ratio))
        if target_w <= img_w and target_h <= img_h:
            # random.randint(0, n) is uniform over n + 1 integers
            top = min(int(u[20] * (img_h - target_h + 1)), img_h - target_h)
            left = min(int(u[21] * (img_w - target_w + 1)), img_w - target_w)
            break
    else:  # fallback to a central crop
        in_ratio = img_w / img_h
        if in_ratio < min(ratio):
            target_w = img_w
            target_h = round(target_w / min(ratio))
        elif in_ratio > max(ratio):
            target_h = img_h
            target_w = round(target_h * max(ratio))
        else:
            target_w, target_h = img_w, img_h
        top = (img_h - target_h) // 2
        left = (img_w - target_w) // 2
    return CropParams(top, left, target_h, target_w, bool(u[22] < hflip), bool(u[23] < vflip))


def sample_interpolation(mode: str, gen: torch.Generator) -> str:
    """Resize filter for one sample: timm's ``'random'`` picks bilinear or bicubic with equal probability."""
    if mode == "random":
        return _RESIZE_MODES[int(_uniform(gen, 1).item() < 0.5)]
    if mode not in _RESIZE_MODES:
        raise ValueError(f"unsupported interpolation {mode!r}: use 'bilinear', 'bicubic' or 'random'")
    return mode


def crop_resize(images: list[torch.Tensor], params: list[CropParams], size: tuple[int, int],
                interpolation: str | list[str] = "bilinear") -> torch.Tensor:
    """Crop each uint8 CHW image to its box, resize to ``size`` = (H, W), flip; returns float32 (N, 3, H, W).

    Resizing is ``F.interpolate(..., antialias=True)``, torch's port of PIL's resampling (triangle / a = -0.5
    cubic filters widened when downscaling). The result is clamped to [0, 255] and rounded, as PIL's uint8
    output is, so the RandAugment ops downstream see integer pixel values. Loops over samples (different sizes).
    """
    if len(images) != len(params):
        raise ValueError(f"got {len(images)} images but {len(params)} crop params")
    if not images:
        raise ValueError("crop_resize needs at least one image")
    modes = [interpolation] * len(images) if isinstance(interpolation, str) else list(interpolation)
    if len(modes) != len(images):
        raise ValueError(f"got {len(images)} images but {len(modes)} interpolation modes")
    out_h, out_w = int(size[0]), int(size[1])
    device = images[0].device
    out = torch.empty((len(images), 3, out_h, out_w), dtype=torch.float32, device=device)
    for k, (img, p, mode) in enumerate(zip(images, params, modes)):
        if mode not in _RESIZE_MODES:
            raise ValueError(f"unsupported interpolation {mode!r} (sample {k}): use 'bilinear' or 'bicubic' "
                             "(draw timm's 'random' with sample_interpolation)")
        if img.dtype != torch.uint8 or img.dim() != 3 or img.shape[0] != 3:
            raise ValueError(f"image {k}: expected a uint8 (3, H, W) tensor, got {img.dtype} {tuple(img.shape)}")
        if img.device != device:
            raise ValueError(f"image {k} is on {img.device}, image 0 on {device}: put the batch on one device")
        h, w = img.shape[1:]
        if p.height <= 0 or p.width <= 0 or p.top < 0 or p.left < 0 or p.top + p.height > h or p.left + p.width > w:
            raise ValueError(f"crop box {p} of sample {k} does not fit its {h}x{w} image")
        crop = img[:, p.top:p.top + p.height, p.left:p.left + p.width].unsqueeze(0).float()
        y = F.interpolate(crop, size=(out_h, out_w), mode=mode, align_corners=False, antialias=True)[0]
        y = y.clamp_(0, 255).round_()
        dims = ([2] if p.hflip else []) + ([1] if p.vflip else [])
        out[k] = y.flip(dims) if dims else y
    return out


# ----------------------------------------------------------------------------------------------------------------
# RandAugment
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class RandAugmentConfig:
    """timm RandAugment settings. ``magnitude_max`` is the clipping bound (timm: ``mmax`` or 10);
    ``interpolation`` is the resample filter of the geometric ops: ``'random'`` (timm's default, bilinear or
    bicubic per call), or fixed ``'bilinear'`` / ``'bicubic'`` / ``'nearest'`` (timm's hparams['interpolation'])."""
    num_ops: int
    magnitude: float
    magnitude_std: float
    magnitude_max: float
    ops: tuple[str, ...]
    prob: float  # per-op application probability (0.5 in timm's rand augment)
    fill: tuple[int, int, int]  # timm's img_mean-based fill (hparams['img_mean'])
    translate_pct: float
    interpolation: str = "random"

    def __post_init__(self) -> None:
        self.ops = tuple(self.ops)
        unknown = [o for o in self.ops if o not in _OPS]
        if unknown:
            raise ValueError(f"unsupported RandAugment ops {unknown}; supported: {sorted(_OPS)}")
        if self.num_ops < 0 or (self.num_ops > 0 and not self.ops):
            raise ValueError(f"num_ops={self.num_ops} needs a non-empty op list")
        if not 0.0 <= self.prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {self.prob}")
        if self.magnitude_std < 0:
            raise ValueError(f"magnitude_std must be >= 0 (inf for uniform), got {self.magnitude_std}")
        if self.interpolation not in ("random", *_RESAMPLE_CODES):
            raise ValueError(f"unsupported interpolation {self.interpolation!r}")
        self.fill = tuple(int(v) for v in self.fill)
        if len(self.fill) != 3:
            raise ValueError(f"fill must be an RGB triple, got {self.fill}")

    @classmethod
    def from_timm(cls, config_str: str, img_size: int | Sequence[int], mean: tuple[float, float, float],
                  interpolation: str = "random") -> RandAugmentConfig:
        """Parse a timm ``rand-...`` string with the hparams ``transforms_imagenet_train`` builds.

        Supported sections (as timm's ``rand_augment_transform``): ``m`` (int magnitude, default 10), ``n``
        (ops per image, default 2), ``p`` (per-op probability, default 0.5), ``mstd`` (magnitude noise std;
        > 100 means uniform in [0, m]; first occurrence wins), ``mmax`` (int clip bound, default 10; first wins),
        ``inc`` (0/1: the *Increasing op list). Refused with ``ValueError``: anything not starting with
        ``rand``, the transform-set option ``t...`` (weighted choice 'tweights', '3a', '3aw' need ops we do not
        implement and choose without replacement), unknown keys and sections without a number (timm ignores the
        latter silently; here they are most likely typos). ``fill`` is timm's ``img_mean``
        ``round(255 * mean)``; timm's ``translate_const = int(min(img_size) * 0.45)`` only parametrises the
        absolute TranslateX/Y ops, which are not in the rand op lists, so it is not stored; ``translate_pct``
        keeps timm's default 0.45. ``interpolation`` is the training interpolation (timm sets the geometric ops'
        resample filter from it unless it is 'random').
        """
        sections = config_str.split("-")
        if sections[0] != "rand":
            raise ValueError(f"not a RandAugment config string (expected 'rand-...'): {config_str!r}")
        magnitude, num_ops, prob, increasing = 10, 2, 0.5, False
        mstd: float | None = None
        mmax: int | None = None
        for sec in sections[1:]:
            if not sec:
                continue
            if sec.startswith("t"):
                raise ValueError(f"RandAugment transform-set option {sec!r} is not supported in {config_str!r}")
            parts = re.split(r"(\d.*)", sec)
            if len(parts) < 2:
                raise ValueError(f"RandAugment section {sec!r} has no value in {config_str!r}")
            key, val = parts[:2]
            try:
                if key == "mstd":
                    v = float(val)
                    mstd = (float("inf") if v > 100 else v) if mstd is None else mstd
                elif key == "mmax":
                    mmax = int(val) if mmax is None else mmax
                elif key == "inc":
                    increasing = bool(int(val))
                elif key == "m":
                    magnitude = int(val)
                elif key == "n":
                    num_ops = int(val)
                elif key == "p":
                    prob = float(val)
                else:
                    raise ValueError(f"unknown RandAugment option {sec!r} in {config_str!r}")
            except ValueError as e:
                if "unknown RandAugment" in str(e):
                    raise
                raise ValueError(f"bad value in RandAugment section {sec!r} of {config_str!r}") from None
        if interpolation not in ("random", *_RESAMPLE_CODES):
            raise ValueError(f"unsupported interpolation {interpolation!r}")
        return cls(
            num_ops=num_ops, magnitude=float(magnitude), magnitude_std=mstd or 0.0,
            magnitude_max=float(mmax or _LEVEL_DENOM),  # timm: `self.magnitude_max or _LEVEL_DENOM`
            ops=RAND_INCREASING_TRANSFORMS if increasing else RAND_TRANSFORMS, prob=prob,
            fill=tuple(min(255, round(255 * x)) for x in mean), translate_pct=0.45, interpolation=interpolation,
        )


@dataclass
class RandAugmentParams:
    """Per-batch RandAugment draws, host tensors of shape (N, num_ops).

    ``sign`` is True where timm's ``_randomly_negate`` negates the level (probability 0.5; only read for the
    signed ops). ``bicubic`` is the resample filter of geometric ops when ``config.interpolation == 'random'``
    (True = BICUBIC, False = BILINEAR, timm's ``random.choice`` per call); None means bilinear.
    """
    op_index: torch.Tensor   # (N, num_ops) long: index into config.ops, chosen uniformly WITH replacement (timm)
    magnitude: torch.Tensor  # (N, num_ops) float64: per-op magnitude after timm's noise + clipping
    applied: torch.Tensor    # (N, num_ops) bool: each op applied with probability config.prob
    sign: torch.Tensor       # (N, num_ops) bool: True = level negated (timm's _randomly_negate)
    bicubic: torch.Tensor | None = field(default=None)  # (N, num_ops) bool, see class docstring


def sample_rand_augment(config: RandAugmentConfig, n: int, gen: torch.Generator) -> RandAugmentParams:
    """Draw a batch's RandAugment parameters as timm's ``RandAugment`` / ``AugmentOp`` do per image.

    Ops uniformly with replacement (``np.random.choice``); applied when U < prob; magnitude ``m`` if
    ``magnitude_std == 0``, ``U(0, m)`` if it is inf, else ``N(m, std)``; then clipped to
    ``[0, magnitude_max or 10]``; sign and resample filter each a fair coin.
    """
    k = config.num_ops
    shape = (n, k)
    op_index = torch.randint(max(len(config.ops), 1), shape, generator=gen, device=gen.device).cpu()
    applied = _uniform(gen, shape) < config.prob
    m = float(config.magnitude)
    if config.magnitude_std == float("inf"):
        magnitude = _uniform(gen, shape) * m
    elif config.magnitude_std > 0:
        noise = torch.randn(shape, generator=gen, dtype=torch.float64, device=gen.device).cpu()
        magnitude = noise * config.magnitude_std + m
    else:
        magnitude = torch.full(shape, m, dtype=torch.float64)
    upper = float(config.magnitude_max or _LEVEL_DENOM)
    magnitude = magnitude.clamp(0.0, upper)
    sign = _uniform(gen, shape) > 0.5
    bicubic = _uniform(gen, shape) < 0.5 if config.interpolation == "random" else None
    return RandAugmentParams(op_index=op_index, magnitude=magnitude, applied=applied, sign=sign, bicubic=bicubic)


def _op_arg(name: str, m: torch.Tensor, negate: torch.Tensor, config: RandAugmentConfig) -> torch.Tensor | None:
    """timm's LEVEL_TO_ARG for a vector of (clipped) magnitudes, in float64 on the host like Python's floats."""
    frac = m / torch.full_like(m, _LEVEL_DENOM)  # true division like Python's (a scalar divisor may not be)
    sgn = torch.where(negate, -1.0, 1.0).to(torch.float64)
    if name in ("AutoContrast", "Equalize", "Invert"):
        return None
    if name == "Rotate":
        return frac * 30.0 * sgn
    if name == "Posterize":
        return torch.floor(frac * 4)
    if name == "PosterizeIncreasing":
        return 4 - torch.floor(frac * 4)
    if name == "Solarize":
        return torch.floor(frac * 256).clamp(max=256)
    if name == "SolarizeIncreasing":
        return 256 - torch.floor(frac * 256).clamp(max=256)
    if name == "SolarizeAdd":
        return torch.floor(frac * 110).clamp(max=128)
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return frac * 1.8 + 0.1
    if name.endswith("Increasing"):  # Color/Contrast/Brightness/SharpnessIncreasing
        return (1.0 + frac * 0.9 * sgn).clamp(min=0.1)
    if name in ("ShearX", "ShearY"):
        return frac * 0.3 * sgn
    if name in ("TranslateXRel", "TranslateYRel"):
        return frac * config.translate_pct * sgn
    raise ValueError(f"unsupported RandAugment op {name!r}")


def apply_rand_augment(x: torch.Tensor, config: RandAugmentConfig, params: RandAugmentParams) -> torch.Tensor:
    """Apply each sample's op slots in order to a float32 (N, 3, H, W) batch of integer values in [0, 255].

    For each slot, the samples are grouped by op and each op runs once on its group with per-sample
    arguments. ``x`` is not modified; samples with no applied op come back unchanged.
    """
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected a (N, 3, H, W) batch, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"expected a float batch in [0, 255], got {x.dtype}")
    n = x.shape[0]
    if tuple(params.op_index.shape) != (n, config.num_ops):
        raise ValueError(f"params are for shape {tuple(params.op_index.shape)}, batch needs {(n, config.num_ops)}")
    out = x.clone()
    op_index, applied = params.op_index.cpu(), params.applied.cpu()
    magnitude, sign = params.magnitude.cpu().to(torch.float64), params.sign.cpu()
    for slot in range(config.num_ops):
        for k, name in enumerate(config.ops):
            idx = torch.nonzero(applied[:, slot] & (op_index[:, slot] == k)).squeeze(1)
            if idx.numel() == 0:
                continue
            arg = _op_arg(name, magnitude[idx, slot], sign[idx, slot], config)
            idx_dev = idx.to(out.device)
            group = out.index_select(0, idx_dev)
            if name in _GEOMETRIC_OPS:
                resample = _resample_codes(config, params, idx, slot)
                y = _geometric(group, name, arg, resample, config.fill)
            else:
                y = _OPS[name](group, arg)
            out.index_copy_(0, idx_dev, y.to(out.dtype))
    return out


def _resample_codes(config: RandAugmentConfig, params: RandAugmentParams, idx: torch.Tensor,
                    slot: int) -> torch.Tensor:
    if config.interpolation != "random":
        return torch.full((idx.numel(),), _RESAMPLE_CODES[config.interpolation], dtype=torch.long)
    if params.bicubic is None:
        return torch.full((idx.numel(),), _RESAMPLE_CODES["bilinear"], dtype=torch.long)
    return torch.where(params.bicubic.cpu()[idx, slot], _RESAMPLE_CODES["bicubic"], _RESAMPLE_CODES["bilinear"])


# --- pixel ops (PIL uint8 semantics on float tensors holding integers) -------------------------------------------
def _per_sample(v: torch.Tensor, like: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return v.to(device=like.device, dtype=dtype).view(-1, 1, 1, 1)


def _blend(degenerate: torch.Tensor, img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL ``Image.blend(degenerate, img, factor)``: float32 ``d + f * (i - d)``, clipped and truncated."""
    f = _per_sample(factor, img)  # PIL casts the factor to a C float
    return (degenerate + f * (img - degenerate)).clamp_(0, 255).floor_()


def _gray(x: torch.Tensor) -> torch.Tensor:
    """PIL ``convert('L')``: fixed-point ITU-R 601-2 luma, (B, 1, H, W) int32."""
    xi = x.round().to(torch.int32)
    return ((xi[:, 0:1] * 19595 + xi[:, 1:2] * 38470 + xi[:, 2:3] * 7471 + 32768) >> 16)


def _auto_contrast(x: torch.Tensor, _arg: None) -> torch.Tensor:
    """ImageOps.autocontrast (cutoff 0): per image and channel, map [lo, hi] to [0, 255] with int() truncation."""
    dt = _work_dtype(x.device)
    flat = x.flatten(2)
    lo = flat.amin(dim=2, keepdim=True).to(dt)
    hi = flat.amax(dim=2, keepdim=True).to(dt)
    scale = torch.full_like(hi, 255.0) / (hi - lo).clamp(min=1)  # not `255.0 / t`: torch uses a reciprocal
    offset = -lo * scale
    y = torch.trunc(flat.to(dt) * scale + offset).clamp(0, 255)
    y = torch.where(hi > lo, y, flat.to(dt))
    return y.to(x.dtype).view_as(x)


def _equalize(x: torch.Tensor, _arg: None) -> torch.Tensor:
    """ImageOps.equalize per image and channel (Pillow's LUT: step = (count - count of max value) // 255)."""
    b, c, h, w = x.shape
    xi = x.round().clamp(0, 255).to(torch.long).view(b * c, h * w)
    hist = torch.zeros((b * c, 256), dtype=torch.long, device=x.device)
    hist.scatter_add_(1, xi, torch.ones_like(xi))
    total = torch.full((b * c, 1), h * w, dtype=torch.long, device=x.device)
    last = hist.gather(1, xi.amax(dim=1, keepdim=True))
    step = (total - last) // 255
    nonzero_bins = (hist > 0).sum(dim=1, keepdim=True)
    identity = (nonzero_bins <= 1) | (step == 0)
    cum_excl = torch.cumsum(hist, dim=1) - hist
    lut = ((step // 2 + cum_excl) // step.clamp(min=1)).clamp(0, 255)  # point() clips the LUT to uint8
    y = lut.gather(1, xi)
    y = torch.where(identity, xi, y)
    return y.to(x.dtype).view_as(x)


def _invert(x: torch.Tensor, _arg: None) -> torch.Tensor:
    return 255.0 - x


def _posterize(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep the ``bits`` most significant bits; bits >= 8 is the identity (timm), bits <= 0 gives black."""
    shift = (8 - bits).clamp(0, 8)
    q = _per_sample(torch.pow(2.0, shift), x)
    return torch.floor(x / q) * q


def _solarize(x: torch.Tensor, thresh: torch.Tensor) -> torch.Tensor:
    t = _per_sample(thresh, x)
    return torch.where(x < t, x, 255.0 - x)


def _solarize_add(x: torch.Tensor, add: torch.Tensor) -> torch.Tensor:
    a = _per_sample(add, x)
    return torch.where(x < 128, (x + a).clamp(max=255), x)


def _color(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(_gray(x).to(x.dtype).expand_as(x), x, factor)


def _contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the constant int(mean(L) + 0.5) (ImageEnhance.Contrast), exact integer rounding."""
    g = _gray(x).to(torch.long)
    count = g[0].numel()
    s = g.flatten(1).sum(dim=1)
    mean = (2 * s + count) // (2 * count)
    return _blend(mean.to(x.dtype).view(-1, 1, 1, 1).expand_as(x), x, factor)


def _brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(torch.zeros_like(x), x, factor)


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """PIL ImageFilter.SMOOTH: [[1,1,1],[1,5,1],[1,1,1]] / 13, rounded; the 1-pixel border is copied."""
    h, w = x.shape[-2:]
    if h < 3 or w < 3:
        return x.clone()
    s = 4 * x[..., 1:-1, 1:-1]  # centre weight 5 = 4 + the centre term of the 3x3 box sum below
    for dy in range(3):
        for dx in range(3):
            s = s + x[..., dy:h - 2 + dy, dx:w - 2 + dx]
    out = x.clone()
    out[..., 1:-1, 1:-1] = torch.floor((2 * s + 13) / 26)  # round(s / 13); s / 13 is never a tie
    return out


def _sharpness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(_smooth(x), x, factor)


_OPS: dict[str, Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None] = {
    "AutoContrast": _auto_contrast, "Equalize": _equalize, "Invert": _invert,
    "Posterize": _posterize, "PosterizeIncreasing": _posterize,
    "Solarize": _solarize, "SolarizeIncreasing": _solarize, "SolarizeAdd": _solarize_add,
    "Color": _color, "ColorIncreasing": _color, "Contrast": _contrast, "ContrastIncreasing": _contrast,
    "Brightness": _brightness, "BrightnessIncreasing": _brightness,
    "Sharpness": _sharpness, "SharpnessIncreasing": _sharpness,
    "Rotate": None, "ShearX": None, "ShearY": None, "TranslateXRel": None, "TranslateYRel": None,  # _geometric
}


# --- geometric ops: PIL Image.transform(AFFINE) / Image.rotate ------------------------------------------------
def _affine_matrices(name: str, arg: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, 6) float64 PIL inverse affine (a, b, c, d, e, f): output (x, y) samples input (ax+by+c, dx+ey+f).

    Built with Python floats per sample (a handful of scalars) so that the matrices, rotate's
    ``round(cos, 15)`` included, are bit-identical to what timm passes to PIL.
    """
    rows = []
    for v in arg.tolist():
        if name == "ShearX":
            rows.append((1.0, v, 0.0, 0.0, 1.0, 0.0))
        elif name == "ShearY":
            rows.append((1.0, 0.0, 0.0, v, 1.0, 0.0))
        elif name == "TranslateXRel":
            rows.append((1.0, 0.0, v * w, 0.0, 1.0, 0.0))
        elif name == "TranslateYRel":
            rows.append((1.0, 0.0, 0.0, 0.0, 1.0, v * h))
        elif name == "Rotate":  # PIL Image.rotate(expand=False): about the centre (w / 2, h / 2)
            angle = -math.radians(v % 360.0)
            a, b = round(math.cos(angle), 15), round(math.sin(angle), 15)
            d, e = round(-math.sin(angle), 15), round(math.cos(angle), 15)
            cx, cy = w / 2, h / 2
            rows.append((a, b, a * -cx + b * -cy + 0.0 + cx, d, e, d * -cx + e * -cy + 0.0 + cy))
        else:
            raise ValueError(f"not a geometric op: {name!r}")
    return torch.tensor(rows, dtype=torch.float64).view(-1, 6)


def _geometric(x: torch.Tensor, name: str, arg: torch.Tensor, resample: torch.Tensor,
               fill: tuple[int, int, int]) -> torch.Tensor:
    h, w = x.shape[-2:]
    mats = _affine_matrices(name, arg, h, w)
    out = torch.empty_like(x)
    for code in resample.unique().tolist():
        sel = torch.nonzero(resample == code).squeeze(1)
        sel_dev = sel.to(x.device)
        y = _affine_sample(x.index_select(0, sel_dev), mats[sel], code, fill)
        out.index_copy_(0, sel_dev, y)
    return out


def _cubic(v1: torch.Tensor, v2: torch.Tensor, v3: torch.Tensor, v4: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """PIL's transform BICUBIC macro (Keys a = -1) in its Horner form, same operation order as the C code."""
    p2 = -v1 + v3
    p3 = 2 * (v1 - v2) + v3 - v4
    p4 = -v1 + v2 - v3 + v4
    return v2 + d * (p2 + d * (p3 + d * p4))


def _nearest_fixed_point(mats: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Which samples PIL's NEAREST affine runs in 16.16 fixed point (matrices that are not a pure scale /
    translation and keep coordinates within +-32768), and their fixed-point coefficients (B, 6) int64."""
    def fix(v: float) -> int:
        return math.floor(v * 65536.0 + 0.5)

    rows, use = [], []
    for a in mats.tolist():
        ok = a[1] != 0 or a[3] != 0  # PIL: a[1] == a[3] == 0 goes to ImagingScaleAffine (double coordinates)
        ok = ok and all(abs(x * a[0] + y * a[1] + a[2]) < 32768.0 and abs(x * a[3] + y * a[4] + a[5]) < 32768.0
                        for x, y in ((0, 0), (w, h)))
        rows.append((fix(a[0]), fix(a[1]), fix(a[2] + a[0] * 0.5 + a[1] * 0.5),
                     fix(a[3]), fix(a[4]), fix(a[5] + a[3] * 0.5 + a[4] * 0.5)))
        use.append(ok)
    if not any(use):
        return None
    return torch.tensor(use), torch.tensor(rows, dtype=torch.long)


def _affine_sample(x: torch.Tensor, mats: torch.Tensor, code: int, fill: tuple[int, int, int]) -> torch.Tensor:
    """PIL's affine resampling: source pixel centre outside the image -> fill, taps clamped to the border,
    result truncated to an integer (bilinear, bicubic a = -1). NEAREST follows PIL's own special cases: pure
    scale / translate matrices floor the double coordinate; other matrices use PIL's 16.16 fixed-point path."""
    b, c, h, w = x.shape
    dt = _work_dtype(x.device)
    m = mats.to(device=x.device, dtype=dt).view(b, 6, 1, 1)
    xs = (torch.arange(w, device=x.device, dtype=dt) + 0.5).view(1, 1, w)
    ys = (torch.arange(h, device=x.device, dtype=dt) + 0.5).view(1, h, 1)
    u = m[:, 0] * xs + m[:, 1] * ys + m[:, 2]  # (b, h, w)
    v = m[:, 3] * xs + m[:, 4] * ys + m[:, 5]
    inside = (u >= 0) & (u < w) & (v >= 0) & (v < h)
    flat = x.reshape(b, c, h * w)

    def tap(yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
        index = (yy.clamp(0, h - 1) * w + xx.clamp(0, w - 1)).view(b, 1, h * w).expand(b, c, h * w)
        return flat.gather(2, index).view(b, c, h, w).to(dt)

    if code == _RESAMPLE_CODES["nearest"]:
        xi, yi = torch.floor(u).long(), torch.floor(v).long()
        fixed = _nearest_fixed_point(mats, h, w)
        if fixed is not None:
            use, fx = fixed
            use = use.to(x.device).view(b, 1, 1)
            a0, a1, a2, a3, a4, a5 = (fx[:, k].to(x.device).view(b, 1, 1) for k in range(6))
            xs_i = torch.arange(w, device=x.device, dtype=torch.long).view(1, 1, w)
            ys_i = torch.arange(h, device=x.device, dtype=torch.long).view(1, h, 1)
            xi = torch.where(use, (a2 + ys_i * a1 + xs_i * a0) >> 16, xi)  # arithmetic shift = floor
            yi = torch.where(use, (a5 + ys_i * a4 + xs_i * a3) >> 16, yi)
            inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
        val = tap(yi, xi)
    else:
        u, v = u - 0.5, v - 0.5
        x0f, y0f = torch.floor(u), torch.floor(v)
        dx, dy = (u - x0f).unsqueeze(1), (v - y0f).unsqueeze(1)
        x0, y0 = x0f.long(), y0f.long()
        if code == _RESAMPLE_CODES["bilinear"]:
            rows = []
            for k in (0, 1):
                a, bb = tap(y0 + k, x0), tap(y0 + k, x0 + 1)
                rows.append(a + (bb - a) * dx)
            val = rows[0] + (rows[1] - rows[0]) * dy
        else:
            rows = [_cubic(*(tap(y0 + ky, x0 + kx) for kx in (-1, 0, 1, 2)), dx) for ky in (-1, 0, 1, 2)]
            val = _cubic(*rows, dy)
        val = val.clamp(0, 255).floor()
    fill_t = torch.tensor(fill, device=x.device, dtype=dt).view(1, c, 1, 1)
    return torch.where(inside.unsqueeze(1), val, fill_t).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# ColorJitter (torchvision, as timm builds it: brightness, contrast, saturation; hue 0)
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class ColorJitterParams:
    factors: torch.Tensor  # (N, 3) float64 brightness, contrast, saturation factors (1.0 = component disabled)
    order: torch.Tensor    # (N, 3) long permutation: order[i, k] is the component applied k-th to sample i


def _jitter_range(value: float | Sequence[float], name: str) -> tuple[float, float]:
    """torchvision ColorJitter._check_input for brightness / contrast / saturation."""
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"color jitter {name} must be non-negative, got {value}")
        return max(0.0, 1.0 - float(value)), 1.0 + float(value)
    lo, hi = (float(v) for v in value)
    if not 0.0 <= lo <= hi:
        raise ValueError(f"color jitter {name} range must satisfy 0 <= min <= max, got {value}")
    return lo, hi


def sample_color_jitter(strength: float | tuple, n: int, gen: torch.Generator) -> ColorJitterParams:
    """torchvision ``ColorJitter(*strength).get_params`` for ``n`` samples.

    ``strength`` as timm takes it: a scalar s (-> brightness = contrast = saturation = s, ranges
    [max(0, 1 - s), 1 + s]) or a 3-/4-tuple whose hue (4th) must be 0; each of the three may also be a
    (min, max) pair. The order is a uniform random permutation of the three (torchvision's randperm over four
    functions with hue skipped).
    """
    if isinstance(strength, (int, float)):
        strength = (float(strength),) * 3
    strength = tuple(strength)
    if len(strength) == 4:
        if strength[3] not in (0, 0.0, None):
            raise ValueError(f"hue jitter is not supported (got {strength[3]})")
        strength = strength[:3]
    if len(strength) != 3:
        raise ValueError(f"color jitter must be a scalar or a 3- or 4-tuple, got {strength}")
    ranges = torch.tensor([_jitter_range(s, nm) for s, nm in zip(strength, ("brightness", "contrast",
                                                                            "saturation"))], dtype=torch.float64)
    u = _uniform(gen, (n, 3))
    factors = ranges[:, 0] + (ranges[:, 1] - ranges[:, 0]) * u
    order = torch.argsort(_uniform(gen, (n, 3)), dim=1)
    return ColorJitterParams(factors=factors, order=order)


def apply_color_jitter(x: torch.Tensor, params: ColorJitterParams) -> torch.Tensor:
    """Brightness / contrast / saturation in each sample's order, with PIL semantics (torchvision's functional
    ops on PIL images, which is what timm runs): ImageEnhance blends on uint8, truncated."""
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected a (N, 3, H, W) batch, got {tuple(x.shape)}")
    fns = (_brightness, _contrast, _color)
    out = x.clone()
    factors, order = params.factors.cpu().to(torch.float64), params.order.cpu()
    for pos in range(3):
        for fn_id, fn in enumerate(fns):
            idx = torch.nonzero(order[:, pos] == fn_id).squeeze(1)
            if idx.numel() == 0:
                continue
            idx_dev = idx.to(out.device)
            out.index_copy_(0, idx_dev, fn(out.index_select(0, idx_dev), factors[idx, fn_id]))
    return out
