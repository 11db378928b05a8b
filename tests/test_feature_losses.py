"""Feature / relation (train-fd) and contrastive (train-crd) losses checked against /work/shared/LOSSES.md.

The float64 references below are written out with plain torch ops (explicit sums, loops, explicit pooling,
nearest resizing, convolutions, batch norm, sigmoid, smooth-L1, NCE) and never call vanillakd code or
torch.nn.functional. Trainable weights (embeddings, ABF convolutions and batch norms) are copied from the
module under test, cast to float64. The only hard-coded expected numbers are the hand-computed CRD cases,
whose arithmetic is spelled out in comments.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vanillakd.features import FeatureShapes
from vanillakd.losses import (
    CRD,
    RKD,
    Correlation,
    FeatureKDLoss,
    ReviewKD,
    create_kd_loss_for,
    get_kd_loss_entry,
    list_kd_losses,
)
from vanillakd.losses.crd import Embed, nce_loss
from vanillakd.losses.review import ABF, hcl_loss

F64 = torch.float64
RTOL, ATOL = 1e-5, 1e-7
SEEDS = [0, 1, 2]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: on a shared, busy machine OpenMP hand-offs between threads cost ~10 ms per
    convolution / batch norm (50x the work itself), so run this module single-threaded, then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def close(actual, expected, rtol=RTOL, atol=ATOL):
    torch.testing.assert_close(torch.as_tensor(actual).to(F64), torch.as_tensor(expected).to(F64),
                               rtol=rtol, atol=atol)


def check_scalar(v, dtype=torch.float32):
    assert isinstance(v, torch.Tensor)
    assert v.ndim == 0, f"loss must be 0-dim, got shape {tuple(v.shape)}"
    assert torch.isfinite(v), f"loss not finite: {v}"
    if dtype is not None:
        assert v.dtype == dtype, v.dtype


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(g, *shape, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=g, dtype=F64) * scale).to(dtype)


def grad_close(actual, expected, rtol=1e-4):
    """float32 gradient vs float64 reference gradient: relative, with an absolute floor at the gradient's scale."""
    expected = expected.to(F64)
    close(actual, expected, rtol=rtol, atol=rtol * float(expected.abs().max()) + 1e-12)


# ==========================================================================================================
# float64 references
# ==========================================================================================================

def ref_smooth_l1(a, b):
    """mean of 0.5·x² where |x| < 1 else |x| − 0.5 (beta 1), x = a − b."""
    x = (a - b).reshape(-1)
    return torch.where(x.abs() < 1, 0.5 * x * x, x.abs() - 0.5).sum() / x.numel()


def ref_pdist(e, squared=False, eps=1e-12):
    """d²_ij = Σ_k (e_ik − e_jk)² (= ‖e_i‖² + ‖e_j‖² − 2 e_i·e_j) clamped at eps, sqrt unless squared, diag 0."""
    B = e.shape[0]
    rows = []
    for i in range(B):
        row = []
        for j in range(B):
            if i == j:
                row.append(torch.zeros((), dtype=e.dtype))
                continue
            d2 = ((e[i] - e[j]) ** 2).sum().clamp(min=eps)
            row.append(d2 if squared else torch.sqrt(d2))
        rows.append(torch.stack(row))
    return torch.stack(rows)


def ref_positive_mean(d):
    """mean of the entries that are > 0 (the mask is data only, the values keep their gradient)."""
    mask = (d > 0).to(d.dtype).detach()
    return (d * mask).sum() / mask.sum()


def ref_angles(e):
    """(B, B, B) cosines angle[i, j, k] = u_ij · u_ik with u_ij = (e_j − e_i) / ‖e_j − e_i‖ (0 when j == i)."""
    B = e.shape[0]
    diff = e.unsqueeze(0) - e.unsqueeze(1)  # diff[i, j] = e_j − e_i
    eye = torch.eye(B, dtype=torch.bool).unsqueeze(-1)
    sq = (diff * diff).sum(dim=2, keepdim=True)
    norm = torch.sqrt(torch.where(eye, torch.ones_like(sq), sq))  # avoid sqrt(0) in the graph
    u = torch.where(eye, torch.zeros_like(diff), diff / norm)
    return (u.unsqueeze(2) * u.unsqueeze(1)).sum(dim=3)  # [i, j, k] = Σ_d u[i,j,d]·u[i,k,d]


def ref_rkd(f_s, f_t, distance_weight=25.0, angle_weight=50.0, squared=False, eps=1e-12):
    f_s, f_t = f_s.reshape(f_s.shape[0], -1).to(F64), f_t.reshape(f_t.shape[0], -1).to(F64).detach()
    t_d = ref_pdist(f_t, squared, eps)
    t_d = t_d / ref_positive_mean(t_d)
    d = ref_pdist(f_s, squared, eps)
    d = d / ref_positive_mean(d)
    loss_d = ref_smooth_l1(d, t_d)
    loss_a = ref_smooth_l1(ref_angles(f_s), ref_angles(f_t))
    return distance_weight * loss_d + angle_weight * loss_a


def ref_linear(x, lin: nn.Linear):
    W, b = lin.weight.detach().to(F64), lin.bias.detach().to(F64)
    return (x.to(F64).unsqueeze(1) * W.unsqueeze(0)).sum(dim=2) + b


def ref_correlation(f_s, f_t, embed_s: nn.Linear, embed_t: nn.Linear):
    """0.02 · mean over b = 0..B−2 of Σ_j δ[b,j]·δ[b+1,j], δ = |E_s f_s − E_t f_t|."""
    f_s, f_t = f_s.reshape(f_s.shape[0], -1), f_t.reshape(f_t.shape[0], -1)
    delta = (ref_linear(f_s, embed_s) - ref_linear(f_t, embed_t)).abs()
    B = delta.shape[0]
    total = torch.zeros((), dtype=F64)
    for b in range(B - 1):
        total = total + (delta[b] * delta[b + 1]).sum()
    return 0.02 * total / (B - 1)


def ref_mse(a, b):
    return ((a - b) ** 2).sum() / a.numel()


