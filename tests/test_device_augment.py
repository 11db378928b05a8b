"""vanillakd.data.device_augment against timm's PIL transforms: sampling distributions and per-op outputs."""
from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from timm.data import auto_augment as timm_aa
from timm.data import create_transform
from timm.data.transforms import RandomResizedCropAndInterpolation

from vanillakd.data.device_augment import (
    RAND_INCREASING_TRANSFORMS,
    RAND_TRANSFORMS,
    ColorJitterParams,
    CropParams,
    RandAugmentConfig,
    RandAugmentParams,
    apply_color_jitter,
    apply_rand_augment,
    crop_resize,
    sample_color_jitter,
    sample_crop,
    sample_interpolation,
    sample_rand_augment,
)

torch.set_num_threads(1)

KS_C_0001 = math.sqrt(-0.5 * math.log(0.001 / 2))  # two-sample KS critical constant for alpha = 0.001 (1.9495)
CHI2_0001 = {2: 13.816, 5: 20.515, 14: 36.123}  # chi-square critical values at alpha = 0.001 by degrees of freedom
FILL = (124, 116, 104)  # timm's img_mean for the ImageNet mean
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
SIGNED = GEOMETRIC + ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing")
ALL_OPS = tuple(dict.fromkeys(RAND_TRANSFORMS + RAND_INCREASING_TRANSFORMS))
PIL_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def natural_image(h: int = 64, w: int = 64, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients, a disc, a rectangle and mild noise: HWC uint8."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([xx / w * 200 + 20, yy / h * 180 + 40, (xx + yy) / (h + w) * 120 + 90], -1)
    img[(yy - 0.3 * h) ** 2 + (xx - 0.6 * w) ** 2 < (0.15 * min(h, w)) ** 2] = (230, 40, 60)
    img[int(0.6 * h):int(0.85 * h), int(0.12 * w):int(0.45 * w)] = (30, 200, 80)
    img += np.random.default_rng(seed).normal(0, 6, img.shape)
    return img.clip(0, 255).astype(np.uint8)


def to_tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a)).permute(2, 0, 1).contiguous()


def ks_2samp(a, b) -> float:
    """Two-sample Kolmogorov-Smirnov statistic sup |F_a - F_b|."""
    a, b = np.sort(np.asarray(a, dtype=np.float64)), np.sort(np.asarray(b, dtype=np.float64))
    grid = np.concatenate([a, b])
    return float(np.max(np.abs(np.searchsorted(a, grid, side="right") / a.size
                               - np.searchsorted(b, grid, side="right") / b.size)))


def ks_critical(n: int, m: int) -> float:
    return KS_C_0001 * math.sqrt((n + m) / (n * m))


def ks_1samp(x, cdf) -> float:
    x = np.sort(np.asarray(x, dtype=np.float64))
    f = cdf(x)
    n = x.size
    return float(max(np.max(np.arange(1, n + 1) / n - f), np.max(f - np.arange(n) / n)))


def binomial_ok(count: int, n: int, p: float, z: float = 4.5) -> bool:
    return abs(count - n * p) <= z * math.sqrt(n * p * (1 - p)) + 1e-9


def chi2(counts, expected) -> float:
    counts, expected = np.asarray(counts, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    return float(((counts - expected) ** 2 / expected).sum())


# ------------------------------------------------------------------------------------------------ sample_crop
H_IMG, W_IMG = 375, 500


def _crop_stats(boxes):
    """area fraction, log aspect ratio, relative top / left offsets of (i, j, h, w) boxes."""
    b = np.asarray(boxes, dtype=np.float64)
    i, j, h, w = b.T

    def rel(pos, free):
        return np.where(free > 0, (pos + 0.5) / (free + 1), 0.5)

    return {"area": h * w / (H_IMG * W_IMG), "log_ratio": np.log(w / h),
            "top": rel(i, H_IMG - h), "left": rel(j, W_IMG - w)}


def _timm_boxes(n, scale, ratio, seed=0):
    random.seed(seed)
    img = torch.empty((3, H_IMG, W_IMG), dtype=torch.uint8)
    return [RandomResizedCropAndInterpolation.get_params(img, scale, ratio) for _ in range(n)]


def _our_boxes(n, scale, ratio, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p = sample_crop(H_IMG, W_IMG, scale, ratio, 0.5, 0.0, gen)
        out.append((p.top, p.left, p.height, p.width))
    return out


@pytest.mark.parametrize("scale,ratio", [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.3, 1.0), (1 / 4, 4.0))])
def test_sample_crop_follows_timm_distribution(scale, ratio):
    n = 5000
    ours, theirs = _crop_stats(_our_boxes(n, scale, ratio)), _crop_stats(_timm_boxes(n, scale, ratio))
    crit = ks_critical(n, n)
    for key in ours:
        d = ks_2samp(ours[key], theirs[key])
        assert d < crit, f"{key}: KS D={d:.4f} >= {crit:.4f} (scale={scale}, ratio={ratio})"