def ref_adaptive_avg_pool(x, s):
    """Adaptive average pooling of (B, C, H, W) to s×s: reshape-mean when s divides H and W, else the
    bins [floor(i·H/s), ceil((i+1)·H/s)) written out."""
    B, C, H, W = x.shape
    if H % s == 0 and W % s == 0:
        return x.reshape(B, C, s, H // s, s, W // s).mean(dim=(3, 5))
    out = torch.zeros(B, C, s, s, dtype=x.dtype)
    for i in range(s):
        h0, h1 = (i * H) // s, -((-(i + 1) * H) // s)
        for j in range(s):
            w0, w1 = (j * W) // s, -((-(j + 1) * W) // s)
            out[:, :, i, j] = x[:, :, h0:h1, w0:w1].mean(dim=(2, 3))
    return out


def ref_hcl(fs_list, ft_list):
    total = torch.zeros((), dtype=F64)
    for fs, ft in zip(fs_list, ft_list):
        fs, ft = fs.to(F64), ft.to(F64)
        H = fs.shape[2]
        loss = ref_mse(fs, ft)
        w, tot = 1.0, 1.0
        for s in (4, 2, 1):
            if s >= H:
                continue
            w = w / 2
            loss = loss + w * ref_mse(ref_adaptive_avg_pool(fs, s), ref_adaptive_avg_pool(ft, s))
            tot += w
        total = total + loss / tot
    return total


def ref_nearest(x, size):
    """Nearest resize: out[i] = in[floor(i · in_size / out_size)]."""
    H, W = x.shape[-2:]
    oh, ow = size
    hi = torch.tensor([(i * H) // oh for i in range(oh)])
    wi = torch.tensor([(j * W) // ow for j in range(ow)])
    return x[:, :, hi][:, :, :, wi]


def ref_conv1x1(x, weight, bias=None):
    W = weight.detach().to(F64)[:, :, 0, 0]  # (out, in)
    out = (W[None, :, :, None, None] * x[:, None, :, :, :]).sum(dim=2)
    if bias is not None:
        out = out + bias.detach().to(F64)[None, :, None, None]
    return out


def ref_conv3x3_pad1(x, weight):
    W = weight.detach().to(F64)  # (out, in, 3, 3)
    B, C, H, Wd = x.shape
    xp = torch.zeros(B, C, H + 2, Wd + 2, dtype=F64)
    xp[:, :, 1:-1, 1:-1] = x
    out = torch.zeros(B, W.shape[0], H, Wd, dtype=F64)
    for dy in range(3):
        for dx in range(3):
            out = out + (W[None, :, :, dy, dx, None, None] * xp[:, None, :, dy:dy + H, dx:dx + Wd]).sum(dim=2)
    return out


def ref_bn(x, bn: nn.BatchNorm2d, train: bool):
    if train:  # batch statistics, biased variance
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    else:
        mean = bn.running_mean.to(F64)[None, :, None, None]
        var = bn.running_var.to(F64)[None, :, None, None]
    g = bn.weight.detach().to(F64)[None, :, None, None]
    b = bn.bias.detach().to(F64)[None, :, None, None]
    return (x - mean) / torch.sqrt(var + bn.eps) * g + b


def ref_sigmoid(x):
    return 1.0 / (1.0 + torch.exp(-x))


def ref_abf(abf: ABF, x, y, fuse: bool, out_shape, train: bool):
    """ABF of LOSSES.md with the module's weights: returns (conv2(x), x)."""
    x = ref_bn(ref_conv1x1(x.to(F64), abf.conv1[0].weight), abf.conv1[1], train)
    if fuse:
        y = ref_nearest(y, x.shape[-2:])
        z = ref_sigmoid(ref_conv1x1(torch.cat([x, y], dim=1), abf.att_conv[0].weight, abf.att_conv[0].bias))
        x = x * z[:, 0:1] + y * z[:, 1:2]
    if tuple(x.shape[-2:]) != tuple(out_shape):
        x = ref_nearest(x, out_shape)
    return ref_bn(ref_conv3x3_pad1(x, abf.conv2[0].weight), abf.conv2[1], train), x


def as_map(f):
    return f if f.ndim == 4 else f.reshape(f.shape[0], -1, 1, 1)


def ref_review_outputs(module: ReviewKD, feature_student, feature_teacher, train: bool):
    n = len(module.abfs)
    fs = [as_map(f).to(F64) for f in feature_student[-n:]]
    ft = [as_map(f).to(F64) for f in feature_teacher[-n:]]
    outs = [None] * n
    residual = None
    for i in range(n - 1, -1, -1):  # deepest (the pooled feature) first
        outs[i], residual = ref_abf(module.abfs[i], fs[i], residual, fuse=i < n - 1,
                                    out_shape=ft[i].shape[-2:], train=train)
    return outs, ft


def ref_review(module, feature_student, feature_teacher, epoch=None, warmup=1.0, train=False):
    outs, ft = ref_review_outputs(module, feature_student, feature_teacher, train)
    factor = 1.0 if epoch is None else min(epoch / warmup, 1.0)
    return factor * ref_hcl(outs, ft)


def ref_embed(x, embed: Embed):
    v = ref_linear(x.reshape(x.shape[0], -1), embed.linear)
    return v / torch.sqrt((v * v).sum(dim=1, keepdim=True))


def ref_nce(x, num_data, eps=1e-7):
    """−(Σ_b log(x_b0/(x_b0 + m·Pn + ε)) + Σ_b Σ_j≥1 log(m·Pn/(x_bj + m·Pn + ε))) / B, m = k, Pn = 1/N."""
    x = torch.as_tensor(x, dtype=F64)
    B, k1 = x.shape
    mpn = (k1 - 1) / num_data
    total = 0.0
    for b in range(B):
        total += math.log(float(x[b, 0]) / (float(x[b, 0]) + mpn + eps))
        for j in range(1, k1):
            total += math.log(mpn / (float(x[b, j]) + mpn + eps))
    return -total / B


def ref_crd_step(crd: CRD, M1, M2, Z, f_s, f_t, index, cidx, T, momentum):
    """One CRD call in float64: returns (loss, new M_1, new M_2, Z) with Z = (Z_s, Z_t) fixed if None."""
    v_s, v_t = ref_embed(f_s.to(F64), crd.embed_s), ref_embed(f_t.to(F64), crd.embed_t)
    B, k1 = cidx.shape
    out_s = torch.zeros(B, k1, dtype=F64)
    out_t = torch.zeros(B, k1, dtype=F64)
    for b in range(B):
        for j in range(k1):
            r = int(cidx[b, j])
            out_t[b, j] = torch.exp((M1[r] * v_t[b]).sum() / T)  # M_1 with the teacher's embedding
            out_s[b, j] = torch.exp((M2[r] * v_s[b]).sum() / T)  # M_2 with the student's embedding
    N = M1.shape[0]
    if Z is None:
        Z = (float(out_s.sum()) / out_s.numel() * N, float(out_t.sum()) / out_t.numel() * N)
    loss = ref_nce(out_s / Z[0], N) + ref_nce(out_t / Z[1], N)
    M1, M2 = M1.clone(), M2.clone()
    for b in range(B):
        i = int(index[b])
        p1 = momentum * M1[i] + (1 - momentum) * v_s[b]
        p2 = momentum * M2[i] + (1 - momentum) * v_t[b]
        M1[i] = p1 / torch.sqrt((p1 * p1).sum())
        M2[i] = p2 / torch.sqrt((p2 * p2).sum())
    return loss, M1, M2, Z


# ==========================================================================================================
# inputs
# ==========================================================================================================

def feature_lists(seed, B, s_channels, s_sizes, s_pooled, t_channels, t_sizes, t_pooled, dtype=torch.float32,
                  pooled_4d=False):
    """[maps..., pooled] for student and teacher with random values."""
    g = gen(seed)
    fs = [randn(g, B, c, h, w, dtype=dtype) for c, (h, w) in zip(s_channels, s_sizes)]
    ft = [randn(g, B, c, h, w, dtype=dtype) for c, (h, w) in zip(t_channels, t_sizes)]
    ps, pt = randn(g, B, s_pooled, dtype=dtype), randn(g, B, t_pooled, dtype=dtype)
    if pooled_4d:
        ps, pt = ps.reshape(B, s_pooled, 1, 1), pt.reshape(B, t_pooled, 1, 1)
    return fs + [ps], ft + [pt]


def pooled_pair(seed, B, D_s, D_t, dtype=torch.float32):
    g = gen(seed)
    return randn(g, B, D_s, dtype=dtype), randn(g, B, D_t, dtype=dtype)


def randomise_bn(module: nn.Module, seed: int):
    """Non-trivial BN affine parameters and running statistics, so that eval-mode BN really does something."""
    g = gen(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)


# ==========================================================================================================
# RKD
# ==========================================================================================================

RKD_SHAPES = [(2, 3, 5), (3, 8, 8), (5, 16, 32), (8, 64, 32), (16, 32, 128)]  # (B, D_s, D_t)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("B,D_s,D_t", RKD_SHAPES)
def test_rkd_matches_reference_defaults(seed, B, D_s, D_t):
    f_s, f_t = pooled_pair(seed, B, D_s, D_t)
    fs, ft = [randn(gen(99), B, 3, 4, 4), f_s], [randn(gen(98), B, 5, 2, 2), f_t]
    got = RKD()(z_s=None, z_t=None, target=None, feature_student=fs, feature_teacher=ft, epoch=2,
                index=None, contrastive_index=None)
    check_scalar(got)
    close(got, ref_rkd(f_s, f_t))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("B,D_s,D_t", [(2, 4, 4), (4, 8, 16), (9, 24, 12), (16, 32, 64)])
@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("dw,aw", [(1.0, 2.0), (0.0, 3.0), (4.0, 0.0)])
def test_rkd_matches_reference_squared_and_weights(seed, B, D_s, D_t, squared, dw, aw):
    f_s, f_t = pooled_pair(10 + seed, B, D_s, D_t)
    got = RKD(distance_weight=dw, angle_weight=aw, squared=squared)(feature_student=[f_s], feature_teacher=[f_t])
    check_scalar(got)
    close(got, ref_rkd(f_s, f_t, dw, aw, squared))
    # with B = 2 there is one distance (normalised to 1) and every cosine is 0 or 1: RKD is 0 (up to rounding)
    assert got.item() > 0 if B > 2 else abs(got.item()) < 1e-5


def test_rkd_squared_differs_from_unsquared():
    f_s, f_t = pooled_pair(3, 8, 16, 16)
    a = RKD(distance_weight=1.0, angle_weight=0.0)(feature_student=[f_s], feature_teacher=[f_t])
    b = RKD(distance_weight=1.0, angle_weight=0.0, squared=True)(feature_student=[f_s], feature_teacher=[f_t])
    close(b, ref_rkd(f_s, f_t, 1.0, 0.0, squared=True))
    assert not torch.isclose(a, b, rtol=1e-2)


def test_rkd_is_linear_in_its_weights():
    f_s, f_t = pooled_pair(4, 8, 16, 24)
    d = RKD(distance_weight=1.0, angle_weight=0.0)(feature_student=[f_s], feature_teacher=[f_t])
    a = RKD(distance_weight=0.0, angle_weight=1.0)(feature_student=[f_s], feature_teacher=[f_t])
    both = RKD()(feature_student=[f_s], feature_teacher=[f_t])
    close(both, 25 * d + 50 * a)
    close(d, ref_rkd(f_s, f_t, 1.0, 0.0))
    close(a, ref_rkd(f_s, f_t, 0.0, 1.0))


@pytest.mark.parametrize("shape", [(6, 8, 1, 1), (6, 3, 2, 2)])
def test_rkd_flattens_the_last_feature(shape):
    g = gen(5)
    f_s, f_t = randn(g, *shape), randn(g, *shape)
    got = RKD()(feature_student=[randn(g, 6, 2, 4, 4), f_s], feature_teacher=[f_t])
    close(got, ref_rkd(f_s.flatten(1), f_t.flatten(1)))


def test_rkd_uses_only_the_last_feature():
    f_s, f_t = pooled_pair(6, 8, 16, 16)
    g = gen(7)
    loss = RKD()
    a = loss(feature_student=[randn(g, 8, 4, 4, 4), f_s], feature_teacher=[randn(g, 8, 4, 2, 2), f_t])
    b = loss(feature_student=[randn(g, 8, 4, 4, 4) * 9, f_s], feature_teacher=[f_t])
    close(a, b, rtol=0, atol=0)


def test_rkd_invariances_and_zero_at_teacher():
    f_s, f_t = pooled_pair(8, 8, 16, 16)
    loss = RKD()
    base = loss(feature_student=[f_s], feature_teacher=[f_t])
    assert base.item() > 0
    # distances are normalised by their mean and angles are scale / translation free
    close(loss(feature_student=[3.0 * f_s + 0.5], feature_teacher=[f_t]), base, rtol=1e-4, atol=1e-6)
    assert abs(loss(feature_student=[f_t.clone()], feature_teacher=[f_t]).item()) < 1e-8
    # a differently sized student feature with the same relations: 2x wider copy of the teacher
    assert abs(loss(feature_student=[torch.cat([f_t, f_t], 1)], feature_teacher=[f_t]).item()) < 1e-8


@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("B,D", [(3, 4), (8, 16)])
def test_rkd_gradient_matches_reference(squared, B, D):
    # the student's mean keeps its gradient; the teacher side has none
    f_s, f_t = pooled_pair(20 + B, B, D, D)
    f_s.requires_grad_(True)
    f_t.requires_grad_(True)
    got = RKD(distance_weight=2.0, angle_weight=3.0, squared=squared)(feature_student=[f_s], feature_teacher=[f_t])
    got.backward()
    assert f_t.grad is None, "RKD's teacher side must be computed without gradient"
    x = f_s.detach().to(F64).requires_grad_(True)
    ref = ref_rkd(x, f_t.detach(), 2.0, 3.0, squared)
    ref.backward()
    close(got, ref)
    grad_close(f_s.grad, x.grad)


# ==========================================================================================================
# Correlation
# ==========================================================================================================

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("B,C_s,C_t,dim", [(2, 4, 6, 3), (3, 8, 8, 16), (7, 16, 32, 128), (16, 12, 20, 8)])
def test_correlation_matches_reference(seed, B, C_s, C_t, dim):
    torch.manual_seed(seed)
    loss = Correlation(C_s, C_t, feat_dim=dim)
    f_s, f_t = pooled_pair(30 + seed, B, C_s, C_t)
    fs, ft = [randn(gen(1), B, 2, 4, 4), f_s], [randn(gen(2), B, 3, 2, 2), f_t]
    got = loss(z_s=None, z_t=None, target=None, feature_student=fs, feature_teacher=ft, epoch=1, index=None,
               contrastive_index=None)
    check_scalar(got)
    close(got, ref_correlation(f_s, f_t, loss.embed_s, loss.embed_t))
    assert got.item() > 0


def test_correlation_default_feat_dim_and_bias():
    loss = Correlation(10, 14)
    for lin, c in ((loss.embed_s, 10), (loss.embed_t, 14)):
        assert isinstance(lin, nn.Linear) and lin.in_features == c and lin.out_features == 128
        assert lin.bias is not None
    f_s, f_t = pooled_pair(40, 5, 10, 14)
    close(loss(feature_student=[f_s], feature_teacher=[f_t]), ref_correlation(f_s, f_t, loss.embed_s, loss.embed_t))


def test_correlation_flattens_4d_pooled_and_uses_neighbours():
    torch.manual_seed(1)
    loss = Correlation(6, 9, feat_dim=5)
    f_s, f_t = pooled_pair(41, 6, 6, 9)
    got = loss(feature_student=[f_s.reshape(6, 6, 1, 1)], feature_teacher=[f_t.reshape(6, 9, 1, 1)])
    close(got, ref_correlation(f_s, f_t, loss.embed_s, loss.embed_t))
    # only consecutive batch pairs enter: reversing the batch keeps the value, a shuffle generally does not
    rev = torch.arange(5, -1, -1)
    close(loss(feature_student=[f_s[rev]], feature_teacher=[f_t[rev]]), got)
    perm = torch.tensor([0, 2, 4, 1, 3, 5])
    shuffled = loss(feature_student=[f_s[perm]], feature_teacher=[f_t[perm]])
    close(shuffled, ref_correlation(f_s[perm], f_t[perm], loss.embed_s, loss.embed_t))
    assert not torch.isclose(shuffled, got, rtol=1e-3)


def test_correlation_gradients_reach_both_embeddings():
    torch.manual_seed(2)
    loss = Correlation(6, 9, feat_dim=7)
    f_s, f_t = pooled_pair(42, 5, 6, 9)
    f_s.requires_grad_(True)
    got = loss(feature_student=[f_s], feature_teacher=[f_t])
    got.backward()
    for p in loss.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert f_s.grad is not None and f_s.grad.abs().sum() > 0
    # and the gradient w.r.t. the student feature matches the float64 reference
    x = f_s.detach().to(F64).requires_grad_(True)
    ref_correlation(x, f_t, loss.embed_s, loss.embed_t).backward()
    grad_close(f_s.grad, x.grad)


# ==========================================================================================================
# ReviewKD: hcl_loss
# ==========================================================================================================

HCL_SIZES = [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (7, 7), (8, 8), (8, 4), (16, 16)]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("hw", HCL_SIZES)
@pytest.mark.parametrize("B,C", [(2, 3), (5, 2)])
def test_hcl_single_pair_matches_reference(seed, hw, B, C):
    g = gen(50 + seed)
    fs, ft = randn(g, B, C, *hw), randn(g, B, C, *hw)
    got = hcl_loss([fs], [ft])
    check_scalar(got)
    close(got, ref_hcl([fs], [ft]))


@pytest.mark.parametrize("seed", SEEDS)
def test_hcl_sums_over_pairs(seed):
    g = gen(60 + seed)
    sizes = [(8, 8), (4, 4), (2, 2), (1, 1)]
    fs = [randn(g, 3, 4, h, w) for h, w in sizes]
    ft = [randn(g, 3, 4, h, w) for h, w in sizes]
    got = hcl_loss(fs, ft)
    close(got, ref_hcl(fs, ft))
    close(got, sum(ref_hcl([a], [b]) for a, b in zip(fs, ft)))


def test_hcl_skip_rule_by_hand_on_constant_offsets():
    # fs − ft = c (a constant map): every pooled MSE is also c², so l = c²·(1 + Σw)/(1 + Σw) = c² whatever
    # is skipped; with a per-pixel pattern whose mean is 0 the pooled terms vanish and l = c²/tot, which
    # exposes tot: H=1 → tot 1; H=2 → 1 + 1/2; H=4 → 1 + 1/2 + 1/4; H=8 → 1 + 1/2 + 1/4 + 1/8.
    for H, tot in ((1, 1.0), (2, 1.5), (4, 1.75), (8, 1.875)):
        ft = torch.zeros(2, 1, H, H)
        fs = torch.full((2, 1, H, H), 3.0)
        close(hcl_loss([fs], [ft]), 9.0)
        if H > 1:
            sign = torch.ones(H, H)
            sign[0::2, 1::2] = -1
            sign[1::2, 0::2] = -1  # checkerboard: zero mean over every 2x2 block (and every larger block)
            fs = 3.0 * sign.expand(2, 1, H, H)
            close(hcl_loss([fs], [ft]), 9.0 / tot)


def test_hcl_float16_and_bfloat16_inputs():
    g = gen(70)
    fs, ft = randn(g, 2, 3, 8, 8), randn(g, 2, 3, 8, 8)
    for dtype in (torch.float16, torch.bfloat16):
        a, b = fs.to(dtype), ft.to(dtype)
        got = hcl_loss([a], [b])
        check_scalar(got)
        close(got, ref_hcl([a], [b]))


# ==========================================================================================================
# ReviewKD: ABF structure and the full forward
# ==========================================================================================================

def review_module(seed, s_channels, s_pooled, t_channels, t_sizes, t_pooled, **kwargs):
    torch.manual_seed(seed)
    m = ReviewKD(list(s_channels) + [s_pooled], list(t_channels) + [t_pooled], list(t_sizes) + [(1, 1)], **kwargs)
    randomise_bn(m, seed)
    return m


@pytest.mark.parametrize("fuse", [False, True])
def test_abf_structure_and_init(fuse):
    torch.manual_seed(0)
    abf = ABF(24, 40, 12, fuse=fuse)
    conv1, bn1 = abf.conv1[0], abf.conv1[1]
    assert isinstance(conv1, nn.Conv2d) and conv1.kernel_size == (1, 1) and conv1.bias is None
    assert (conv1.in_channels, conv1.out_channels) == (24, 40)
    assert isinstance(bn1, nn.BatchNorm2d) and bn1.num_features == 40
    conv2, bn2 = abf.conv2[0], abf.conv2[1]
    assert isinstance(conv2, nn.Conv2d) and conv2.kernel_size == (3, 3) and conv2.bias is None
    assert conv2.padding == (1, 1) and conv2.stride == (1, 1)
    assert (conv2.in_channels, conv2.out_channels) == (40, 12)
    assert isinstance(bn2, nn.BatchNorm2d) and bn2.num_features == 12
    if fuse:
        att, sig = abf.att_conv[0], abf.att_conv[1]
        assert isinstance(att, nn.Conv2d) and att.kernel_size == (1, 1) and att.bias is not None
        assert (att.in_channels, att.out_channels) == (80, 2)
        assert isinstance(sig, nn.Sigmoid)
    else:
        assert abf.att_conv is None
        assert not any(isinstance(m, nn.Sigmoid) for m in abf.modules())
    # Kaiming-uniform with a=1: bound = gain·sqrt(3/fan_in), gain = sqrt(2/(1+a²)) = 1, i.e. sqrt(3/fan_in)
    # (torch's default a=√5 would give 1/sqrt(fan_in), 1.7x smaller)
    for conv, fan_in in ((conv1, 24), (conv2, 40 * 9)):
        bound = math.sqrt(3.0 / fan_in)
        w = conv.weight.detach().abs()
        assert w.max() <= bound + 1e-7 and w.max() > 0.9 * bound


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("x_hw,y_hw,out_hw", [((4, 4), (2, 2), (4, 4)), ((4, 4), (2, 2), (8, 8)),
                                              ((2, 2), (1, 1), (1, 1)), ((6, 6), (3, 3), (4, 4))])
@pytest.mark.parametrize("train", [False, True])
def test_abf_forward_matches_reference(seed, x_hw, y_hw, out_hw, train):
    torch.manual_seed(seed)
    abf = ABF(5, 6, 7, fuse=True)
    randomise_bn(abf, seed)
    abf.train(train)
    g = gen(80 + seed)
    x, y = randn(g, 3, 5, *x_hw), randn(g, 3, 6, *y_hw)
    out, res = abf(x, y, out_shape=out_hw)
    assert out.shape == (3, 7, *out_hw) and res.shape == (3, 6, *out_hw)
    ref_out, ref_res = ref_abf(abf, x, y.to(F64), True, out_hw, train)
    close(out, ref_out, rtol=1e-5, atol=1e-6)
    close(res, ref_res, rtol=1e-5, atol=1e-6)


def test_review_structure_mid_channel_and_fuse():
    m = ReviewKD([8, 16, 600], [12, 24, 40], [(4, 4), (2, 2), (1, 1)])
    assert len(m.abfs) == 3
    # mid = min(512, channels of the pooled (last) student feature)
    assert all(a.conv1[0].out_channels == 512 for a in m.abfs)
    assert [a.conv1[0].in_channels for a in m.abfs] == [8, 16, 600]
    assert [a.conv2[0].out_channels for a in m.abfs] == [12, 24, 40]
    # the deepest ABF (the pooled feature) has no fuse, all the others do
    assert m.abfs[-1].att_conv is None
    assert all(a.att_conv is not None for a in m.abfs[:-1])
    m2 = ReviewKD([8, 16, 32], [12, 24, 40], [(4, 4), (2, 2), (1, 1)])
    assert all(a.conv1[0].out_channels == 32 for a in m2.abfs)
    m3 = ReviewKD([8, 16, 32], [12, 24, 40], [(4, 4), (2, 2), (1, 1)], mid_channel=10)
    assert all(a.conv1[0].out_channels == 10 and a.conv2[0].in_channels == 10 for a in m3.abfs)
    assert m3.warmup_epochs == 1.0


# (student channels, student sizes, student pooled, teacher channels, teacher sizes, teacher pooled)
REVIEW_CASES = {
    "same": ([4, 6, 8], [(8, 8), (4, 4), (2, 2)], 8, [4, 6, 8], [(8, 8), (4, 4), (2, 2)], 8),
    "teacher_smaller_maps": ([3, 5, 7], [(8, 8), (4, 4), (2, 2)], 9, [6, 10, 12], [(4, 4), (2, 2), (1, 1)], 14),
    "teacher_larger_maps": ([5, 7], [(4, 4), (2, 2)], 6, [3, 9], [(8, 8), (4, 4)], 11),
    "resnet_like_7x7": ([4, 8], [(14, 14), (7, 7)], 8, [6, 12], [(7, 7), (4, 4)], 10),
}


@pytest.mark.parametrize("case", sorted(REVIEW_CASES))
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("train", [False, True])
def test_review_forward_matches_reference(case, seed, train):
    sc, ss, sp, tc, ts, tp = REVIEW_CASES[case]
    m = review_module(seed, sc, sp, tc, ts, tp)
    m.train(train)
    fs, ft = feature_lists(90 + seed, 3, sc, ss, sp, tc, ts, tp)
    got = m(z_s=None, z_t=None, target=None, feature_student=fs, feature_teacher=ft, epoch=5, index=None,
            contrastive_index=None)
    check_scalar(got)
    close(got, ref_review(m, fs, ft, train=train))


@pytest.mark.parametrize("case", sorted(REVIEW_CASES))
def test_review_abf_outputs_sized_to_teacher(case):
    sc, ss, sp, tc, ts, tp = REVIEW_CASES[case]
    m = review_module(3, sc, sp, tc, ts, tp).eval()
    fs, ft = feature_lists(95, 2, sc, ss, sp, tc, ts, tp)
    seen = {}
    hooks = [a.register_forward_hook(lambda mod, args, out, i=i: seen.__setitem__(i, out))
             for i, a in enumerate(m.abfs)]
    m(feature_student=fs, feature_teacher=ft)
    for h in hooks:
        h.remove()
    assert sorted(seen) == list(range(len(m.abfs)))
    mid = min(512, sp)
    for i, f in enumerate(ft):
        t = as_map(f)
        out, residual = seen[i]
        assert out.shape == t.shape, (i, out.shape, t.shape)
        assert residual.shape == (t.shape[0], mid, *t.shape[-2:])
    # and each output equals the float64 chain
    ref_outs, _ = ref_review_outputs(m, fs, ft, train=False)
    for i in range(len(m.abfs)):
        close(seen[i][0], ref_outs[i], rtol=1e-5, atol=1e-6)


def test_review_pooled_feature_accepted_as_4d():
    sc, ss, sp, tc, ts, tp = REVIEW_CASES["teacher_smaller_maps"]
    m = review_module(4, sc, sp, tc, ts, tp).eval()
    fs, ft = feature_lists(96, 2, sc, ss, sp, tc, ts, tp)
    fs4, ft4 = feature_lists(96, 2, sc, ss, sp, tc, ts, tp, pooled_4d=True)
    close(m(feature_student=fs4, feature_teacher=ft4), m(feature_student=fs, feature_teacher=ft), rtol=0, atol=0)


@pytest.mark.parametrize("warmup", [1.0, 2.0, 0.5])
def test_review_warmup_factor(warmup):
    sc, ss, sp, tc, ts, tp = REVIEW_CASES["teacher_smaller_maps"]
    m = review_module(5, sc, sp, tc, ts, tp, warmup_epochs=warmup).eval()
    fs, ft = feature_lists(97, 2, sc, ss, sp, tc, ts, tp)
    full = ref_review(m, fs, ft)
    assert full.item() > 0
    for epoch in (0, 0.25, 0.5, 1, 1.5, 3, 100):
        got = m(feature_student=fs, feature_teacher=ft, epoch=epoch)
        close(got, min(epoch / warmup, 1.0) * full)
        close(got, ref_review(m, fs, ft, epoch=epoch, warmup=warmup))
    assert m(feature_student=fs, feature_teacher=ft, epoch=0).item() == 0.0
    if warmup == 1.0:  # the seed's setting: nothing in epoch 0, half at epoch 0.5, full from epoch 1
        close(m(feature_student=fs, feature_teacher=ft, epoch=0.5), 0.5 * full)
        close(m(feature_student=fs, feature_teacher=ft, epoch=1), full)


def test_review_from_shapes():
    s = FeatureShapes(channels=[4, 6, 8, 10], sizes=[(16, 16), (8, 8), (4, 4), (2, 2)], pooled=10)
    t = FeatureShapes(channels=[5, 7, 9, 11], sizes=[(8, 8), (4, 4), (2, 2), (1, 1)], pooled=13)
    m = ReviewKD.from_shapes(s, t, 100, warmup_epochs=3.0)
    assert [a.conv1[0].in_channels for a in m.abfs] == [4, 6, 8, 10, 10]
    assert [a.conv2[0].out_channels for a in m.abfs] == [5, 7, 9, 11, 13]
    assert all(a.conv1[0].out_channels == 10 for a in m.abfs)
    assert m.warmup_epochs == 3.0
    randomise_bn(m, 6)
    m.eval()
    fs, ft = feature_lists(98, 2, s.channels, s.sizes, s.pooled, t.channels, t.sizes, t.pooled)
    close(m(feature_student=fs, feature_teacher=ft, epoch=6), ref_review(m, fs, ft))


def test_review_gradients_reach_student_features_and_all_abf_parameters():
    sc, ss, sp, tc, ts, tp = REVIEW_CASES["teacher_smaller_maps"]
    m = review_module(7, sc, sp, tc, ts, tp)
    fs, ft = feature_lists(99, 3, sc, ss, sp, tc, ts, tp)
    for f in fs:
        f.requires_grad_(True)
    got = m(feature_student=fs, feature_teacher=ft, epoch=1)
    got.backward()
    for f in fs:
        assert f.grad is not None and f.grad.abs().sum() > 0
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(not f.requires_grad for f in ft)


# ==========================================================================================================
# CRD
# ==========================================================================================================

def test_nce_loss_by_hand():
    # x = [[1, .5], [2, 1]]: B = 2, k = 1, num_data = 4 → m·Pn = 1/4
    # positives: log(1/(1 + .25 + ε)), log(2/(2 + .25 + ε)); noise: log(.25/(.5 + .25 + ε)), log(.25/(1 + .25 + ε))
    eps = 1e-7
    expected = -(math.log(1 / (1.25 + eps)) + math.log(2 / (2.25 + eps))
                 + math.log(0.25 / (0.75 + eps)) + math.log(0.25 / (1.25 + eps))) / 2
    got = nce_loss(torch.tensor([[1.0, 0.5], [2.0, 1.0]]), 4)
    check_scalar(got)
    close(got, expected)
    close(expected, ref_nce([[1.0, 0.5], [2.0, 1.0]], 4), rtol=1e-12, atol=0)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("B,k,N", [(1, 1, 3), (3, 4, 10), (5, 7, 1000)])
def test_nce_loss_matches_formula(seed, B, k, N):
    g = gen(110 + seed)
    x = torch.rand(B, k + 1, generator=g, dtype=F64).to(torch.float32) * 3 / N + 1e-4
    close(nce_loss(x, N), ref_nce(x, N))


def test_embed_is_linear_then_l2_normalised():
    torch.manual_seed(0)
    e = Embed(5, 7)
    assert isinstance(e.linear, nn.Linear) and e.linear.bias is not None
    x = randn(gen(120), 4, 5)
    v = e(x)
    close(v, ref_embed(x, e))
    close(v.pow(2).sum(1), torch.ones(4))


def hand_crd():
    """CRD with N=6, dim 3, k=2, T=0.5, momentum 0.5, identity embeddings and hand-set memories."""
    crd = CRD(3, 3, feat_dim=3, num_data=6, k=2, momentum=0.5, temperature=0.5)
    with torch.no_grad():
        for emb in (crd.embed_s, crd.embed_t):
            emb.linear.weight.copy_(torch.eye(3))
            emb.linear.bias.zero_()
        crd.memory_s.copy_(torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1],          # M_1
                                         [.6, .8, 0], [0, .6, .8], [.8, 0, .6]]))
        crd.memory_t.copy_(torch.tensor([[0, 0, 1], [1, 0, 0], [0, 1, 0],          # M_2
                                         [0, .6, .8], [.8, 0, .6], [.6, .8, 0]]))
    # v_s = normalise(f_s) = [(0,1,0), (0,0,-1)]; v_t = normalise(f_t) = [(0,.6,.8), (1,0,0)]
    f_s = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, -4.0]])
    f_t = torch.tensor([[0.0, 3.0, 4.0], [5.0, 0.0, 0.0]])
    return crd, f_s, f_t