def test_crop_ks_has_power_against_a_wrong_sampler():
    """The KS check above rejects an aspect ratio drawn uniformly instead of log-uniformly."""
    n, scale, ratio = 5000, (0.3, 1.0), (1 / 4, 4.0)
    rng = np.random.default_rng(0)
    wrong = []
    while len(wrong) < n:
        area = rng.uniform(*scale) * H_IMG * W_IMG
        ar = rng.uniform(*ratio)
        w, h = round(math.sqrt(area * ar)), round(math.sqrt(area / ar))
        if w <= W_IMG and h <= H_IMG:
            wrong.append(math.log(w / h))
    ours = _crop_stats(_our_boxes(n, scale, ratio))["log_ratio"]
    assert ks_2samp(ours, wrong) > ks_critical(n, n)


def test_sample_crop_boxes_fit_and_replay():
    a, b = _our_boxes(500, (0.08, 1.0), (3 / 4, 4 / 3), seed=3), _our_boxes(500, (0.08, 1.0), (3 / 4, 4 / 3), seed=3)
    assert a == b
    assert a != _our_boxes(500, (0.08, 1.0), (3 / 4, 4 / 3), seed=4)
    for i, j, h, w in a:
        assert 0 <= i and 0 <= j and h >= 1 and w >= 1 and i + h <= H_IMG and j + w <= W_IMG


@pytest.mark.parametrize("hflip,vflip", [(0.5, 0.2), (0.0, 1.0)])
def test_sample_crop_flip_probabilities(hflip, vflip):
    n = 20000
    gen = torch.Generator().manual_seed(1)
    ps = [sample_crop(H_IMG, W_IMG, (0.08, 1.0), (3 / 4, 4 / 3), hflip, vflip, gen) for _ in range(n)]
    nh, nv = sum(p.hflip for p in ps), sum(p.vflip for p in ps)
    assert binomial_ok(nh, n, hflip), nh
    assert binomial_ok(nv, n, vflip), nv
    both = sum(p.hflip and p.vflip for p in ps)
    assert binomial_ok(both, n, hflip * vflip), both  # independent coins


@pytest.mark.parametrize("scale,ratio", [((0.9, 1.0), (4.4, 6.0)), ((0.9, 1.0), (0.1, 0.17)),
                                         ((1.5, 2.0), (3 / 4, 4 / 3))])
def test_sample_crop_fallback_matches_timm(scale, ratio):
    """No attempt can fit: timm's centred fallback (whole image, aspect ratio clamped into ``ratio``). The ratios
    are chosen so that the fallback side needs rounding (500 / 4.4 = 113.6, 375 * 0.17 = 63.75)."""
    ours = set(_our_boxes(50, scale, ratio))
    theirs = set(_timm_boxes(50, scale, ratio))
    assert len(ours) == 1 and ours == theirs
    i, j, h, w = ours.pop()
    if ratio[0] > W_IMG / H_IMG:
        assert (w, h) == (W_IMG, round(W_IMG / ratio[0])) and i == (H_IMG - h) // 2
    elif ratio[1] < W_IMG / H_IMG:
        assert (h, w) == (H_IMG, round(H_IMG * ratio[1])) and j == (W_IMG - w) // 2
    else:
        assert (i, j, h, w) == (0, 0, H_IMG, W_IMG)


def test_sample_interpolation():
    gen = torch.Generator().manual_seed(0)
    picks = [sample_interpolation("random", gen) for _ in range(4000)]
    assert set(picks) == {"bilinear", "bicubic"}
    assert binomial_ok(picks.count("bicubic"), 4000, 0.5)
    assert sample_interpolation("bicubic", gen) == "bicubic"
    with pytest.raises(ValueError):
        sample_interpolation("lanczos", gen)


# ------------------------------------------------------------------------------------------------ crop_resize
def test_crop_resize_shape_dtype_range():
    imgs = [to_tensor(natural_image(40, 60, 0)), to_tensor(natural_image(70, 30, 1))]
    params = [CropParams(5, 7, 20, 30, False, False), CropParams(0, 0, 70, 30, True, True)]
    out = crop_resize(imgs, params, (24, 16), ["bilinear", "bicubic"])
    assert out.shape == (2, 3, 24, 16) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 255 and torch.equal(out, out.round())


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_crop_resize_whole_image_equals_interpolate(mode):
    img = to_tensor(natural_image(50, 70))
    out = crop_resize([img], [CropParams(0, 0, 50, 70, False, False)], (32, 40), mode)
    ref = F.interpolate(img[None].float(), size=(32, 40), mode=mode, antialias=True, align_corners=False)
    assert torch.equal(out, ref.clamp(0, 255).round())


def test_crop_resize_flips_mirror():
    img = to_tensor(natural_image(50, 70))
    box = (3, 9, 40, 50)
    plain = crop_resize([img], [CropParams(*box, False, False)], (24, 24))[0]
    h = crop_resize([img], [CropParams(*box, True, False)], (24, 24))[0]
    v = crop_resize([img], [CropParams(*box, False, True)], (24, 24))[0]
    assert torch.equal(h, plain.flip(2)) and torch.equal(v, plain.flip(1))
    assert not torch.equal(h, plain)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_crop_resize_agrees_with_pil(mode):
    """Same box through torchvision's PIL resized_crop (what timm runs): mean abs error < 0.35 (measured
    <= 0.21: PIL resamples in fixed point, torch in float), max abs error <= 2."""
    a = natural_image(75, 100, seed=2)
    img = to_tensor(a)
    gen = torch.Generator().manual_seed(0)
    pil_mode = TF.InterpolationMode.BILINEAR if mode == "bilinear" else TF.InterpolationMode.BICUBIC
    for size in ((32, 32), (150, 120)):  # down- and up-scaling
        for _ in range(8):
            p = sample_crop(75, 100, (0.08, 1.0), (3 / 4, 4 / 3), 0.5, 0.5, gen)
            ref = TF.resized_crop(Image.fromarray(a), p.top, p.left, p.height, p.width, list(size), pil_mode)
            if p.hflip:
                ref = TF.hflip(ref)
            if p.vflip:
                ref = TF.vflip(ref)
            err = (crop_resize([img], [p], size, mode)[0] - to_tensor(np.asarray(ref)).float()).abs()
            assert err.mean() < 0.35 and err.max() <= 2, (size, p, err.mean().item(), err.max().item())


def test_crop_resize_rejects_bad_input():
    img = to_tensor(natural_image(20, 20))
    with pytest.raises(ValueError):
        crop_resize([img], [CropParams(0, 0, 30, 10, False, False)], (8, 8))
    with pytest.raises(ValueError):
        crop_resize([img.float()], [CropParams(0, 0, 10, 10, False, False)], (8, 8))
    with pytest.raises(ValueError):
        crop_resize([img], [CropParams(0, 0, 10, 10, False, False)], (8, 8), "random")


# ------------------------------------------------------------------------------------------------ config parsing
def _timm_rand_augment(config_str, img_size=224, mean=(0.485, 0.456, 0.406), interpolation="random"):
    tf = create_transform(img_size, is_training=True, auto_augment=config_str, mean=mean,
                          interpolation=interpolation)
    return next(t for t in tf.transforms if isinstance(t, timm_aa.RandAugment))


@pytest.mark.parametrize("config_str", ["rand-m9-mstd0.5-inc1", "rand-m7-mstd0.5", "rand-m9-n3-mstd1-mmax10",
                                        "rand-m6-mstd0.5-inc1-p0.3", "rand-mstd101", "rand-m12-mmax15-n1"])