def test_crd_hand_computed_two_calls():
    e, r2 = math.exp, math.sqrt(2.0)
    T, N = 0.5, 6
    crd, f_s, f_t = hand_crd()

    # ---- call 1: index = [0, 3], contrastive_index = [[0, 2, 4], [3, 1, 5]]
    # out_t[b, j] = exp(M_1[c_bj] · v_t[b] / T)
    #   b=0, v_t=(0,.6,.8): M_1[0]=(1,0,0)→0; M_1[2]=(0,0,1)→.8; M_1[4]=(0,.6,.8)→.36+.64=1
    #   b=1, v_t=(1,0,0):   M_1[3]=(.6,.8,0)→.6; M_1[1]=(0,1,0)→0; M_1[5]=(.8,0,.6)→.8
    out_t = [[e(0 / T), e(.8 / T), e(1 / T)], [e(.6 / T), e(0 / T), e(.8 / T)]]
    # out_s[b, j] = exp(M_2[c_bj] · v_s[b] / T)
    #   b=0, v_s=(0,1,0):  M_2[0]=(0,0,1)→0; M_2[2]=(0,1,0)→1; M_2[4]=(.8,0,.6)→0
    #   b=1, v_s=(0,0,-1): M_2[3]=(0,.6,.8)→-.8; M_2[1]=(1,0,0)→0; M_2[5]=(.6,.8,0)→0
    out_s = [[e(0 / T), e(1 / T), e(0 / T)], [e(-.8 / T), e(0 / T), e(0 / T)]]
    # Z = mean(out)·N over the 6 scores with N = 6, i.e. the plain sum:
    #   Z_t = 1 + e^1.6 + e^2 + e^1.2 + 1 + e^1.6,  Z_s = 1 + e^2 + 1 + e^-1.6 + 1 + 1
    Z_t = sum(map(sum, out_t)) / 6 * N
    Z_s = sum(map(sum, out_s)) / 6 * N
    assert abs(Z_t - (2 + 2 * e(1.6) + e(2) + e(1.2))) < 1e-12 and abs(Z_s - (4 + e(2) + e(-1.6))) < 1e-12
    expected1 = ref_nce([[x / Z_s for x in row] for row in out_s], N) \
        + ref_nce([[x / Z_t for x in row] for row in out_t], N)
    got1 = crd(feature_student=[f_s], feature_teacher=[f_t], index=torch.tensor([0, 3]),
               contrastive_index=torch.tensor([[0, 2, 4], [3, 1, 5]]), epoch=0, z_s=None, z_t=None, target=None)
    check_scalar(got1)
    close(got1, expected1)

    # memory update, after scoring (the scores above used the OLD rows 0 and 3):
    #   M_1[0] = normalise(.5·(1,0,0) + .5·v_s[0]=(0,1,0)) = (1,1,0)/√2
    #   M_1[3] = normalise(.5·(.6,.8,0) + .5·v_s[1]=(0,0,-1)) = (.3,.4,-.5)/√.5 = (.3,.4,-.5)·√2
    #   M_2[0] = normalise(.5·(0,0,1) + .5·v_t[0]=(0,.6,.8)) = (0,.3,.9)/√.9
    #   M_2[3] = normalise(.5·(0,.6,.8) + .5·v_t[1]=(1,0,0)) = (.5,.3,.4)/√.5 = (.5,.3,.4)·√2
    M1 = torch.tensor([[1 / r2, 1 / r2, 0], [0, 1, 0], [0, 0, 1],
                       [.3 * r2, .4 * r2, -.5 * r2], [0, .6, .8], [.8, 0, .6]], dtype=F64)
    M2 = torch.tensor([[0, .3 / math.sqrt(.9), .9 / math.sqrt(.9)], [1, 0, 0], [0, 1, 0],
                       [.5 * r2, .3 * r2, .4 * r2], [.8, 0, .6], [.6, .8, 0]], dtype=F64)
    close(crd.memory_s, M1, rtol=1e-6, atol=1e-7)
    close(crd.memory_t, M2, rtol=1e-6, atol=1e-7)

    # ---- call 2: index = [1, 5], contrastive_index = [[1, 0, 3], [5, 3, 0]], same features; Z from call 1
    #   out_t b=0, v_t=(0,.6,.8): M_1[1]=(0,1,0)→.6; M_1[0]→.6/√2; M_1[3]→(.4·.6 − .5·.8)·√2 = −.16·√2
    #   out_t b=1, v_t=(1,0,0):   M_1[5]=(.8,0,.6)→.8; M_1[3]→.3·√2; M_1[0]→1/√2
    out_t2 = [[e(.6 / T), e(.6 / r2 / T), e(-.16 * r2 / T)], [e(.8 / T), e(.3 * r2 / T), e(1 / r2 / T)]]
    #   out_s b=0, v_s=(0,1,0):  M_2[1]=(1,0,0)→0; M_2[0]→.3/√.9; M_2[3]→.3·√2
    #   out_s b=1, v_s=(0,0,-1): M_2[5]=(.6,.8,0)→0; M_2[3]→−.4·√2; M_2[0]→−.9/√.9
    out_s2 = [[e(0 / T), e(.3 / math.sqrt(.9) / T), e(.3 * r2 / T)],
              [e(0 / T), e(-.4 * r2 / T), e(-.9 / math.sqrt(.9) / T)]]
    expected2 = ref_nce([[x / Z_s for x in row] for row in out_s2], N) \
        + ref_nce([[x / Z_t for x in row] for row in out_t2], N)
    got2 = crd(feature_student=[f_s], feature_teacher=[f_t], index=torch.tensor([1, 5]),
               contrastive_index=torch.tensor([[1, 0, 3], [5, 3, 0]]))
    close(got2, expected2)
    # had Z been recomputed from the second call's scores, the value would differ:
    Z_s2, Z_t2 = sum(map(sum, out_s2)), sum(map(sum, out_t2))
    recomputed = ref_nce([[x / Z_s2 for x in row] for row in out_s2], N) \
        + ref_nce([[x / Z_t2 for x in row] for row in out_t2], N)
    assert abs(recomputed - expected2) > 1e-3 * abs(expected2)
    # and with the two Z swapped, too
    swapped = ref_nce([[x / Z_t for x in row] for row in out_s2], N) \
        + ref_nce([[x / Z_s for x in row] for row in out_t2], N)
    assert abs(swapped - expected2) > 1e-3 * abs(expected2)

    #   M_1[1] = normalise(.5·(0,1,0) + .5·(0,1,0)) = (0,1,0)
    #   M_1[5] = normalise(.5·(.8,0,.6) + .5·(0,0,-1)) = (.4,0,-.2)/√.2
    #   M_2[1] = normalise(.5·(1,0,0) + .5·(0,.6,.8)) = (.5,.3,.4)·√2
    #   M_2[5] = normalise(.5·(.6,.8,0) + .5·(1,0,0)) = (.8,.4,0)/√.8
    M1[1] = torch.tensor([0, 1, 0])
    M1[5] = torch.tensor([.4, 0, -.2], dtype=F64) / math.sqrt(.2)
    M2[1] = torch.tensor([.5, .3, .4], dtype=F64) * r2
    M2[5] = torch.tensor([.8, .4, 0], dtype=F64) / math.sqrt(.8)
    close(crd.memory_s, M1, rtol=1e-6, atol=1e-7)
    close(crd.memory_t, M2, rtol=1e-6, atol=1e-7)