def test_config_from_timm_matches_timm_pipeline(config_str):
    mean = (0.48145466, 0.4578275, 0.40821073)
    cfg = RandAugmentConfig.from_timm(config_str, 176, mean)
    ra = _timm_rand_augment(config_str, 176, mean)
    op0 = ra.ops[0]
    assert cfg.ops == tuple(op.name for op in ra.ops)
    assert cfg.num_ops == ra.num_layers and ra.choice_weights is None
    assert cfg.magnitude == op0.magnitude and cfg.prob == op0.prob
    assert cfg.magnitude_std == op0.magnitude_std
    assert cfg.magnitude_max == (op0.magnitude_max or 10)
    assert cfg.fill == tuple(op0.kwargs["fillcolor"])
    assert cfg.translate_pct == op0.hparams.get("translate_pct", 0.45)
    assert cfg.interpolation == "random" and isinstance(op0.kwargs["resample"], tuple)


def test_config_from_timm_fixed_interpolation():
    cfg = RandAugmentConfig.from_timm("rand-m9-mstd0.5", 224, (0.5, 0.5, 0.5), interpolation="bicubic")
    assert cfg.interpolation == "bicubic" and cfg.fill == (128, 128, 128)
    assert _timm_rand_augment("rand-m9-mstd0.5", interpolation="bicubic").ops[3].kwargs["resample"] == Image.BICUBIC


@pytest.mark.parametrize("bad", ["augmix-m5", "v0", "rand-m9-tweights", "rand-t3a", "rand-m9-x3", "rand-m9-foo",
                                 "rand-m9.5", "rand-mstdx"])
def test_config_from_timm_refuses(bad):
    with pytest.raises(ValueError) as e:
        RandAugmentConfig.from_timm(bad, 224, (0.485, 0.456, 0.406))
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------ sample_rand_augment
def _cfg(**kw):
    base = {"num_ops": 2, "magnitude": 9.0, "magnitude_std": 0.5, "magnitude_max": 10.0,
            "ops": RAND_INCREASING_TRANSFORMS, "prob": 0.5, "fill": FILL, "translate_pct": 0.45}
    base.update(kw)
    return RandAugmentConfig(**base)


def test_sample_rand_augment_op_choice_and_coins():
    n = 20000
    cfg = _cfg()
    p = sample_rand_augment(cfg, n, torch.Generator().manual_seed(0))
    assert p.op_index.shape == (n, 2) and p.op_index.dtype == torch.long
    counts = torch.bincount(p.op_index.flatten(), minlength=15).numpy()
    assert chi2(counts, np.full(15, 2 * n / 15)) < CHI2_0001[14], counts
    # with replacement: both slots pick the same op 1/15 of the time
    assert binomial_ok(int((p.op_index[:, 0] == p.op_index[:, 1]).sum()), n, 1 / 15)
    assert binomial_ok(int(p.applied.sum()), 2 * n, 0.5)
    assert binomial_ok(int(p.sign.sum()), 2 * n, 0.5)
    assert p.bicubic is not None and binomial_ok(int(p.bicubic.sum()), 2 * n, 0.5)
    q = sample_rand_augment(_cfg(prob=0.2), n, torch.Generator().manual_seed(1))
    assert binomial_ok(int(q.applied.sum()), 2 * n, 0.2)
    assert sample_rand_augment(_cfg(interpolation="bilinear"), 4, torch.Generator()).bicubic is None


def test_sample_rand_augment_replays_from_seed():
    a = sample_rand_augment(_cfg(), 64, torch.Generator().manual_seed(5))
    b = sample_rand_augment(_cfg(), 64, torch.Generator().manual_seed(5))
    c = sample_rand_augment(_cfg(), 64, torch.Generator().manual_seed(6))
    for f in ("op_index", "magnitude", "applied", "sign", "bicubic"):
        assert torch.equal(getattr(a, f), getattr(b, f))
    assert not torch.equal(a.magnitude, c.magnitude)


def _normal_cdf(x, mu, sd):
    return 0.5 * (1 + np.vectorize(math.erf)((x - mu) / (sd * math.sqrt(2))))


def test_sample_rand_augment_magnitude_gaussian():
    n = 10000
    m = sample_rand_augment(_cfg(magnitude=5.0, magnitude_std=1.0), n, torch.Generator().manual_seed(0)).magnitude
    x = m.flatten().numpy()
    assert ks_1samp(x, lambda v: _normal_cdf(v, 5.0, 1.0)) < KS_C_0001 / math.sqrt(x.size)
    assert abs(x.mean() - 5.0) < 0.03 and abs(x.std() - 1.0) < 0.03


def test_sample_rand_augment_magnitude_clipping():
    n = 10000
    m = sample_rand_augment(_cfg(magnitude=9.5, magnitude_std=1.0), n,
                            torch.Generator().manual_seed(0)).magnitude.flatten()
    assert float(m.max()) == 10.0 and float(m.min()) >= 0
    assert binomial_ok(int((m == 10.0).sum()), 2 * n, 1 - 0.5 * (1 + math.erf(0.5 / math.sqrt(2))))
    low = sample_rand_augment(_cfg(magnitude=0.5, magnitude_std=1.0), n, torch.Generator().manual_seed(0))
    assert binomial_ok(int((low.magnitude == 0).sum()), 2 * n, 0.5 * (1 + math.erf(-0.5 / math.sqrt(2))))
    high = sample_rand_augment(_cfg(magnitude=14.0, magnitude_std=2.0, magnitude_max=15.0), n,
                               torch.Generator().manual_seed(0)).magnitude
    assert float(high.max()) == 15.0 and (high > 10).float().mean() > 0.9
    fixed = sample_rand_augment(_cfg(magnitude=12.0, magnitude_std=0.0), 10, torch.Generator()).magnitude
    assert torch.all(fixed == 10.0)  # timm clips even a noiseless M > 10 unless mmax is raised


def test_sample_rand_augment_magnitude_uniform():
    """timm: mstd > 100 (inf) samples U(0, M)."""
    cfg = RandAugmentConfig.from_timm("rand-m9-mstd101", 224, (0.485, 0.456, 0.406))
    x = sample_rand_augment(cfg, 10000, torch.Generator().manual_seed(0)).magnitude.flatten().numpy()
    assert x.min() >= 0 and x.max() < 9.0
    assert ks_1samp(x, lambda v: np.clip(v / 9.0, 0, 1)) < KS_C_0001 / math.sqrt(x.size)


# ------------------------------------------------------------------------------------------------ apply_rand_augment
# Per-op tolerance on the mean abs error against timm's AugmentOp on PIL (0-255 scale), and the measured value.
# All ops reproduce Pillow's uint8 arithmetic, so the measured error is 0 on CPU; the geometric tolerance leaves
# room for a 1-level rounding flip on a few pixels (float64 summation order on other devices).
TOLERANCE = {name: 0.01 for name in ALL_OPS} | {name: 0.02 for name in GEOMETRIC}


def _timm_op(name, m, negate, resample, img: np.ndarray, monkeypatch) -> np.ndarray:
    hparams = {"translate_const": int(64 * 0.45), "img_mean": FILL, "interpolation": PIL_RESAMPLE[resample]}
    op = timm_aa.AugmentOp(name, prob=1.0, magnitude=m, hparams=hparams)
    # _randomly_negate negates when random.random() > 0.5; prob=1 and mstd=0 draw nothing else
    monkeypatch.setattr(timm_aa.random, "random", lambda: 0.9 if negate else 0.1)
    out = np.asarray(op(Image.fromarray(img)))
    monkeypatch.undo()
    return out