def test_crd_hand_computed_embedding_weights():
    # non-identity embeddings: E_s = diag(2, 1, 1) with bias (0, 0, 1), E_t = permutation (x,y,z) → (y,z,x)
    e = math.exp
    crd, _, _ = hand_crd()
    with torch.no_grad():
        crd.embed_s.linear.weight.copy_(torch.diag(torch.tensor([2.0, 1.0, 1.0])))
        crd.embed_s.linear.bias.copy_(torch.tensor([0.0, 0.0, 1.0]))
        crd.embed_t.linear.weight.copy_(torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]))
    # f_s[0] = (2, 0, -1) → E_s f + b = (4, 0, 0) → v_s[0] = (1, 0, 0)
    # f_s[1] = (0, 3, 3)  → E_s f + b = (0, 3, 4) → v_s[1] = (0, .6, .8)
    # f_t[0] = (4, 3, 0) → (3, 0, 4) → v_t[0] = (.6, 0, .8).  f_t[1] = (0, 0, 2) → (0, 2, 0) → v_t[1] = (0, 1, 0)
    f_s = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 3.0]])
    f_t = torch.tensor([[4.0, 3.0, 0.0], [0.0, 0.0, 2.0]])
    T, N = 0.5, 6
    # index = [2, 4], contrastive_index = [[2, 0, 5], [4, 3, 3]]
    # out_t (M_1 with v_t): b=0 v_t=(.6,0,.8): M_1[2]=(0,0,1)→.8; M_1[0]=(1,0,0)→.6; M_1[5]=(.8,0,.6)→.48+.48=.96
    #                       b=1 v_t=(0,1,0):   M_1[4]=(0,.6,.8)→.6; M_1[3]=(.6,.8,0)→.8 (twice)
    out_t = [[e(.8 / T), e(.6 / T), e(.96 / T)], [e(.6 / T), e(.8 / T), e(.8 / T)]]
    # out_s (M_2 with v_s): b=0 v_s=(1,0,0):   M_2[2]=(0,1,0)→0; M_2[0]=(0,0,1)→0; M_2[5]=(.6,.8,0)→.6
    #                       b=1 v_s=(0,.6,.8): M_2[4]=(.8,0,.6)→.48; M_2[3]=(0,.6,.8)→1 (twice)
    out_s = [[e(0 / T), e(0 / T), e(.6 / T)], [e(.48 / T), e(1 / T), e(1 / T)]]
    Z_t, Z_s = sum(map(sum, out_t)), sum(map(sum, out_s))  # mean·N with 6 scores and N = 6
    expected = ref_nce([[x / Z_s for x in r] for r in out_s], N) + ref_nce([[x / Z_t for x in r] for r in out_t], N)
    got = crd(feature_student=[f_s], feature_teacher=[f_t], index=torch.tensor([2, 4]),
              contrastive_index=torch.tensor([[2, 0, 5], [4, 3, 3]]))
    close(got, expected)
    # M_1[2] = normalise(.5·(0,0,1) + .5·(1,0,0)) = (1,0,1)/√2
    # M_1[4] = normalise(.5·(0,.6,.8) + .5·(0,.6,.8)) = (0,.6,.8)
    # M_2[2] = normalise(.5·(0,1,0) + .5·(.6,0,.8)) = (.3,.5,.4)·√2 = (.6,1,.8)/√2
    # M_2[4] = normalise(.5·(.8,0,.6) + .5·(0,1,0)) = (.4,.5,.3)·√2 = (.8,1,.6)/√2
    r2 = math.sqrt(2.0)
    close(crd.memory_s[2], torch.tensor([1 / r2, 0, 1 / r2]), rtol=1e-6, atol=1e-7)
    close(crd.memory_s[4], torch.tensor([0, .6, .8]), rtol=1e-6, atol=1e-7)
    close(crd.memory_t[2], torch.tensor([.6, 1, .8]) / r2, rtol=1e-6, atol=1e-7)
    close(crd.memory_t[4], torch.tensor([.8, 1, .6]) / r2, rtol=1e-6, atol=1e-7)
    # rows not in the batch are untouched
    close(crd.memory_s[[0, 1, 3, 5]], torch.tensor([[1, 0, 0], [0, 1, 0], [.6, .8, 0], [.8, 0, .6]]), rtol=0, atol=0)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("T,momentum", [(0.07, 0.5), (0.5, 0.9)])