@pytest.mark.parametrize("name", ALL_OPS)
def test_op_matches_timm_pil(name, monkeypatch):
    img = natural_image(64, 64)
    mags = (3.0, 8.0)  # PosterizeIncreasing keeps 3 and 1 bits there (0 bits: test_posterize_zero_bits_is_black)
    negs = (False, True) if name in SIGNED else (False,)
    resamples = ("bilinear", "bicubic") if name in GEOMETRIC else ("bilinear",)
    cases = list(itertools.product(mags, negs, resamples))
    n = len(cases)
    cfg = _cfg(num_ops=1, ops=(name,), prob=1.0, interpolation="random")
    params = RandAugmentParams(
        op_index=torch.zeros((n, 1), dtype=torch.long),
        magnitude=torch.tensor([[c[0]] for c in cases], dtype=torch.float64),
        applied=torch.ones((n, 1), dtype=torch.bool),
        sign=torch.tensor([[c[1]] for c in cases]),
        bicubic=torch.tensor([[c[2] == "bicubic"] for c in cases]),
    )
    x = to_tensor(img).float()[None].repeat(n, 1, 1, 1)
    out = apply_rand_augment(x, cfg, params)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.equal(out, out.round()) and out.min() >= 0 and out.max() <= 255
    for k, (m, neg, resample) in enumerate(cases):
        ref = to_tensor(_timm_op(name, m, neg, resample, img, monkeypatch)).float()
        err = (out[k] - ref).abs()
        assert err.mean() <= TOLERANCE[name], (name, m, neg, resample, err.mean().item())
        assert err.max() <= 1, (name, m, neg, resample, err.max().item())
    if name not in ("AutoContrast", "Equalize", "Invert"):  # magnitude-free ops aside, magnitudes matter
        assert not torch.equal(out[0], out[-1])


@pytest.mark.parametrize("name", GEOMETRIC)
def test_geometric_nearest_matches_pil(name, monkeypatch):
    """timm's fixed 'nearest' train interpolation: PIL's NEAREST affine (16.16 fixed point for shear / rotate,
    double coordinates for translations). Magnitude 4 on ShearY puts many samples exactly on pixel edges."""
    img = natural_image(48, 56, seed=3)
    cfg = _cfg(num_ops=1, ops=(name,), prob=1.0, interpolation="nearest")
    params = RandAugmentParams(torch.zeros((2, 1), dtype=torch.long), torch.tensor([[4.0], [9.0]]).double(),
                               torch.ones((2, 1), dtype=torch.bool), torch.tensor([[False], [True]]))
    out = apply_rand_augment(to_tensor(img).float()[None].repeat(2, 1, 1, 1), cfg, params)
    for k, (m, neg) in enumerate(((4.0, False), (9.0, True))):
        ref = to_tensor(_timm_op(name, m, neg, "nearest", img, monkeypatch)).float()
        assert (out[k] - ref).abs().mean() <= 0.02, name  # measured 0


def test_posterize_zero_bits_is_black():
    """Deviation: Pillow >= 10 raises for 0 bits (timm's PosterizeIncreasing at M >= 10); we return black,
    which is what Pillow < 10 did (i & ~255)."""
    img = to_tensor(natural_image(16, 16)).float()[None]
    cfg = _cfg(num_ops=1, ops=("PosterizeIncreasing", "Posterize"), prob=1.0)
    params = RandAugmentParams(torch.tensor([[0], [1]]), torch.tensor([[10.0], [1.0]]).double(),
                               torch.ones((2, 1), dtype=torch.bool), torch.zeros((2, 1), dtype=torch.bool))
    out = apply_rand_augment(img.repeat(2, 1, 1, 1), cfg, params)
    assert torch.all(out == 0)


@pytest.mark.parametrize("name", ["AutoContrast", "Equalize", "Contrast", "Sharpness"])
def test_degenerate_images_match_pil(name, monkeypatch):
    """Flat and two-level images hit the 'identity' branches of autocontrast / equalize."""
    flat = np.full((9, 11, 3), 77, dtype=np.uint8)
    two = flat.copy()
    two[0, 0] = (200, 77, 3)
    cfg = _cfg(num_ops=1, ops=(name,), prob=1.0)
    for a in (flat, two):
        p = RandAugmentParams(torch.zeros((1, 1), dtype=torch.long), torch.full((1, 1), 7.0, dtype=torch.float64),
                              torch.ones((1, 1), dtype=torch.bool), torch.zeros((1, 1), dtype=torch.bool))
        out = apply_rand_augment(to_tensor(a).float()[None], cfg, p)[0]
        assert torch.equal(out, to_tensor(_timm_op(name, 7.0, False, "bilinear", a, monkeypatch)).float())