@pytest.mark.parametrize("B,k,N,dim,C_s,C_t", [(2, 2, 6, 4, 3, 5), (4, 5, 20, 8, 6, 10)])
def test_crd_matches_float64_reference_over_three_calls(seed, T, momentum, B, k, N, dim, C_s, C_t):
    torch.manual_seed(seed)
    crd = CRD(C_s, C_t, feat_dim=dim, num_data=N, k=k, momentum=momentum, temperature=T)
    M1, M2 = crd.memory_s.to(F64).clone(), crd.memory_t.to(F64).clone()
    Z = None
    g = gen(130 + seed)
    for _ in range(3):
        f_s, f_t = randn(g, B, C_s), randn(g, B, C_t)
        index = torch.randperm(N, generator=g)[:B]
        cidx = torch.cat([index[:, None], torch.randint(0, N, (B, k), generator=g)], dim=1)
        ref, M1, M2, Z = ref_crd_step(crd, M1, M2, Z, f_s, f_t, index, cidx, T, momentum)
        got = crd(feature_student=[randn(g, B, 2, 2, 2), f_s], feature_teacher=[f_t], index=index,
                  contrastive_index=cidx)
        check_scalar(got)
        close(got, ref, rtol=2e-5, atol=1e-6)
        close(crd.memory_s, M1, rtol=1e-5, atol=1e-6)
        close(crd.memory_t, M2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dim", [3, 128])
def test_crd_memory_init_and_buffers(dim):
    torch.manual_seed(0)
    crd = CRD(5, 7, feat_dim=dim, num_data=200)
    s = 1.0 / math.sqrt(dim / 3)
    for name in ("memory_s", "memory_t"):
        mem = getattr(crd, name)
        assert mem.shape == (200, dim)
        assert mem.min() >= -s and mem.max() <= s
        assert mem.min() < -0.9 * s and mem.max() > 0.9 * s  # spread over [−s, s], not e.g. [0, s]
        assert abs(mem.mean().item()) < 0.05 * s
        assert name in crd.state_dict(), "memory banks must be checkpointed"
        assert not any(mem is p for p in crd.parameters())
    assert not torch.equal(crd.memory_s, crd.memory_t)
    # defaults of LOSSES.md
    assert (crd.k, crd.momentum, crd.temperature) == (16384, 0.5, 0.07)
    assert crd.embed_s.linear.in_features == 5 and crd.embed_t.linear.in_features == 7
    assert crd.embed_s.linear.out_features == dim == crd.embed_t.linear.out_features


def test_crd_default_feat_dim_is_128_and_needs_num_data():
    crd = CRD(4, 6, num_data=10)
    assert crd.memory_s.shape == crd.memory_t.shape == (10, 128)
    with pytest.raises(ValueError):
        CRD(4, 6)


def test_crd_state_dict_round_trip_keeps_memory_and_z():
    torch.manual_seed(1)
    N, B, k = 12, 3, 4
    a = CRD(5, 6, feat_dim=8, num_data=N, k=k)
    g = gen(140)

    def batch():
        idx = torch.randperm(N, generator=g)[:B]
        cidx = torch.cat([idx[:, None], torch.randint(0, N, (B, k), generator=g)], 1)
        return randn(g, B, 5), randn(g, B, 6), idx, cidx

    f_s, f_t, idx, cidx = batch()
    a(feature_student=[f_s], feature_teacher=[f_t], index=idx, contrastive_index=cidx)  # fixes Z, updates memory
    torch.manual_seed(2)
    b = CRD(5, 6, feat_dim=8, num_data=N, k=k)
    assert not torch.equal(a.memory_s, b.memory_s)
    b.load_state_dict(a.state_dict())
    f_s, f_t, idx, cidx = batch()
    la = a(feature_student=[f_s], feature_teacher=[f_t], index=idx, contrastive_index=cidx)
    lb = b(feature_student=[f_s], feature_teacher=[f_t], index=idx, contrastive_index=cidx)
    close(lb, la, rtol=0, atol=0)
    close(b.memory_s, a.memory_s, rtol=0, atol=0)


def test_crd_gradients_reach_both_embeddings_and_student_not_memory():
    torch.manual_seed(3)
    N, B, k = 10, 4, 3
    crd = CRD(5, 6, feat_dim=4, num_data=N, k=k, temperature=0.2)
    g = gen(150)
    f_s, f_t = randn(g, B, 5).requires_grad_(True), randn(g, B, 6)
    idx = torch.randperm(N, generator=g)[:B]
    cidx = torch.cat([idx[:, None], torch.randint(0, N, (B, k), generator=g)], 1)
    before = crd.memory_s.clone()
    loss = crd(feature_student=[f_s], feature_teacher=[f_t], index=idx, contrastive_index=cidx)
    loss.backward()
    for name, p in crd.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert f_s.grad is not None and f_s.grad.abs().sum() > 0
    assert not crd.memory_s.requires_grad and not crd.memory_t.requires_grad
    assert not torch.equal(before, crd.memory_s)


# ==========================================================================================================
# half-precision inputs (every method's finite losses and gradients in float32 / bfloat16 / float16, under
# autocast and not: test_methods.py, parametrized over the registry)
# ==========================================================================================================

B_ALL = 4
S_CH, S_SZ, S_P = [4, 6], [(4, 4), (2, 2)], 6
T_CH, T_SZ, T_P = [5, 8], [(4, 4), (2, 2)], 10
N_ALL, K_ALL = 12, 3


def all_kwargs(dtype, seed=160):
    fs, ft = feature_lists(seed, B_ALL, S_CH, S_SZ, S_P, T_CH, T_SZ, T_P, dtype=dtype)
    for f in fs:
        f.requires_grad_(True)
    g = gen(seed)
    idx = torch.randperm(N_ALL, generator=g)[:B_ALL]
    cidx = torch.cat([idx[:, None], torch.randint(0, N_ALL, (B_ALL, K_ALL), generator=g)], 1)
    z = randn(g, B_ALL, 3, dtype=dtype)
    return dict(z_s=z, z_t=z.clone(), target=torch.zeros(B_ALL, dtype=torch.long), feature_student=fs,
                feature_teacher=ft, epoch=1.0, index=idx, contrastive_index=cidx)


def test_rkd_teacher_requiring_grad_gets_none():
    kw = all_kwargs(torch.float16, seed=190)
    for f in kw["feature_teacher"]:
        f.requires_grad_(True)
    RKD()(**kw).backward()
    assert all(f.grad is None for f in kw["feature_teacher"])


# ==========================================================================================================
# registry
# ==========================================================================================================

def test_list_kd_losses_features():
    names = list_kd_losses("features")
    for n in ("correlation", "rkd", "review", "crd"):
        assert n in names
        e = get_kd_loss_entry(n)
        assert e.kind == "features" and e.uses_features and issubclass(e.cls, FeatureKDLoss)
    for n in ("kd", "dkd", "dist"):
        assert n not in names
    assert set(names) <= set(list_kd_losses())
    assert list_kd_losses("contrast") == ["crd"]
    assert get_kd_loss_entry("crd").needs == {"features", "contrast"}
    assert get_kd_loss_entry("rkd").needs == {"features"}


STUDENT = FeatureShapes(channels=[4, 8, 16, 32], sizes=[(16, 16), (8, 8), (4, 4), (2, 2)], pooled=32)
TEACHER = FeatureShapes(channels=[6, 12, 24, 48], sizes=[(8, 8), (4, 4), (2, 2), (1, 1)], pooled=40)


def flags(**kw):
    a = dict(feat_dim=16, rkd_distance_weight=3.0, rkd_angle_weight=7.0, review_warmup_epochs=2.5, nce_k=5,
             nce_mom=0.3, nce_t=0.2)
    a.update(kw)
    return a


def test_create_kd_loss_maps_flags_and_shapes():
    args = flags()
    rkd = create_kd_loss_for("rkd", args, STUDENT, TEACHER, 50)
    assert isinstance(rkd, RKD) and (rkd.distance_weight, rkd.angle_weight) == (3.0, 7.0)
    assert rkd.squared is False

    corr = create_kd_loss_for("correlation", args, STUDENT, TEACHER, 50)
    assert isinstance(corr, Correlation)
    assert (corr.embed_s.in_features, corr.embed_s.out_features) == (32, 16)
    assert (corr.embed_t.in_features, corr.embed_t.out_features) == (40, 16)

    rev = create_kd_loss_for("review", args, STUDENT, TEACHER, 50)
    assert isinstance(rev, ReviewKD) and rev.warmup_epochs == 2.5
    assert [a.conv1[0].in_channels for a in rev.abfs] == [4, 8, 16, 32, 32]
    assert [a.conv2[0].out_channels for a in rev.abfs] == [6, 12, 24, 48, 40]
    assert all(a.conv1[0].out_channels == 32 for a in rev.abfs)  # min(512, student pooled)

    crd = create_kd_loss_for("crd", args, STUDENT, TEACHER, 50)
    assert isinstance(crd, CRD)
    assert (crd.k, crd.momentum, crd.temperature, crd.num_data) == (5, 0.3, 0.2, 50)
    assert crd.memory_s.shape == crd.memory_t.shape == (50, 16)
    assert crd.embed_s.linear.in_features == 32 and crd.embed_t.linear.in_features == 40


def test_create_kd_loss_losses_run_on_discovered_shapes():
    args = flags()
    fs, ft = feature_lists(200, 2, STUDENT.channels, STUDENT.sizes, STUDENT.pooled, TEACHER.channels,
                           TEACHER.sizes, TEACHER.pooled)
    idx = torch.tensor([3, 7])
    cidx = torch.cat([idx[:, None], torch.tensor([[1, 2, 4, 5, 6], [0, 1, 2, 8, 9]])], 1)
    kw = dict(feature_student=fs, feature_teacher=ft, epoch=10, index=idx, contrastive_index=cidx)
    rkd = create_kd_loss_for("rkd", args, STUDENT, TEACHER, 50)
    close(rkd(**kw), ref_rkd(fs[-1], ft[-1], 3.0, 7.0))
    corr = create_kd_loss_for("correlation", args, STUDENT, TEACHER, 50)
    close(corr(**kw), ref_correlation(fs[-1], ft[-1], corr.embed_s, corr.embed_t))
    rev = create_kd_loss_for("review", args, STUDENT, TEACHER, 50).eval()
    close(rev(**dict(kw, epoch=1.25)), ref_review(rev, fs, ft, epoch=1.25, warmup=2.5))
    crd = create_kd_loss_for("crd", args, STUDENT, TEACHER, 50)
    ref, *_ = ref_crd_step(crd, crd.memory_s.to(F64).clone(), crd.memory_t.to(F64).clone(), None, fs[-1], ft[-1],
                           idx, cidx, 0.2, 0.3)
    close(crd(**kw), ref, rtol=2e-5, atol=1e-6)


def test_create_kd_loss_none_flags_keep_defaults():
    args = dict(feat_dim=None, rkd_distance_weight=None, rkd_angle_weight=None, review_warmup_epochs=None,
                nce_k=None, nce_mom=None, nce_t=None)
    rkd = create_kd_loss_for("rkd", args, STUDENT, TEACHER, 20)
    assert (rkd.distance_weight, rkd.angle_weight) == (25, 50)
    corr = create_kd_loss_for("correlation", args, STUDENT, TEACHER, 20)
    assert corr.embed_s.out_features == 128
    rev = create_kd_loss_for("review", args, STUDENT, TEACHER, 20)
    assert rev.warmup_epochs == 1.0
    crd = create_kd_loss_for("crd", args, STUDENT, TEACHER, 20)
    assert (crd.k, crd.momentum, crd.temperature) == (16384, 0.5, 0.07)
    assert crd.memory_s.shape == (20, 128)


def test_create_kd_loss_feature_loss_needs_shapes():
    with pytest.raises(ValueError):
        create_kd_loss_for("rkd", flags(), None, None, 10)