def test_unapplied_ops_leave_samples_untouched():
    x = torch.stack([to_tensor(natural_image(32, 32, s)).float() for s in range(4)])
    x0 = x.clone()
    cfg = _cfg(ops=RAND_TRANSFORMS)
    params = sample_rand_augment(cfg, 4, torch.Generator().manual_seed(0))
    params.applied[:] = torch.tensor([[False, False], [True, False], [False, False], [True, True]])
    params.op_index[:] = torch.tensor([[2, 3], [2, 0], [9, 11], [3, 9]])
    out = apply_rand_augment(x, cfg, params)
    assert torch.equal(x, x0)  # input not modified
    assert torch.equal(out[0], x[0]) and torch.equal(out[2], x[2])
    assert torch.equal(out[1], 255 - x[1])  # Invert
    assert not torch.equal(out[3], x[3])


def test_batch_samples_get_their_own_op_sequences(monkeypatch):
    """A mixed batch (different ops, magnitudes, signs, filters, apply flags per sample and slot) equals
    running each sample's ops in order through timm's PIL AugmentOps."""
    n = 10
    imgs = [natural_image(40, 48, seed=s) for s in range(n)]
    cfg = _cfg(num_ops=3, ops=RAND_INCREASING_TRANSFORMS, prob=0.7, magnitude=7.0, magnitude_std=2.0)
    params = sample_rand_augment(cfg, n, torch.Generator().manual_seed(11))
    params.op_index[:, 0] = torch.arange(n) % 15  # make sure many ops appear in slot 0
    params.op_index[:, 1] = 14 - torch.arange(n) % 15
    params.op_index[0, 1] = 4  # PosterizeIncreasing: keep its bits >= 1 so that Pillow 13 accepts it
    params.magnitude[0, 1] = 6.0
    out = apply_rand_augment(torch.stack([to_tensor(a).float() for a in imgs]), cfg, params)
    for i in range(n):
        pil = Image.fromarray(imgs[i])
        for s in range(3):
            if not params.applied[i, s]:
                continue
            name = cfg.ops[int(params.op_index[i, s])]
            m = float(params.magnitude[i, s])
            if name == "PosterizeIncreasing" and 4 - int(m / 10 * 4) < 1:
                pil = Image.new("RGB", pil.size, 0)  # our documented black (Pillow 13 raises)
                continue
            resample = "bicubic" if params.bicubic[i, s] else "bilinear"
            pil = Image.fromarray(_timm_op(name, m, bool(params.sign[i, s]), resample, np.asarray(pil), monkeypatch))
        ref = to_tensor(np.asarray(pil)).float()
        assert (out[i] - ref).abs().mean() <= 0.02, i
    assert len({tuple(o.flatten()[:50].tolist()) for o in out}) == n


def test_apply_rand_augment_rejects_mismatched_params():
    cfg = _cfg()
    params = sample_rand_augment(cfg, 3, torch.Generator())
    with pytest.raises(ValueError):
        apply_rand_augment(torch.zeros((4, 3, 8, 8)), cfg, params)
    with pytest.raises(ValueError):
        _cfg(ops=("Rotate", "Cutout"))


# ------------------------------------------------------------------------------------------------ color jitter
def test_sample_color_jitter_ranges_and_order():
    n = 12000
    p = sample_color_jitter(0.4, n, torch.Generator().manual_seed(0))
    assert p.factors.shape == (n, 3) and p.order.shape == (n, 3) and p.order.dtype == torch.long
    f = p.factors.numpy()
    assert f.min() >= 0.6 and f.max() <= 1.4 and f.min() < 0.601 and f.max() > 1.399
    for c in range(3):
        assert ks_1samp(f[:, c], lambda v: np.clip((v - 0.6) / 0.8, 0, 1)) < KS_C_0001 / math.sqrt(n)
    assert torch.equal(p.order.sort(dim=1).values, torch.arange(3).expand(n, 3))
    perms = {perm: k for k, perm in enumerate(itertools.permutations(range(3)))}
    counts = np.bincount([perms[tuple(r)] for r in p.order.tolist()], minlength=6)
    assert chi2(counts, np.full(6, n / 6)) < CHI2_0001[5], counts
    q = sample_color_jitter((0.0, 1.5, (0.2, 0.3)), 500, torch.Generator().manual_seed(0)).factors
    assert torch.all(q[:, 0] == 1.0) and q[:, 1].min() >= 0 and q[:, 1].max() <= 2.5
    assert q[:, 2].min() >= 0.2 and q[:, 2].max() <= 0.3
    with pytest.raises(ValueError):
        sample_color_jitter((0.4, 0.4, 0.4, 0.1), 2, torch.Generator())


def test_apply_color_jitter_equals_torchvision_on_pil():
    """timm runs torchvision's ColorJitter on PIL images: adjust_brightness / contrast / saturation there."""
    tv = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    imgs = [natural_image(30, 36, seed=s) for s in range(6)]
    perms = list(itertools.permutations(range(3)))
    params = ColorJitterParams(
        factors=torch.tensor([[0.6, 1.4, 0.83], [1.27, 0.7, 1.31], [1.0, 1.0, 0.61], [0.93, 1.12, 1.39],
                              [1.4, 0.6, 1.0], [0.77, 0.88, 0.99]], dtype=torch.float64),
        order=torch.tensor(perms))
    out = apply_color_jitter(torch.stack([to_tensor(a).float() for a in imgs]), params)
    for i, a in enumerate(imgs):
        pil = Image.fromarray(a)
        for fn in perms[i]:
            pil = tv[fn](pil, float(params.factors[i, fn]))
        assert torch.equal(out[i], to_tensor(np.asarray(pil)).float()), i


# ------------------------------------------------------------------------------------------------ whole pipeline
def _pipeline(seed: int, device: str = "cpu") -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    imgs = [to_tensor(natural_image(h, w, s)).to(device) for s, (h, w) in enumerate([(50, 70), (64, 48), (40, 40)])]
    crops = [sample_crop(im.shape[1], im.shape[2], (0.08, 1.0), (3 / 4, 4 / 3), 0.5, 0.0, gen) for im in imgs]
    modes = [sample_interpolation("random", gen) for _ in imgs]
    x = crop_resize(imgs, crops, (32, 32), modes)
    cfg = RandAugmentConfig.from_timm("rand-m9-mstd0.5-inc1", 32, (0.485, 0.456, 0.406))
    x = apply_rand_augment(x, cfg, sample_rand_augment(cfg, len(imgs), gen))
    return apply_color_jitter(x, sample_color_jitter(0.4, len(imgs), gen))


def test_pipeline_replays_from_seed():
    a, b, c = _pipeline(0), _pipeline(0), _pipeline(1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (3, 3, 32, 32) and torch.equal(a, a.round()) and a.min() >= 0 and a.max() <= 255


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    """Parameters are host-side, so a device only changes floating-point details: resizing (float32 kernels)
    may flip a rounding on a few pixels; the RandAugment / ColorJitter ops are bit-identical."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    imgs = [to_tensor(natural_image(64 + 7 * s, 80 - 5 * s, s)) for s in range(8)]
    crops = [sample_crop(im.shape[1], im.shape[2], (0.08, 1.0), (3 / 4, 4 / 3), 0.5, 0.0, gen) for im in imgs]
    modes = [sample_interpolation("random", gen) for _ in imgs]
    x_cpu = crop_resize(imgs, crops, (48, 48), modes)
    x_gpu = crop_resize([im.to(gpu) for im in imgs], crops, (48, 48), modes)
    diff = (x_gpu.cpu() - x_cpu).abs()
    assert diff.max() <= 1 and diff.mean() < 0.01
    x = x_cpu.repeat(4, 1, 1, 1)
    for cfg_str in ("rand-m9-mstd0.5-inc1-n3-p1.0", "rand-m7-mstd0.5-n3-p1.0"):
        cfg = RandAugmentConfig.from_timm(cfg_str, 48, (0.485, 0.456, 0.406))
        params = sample_rand_augment(cfg, x.shape[0], gen)
        assert torch.equal(apply_rand_augment(x.to(gpu), cfg, params).cpu(), apply_rand_augment(x.to(cpu), cfg, params))
    cj = sample_color_jitter(0.4, x.shape[0], gen)
    assert torch.equal(apply_color_jitter(x.to(gpu), cj).cpu(), apply_color_jitter(x, cj))
