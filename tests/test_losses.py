"""Logit losses (train-kd) checked against independent float64 transcriptions of /work/shared/LOSSES.md.

The reference functions below never call vanillakd code, F.kl_div, F.softmax or F.log_softmax: softmax,
log-softmax, KL sums, BCE-with-logits and Pearson correlations are written out in float64.
"""
from __future__ import annotations

import pytest
import torch

from vanillakd.errors import UserError
from vanillakd.losses import (
    DIST,
    DKD,
    BinaryKLDiv,
    KLDiv,
    create_kd_loss,
    create_kd_loss_for,
    get_kd_loss_entry,
    list_kd_losses,
)

F64 = torch.float64
RTOL, ATOL = 1e-5, 1e-7
# keywords a loss must accept and ignore (the training script passes them to every loss)
UNRELATED = dict(feature_student=None, feature_teacher=None, epoch=3, index=None, contrastive_index=None)


# ----------------------------------------------------------------------------------------------------------
# float64 references, transcribed from LOSSES.md
# ----------------------------------------------------------------------------------------------------------

def ref_log_softmax(z: torch.Tensor) -> torch.Tensor:
    """log softmax of one row, written out (max-shifted log-sum-exp)."""
    m = z.max()
    return z - m - torch.log(torch.exp(z - m).sum())


def ref_softmax(z: torch.Tensor) -> torch.Tensor:
    e = torch.exp(z - z.max())
    return e / e.sum()


def ref_kd(z_s, z_t, T):
    """T² · mean_b Σ_k p_t,k · (log p_t,k − log p_s,k)."""
    z_s, z_t = z_s.to(F64), z_t.to(F64)
    B = z_s.shape[0]
    total = torch.zeros((), dtype=F64)
    for b in range(B):
        log_p_t = ref_log_softmax(z_t[b] / T)
        log_p_s = ref_log_softmax(z_s[b] / T)
        p_t = torch.exp(log_p_t)
        total = total + (p_t * (log_p_t - log_p_s)).sum()
    return T ** 2 * total / B


def ref_bkd(z_s, z_t):
    """mean over (b, k) of BCEWithLogits(z_s[b,k], softmax(z_t)[b,k]), BCE written out stably:
    -(p·log σ(z) + (1−p)·log(1−σ(z))) = max(z, 0) − z·p + log(1 + exp(−|z|))."""
    z_s, z_t = z_s.to(F64), z_t.to(F64)
    B, K = z_s.shape
    total = torch.zeros((), dtype=F64)
    for b in range(B):
        p = ref_softmax(z_t[b])
        z = z_s[b]
        total = total + (torch.clamp(z, min=0) - z * p + torch.log1p(torch.exp(-z.abs()))).sum()
    return total / (B * K)


def _xlog_kl(q, log_q, log_p):
    """Σ q (log q − log p), a term with q == 0 counting as 0."""
    terms = q * (log_q - log_p)
    return torch.where(q > 0, terms, torch.zeros_like(terms)).sum()


def ref_dkd_parts(z_s, z_t, target, T):
    """(TCKD, NCKD) of LOSSES.md, in float64."""
    z_s, z_t = z_s.to(F64), z_t.to(F64)
    if target.ndim == 2:
        target = target.argmax(dim=1)
    B, K = z_s.shape
    tckd = torch.zeros((), dtype=F64)
    nckd = torch.zeros((), dtype=F64)
    for b in range(B):
        G = torch.zeros(K, dtype=F64)
        G[int(target[b])] = 1.0
        p_s = ref_softmax(z_s[b] / T)
        p_t = ref_softmax(z_t[b] / T)
        b_s = torch.stack([(p_s * G).sum(), (p_s * (1 - G)).sum()])
        b_t = torch.stack([(p_t * G).sum(), (p_t * (1 - G)).sum()])
        tckd = tckd + _xlog_kl(b_t, torch.log(b_t), torch.log(b_s))
        log_q_t = ref_log_softmax(z_t[b] / T - 1000.0 * G)
        log_q_s = ref_log_softmax(z_s[b] / T - 1000.0 * G)
        q_t = ref_softmax(z_t[b] / T - 1000.0 * G)
        nckd = nckd + _xlog_kl(q_t, log_q_t, log_q_s)
    return T ** 2 * tckd / B, T ** 2 * nckd / B


def ref_dkd(z_s, z_t, target, alpha, beta, T):
    tckd, nckd = ref_dkd_parts(z_s, z_t, target, T)
    return alpha * tckd + beta * nckd


def _ref_pearson_rows(a, b, eps):
    """Pearson correlation of row i of ``a`` with row i of ``b``: cos(a − mean(a), b − mean(b)) with
    cos(u, v) = Σ u·v / (‖u‖·‖v‖ + eps), sums written out."""
    n = a.shape[1]
    a = a - a.sum(dim=1, keepdim=True) / n
    b = b - b.sum(dim=1, keepdim=True) / n
    return (a * b).sum(dim=1) / (torch.sqrt((a * a).sum(dim=1)) * torch.sqrt((b * b).sum(dim=1)) + eps)


def ref_dist_parts(z_s, z_t, tau, eps=1e-8):
    """(inter, intra) of LOSSES.md, in float64."""
    z_s, z_t = z_s.to(F64), z_t.to(F64)
    B, K = z_s.shape
    y_s = torch.stack([ref_softmax(z_s[b] / tau) for b in range(B)])
    y_t = torch.stack([ref_softmax(z_t[b] / tau) for b in range(B)])
    inter = 1 - _ref_pearson_rows(y_s, y_t, eps).sum() / B  # rows y[b, :]
    intra = 1 - _ref_pearson_rows(y_s.T, y_t.T, eps).sum() / K  # columns y[:, k]
    return inter, intra


def ref_dist(z_s, z_t, beta, gamma, tau):
    inter, intra = ref_dist_parts(z_s, z_t, tau)
    return tau ** 2 * (beta * inter + gamma * intra)


# ----------------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------------

def make_logits(seed, B, K, scale=2.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    z_s = torch.randn(B, K, generator=g, dtype=F64) * scale
    z_t = torch.randn(B, K, generator=g, dtype=F64) * scale
    target = torch.randint(0, K, (B,), generator=g)
    return z_s.to(dtype), z_t.to(dtype), target


def soft_targets(seed, B, K):
    """Mixup-like (B, K) targets: lam·onehot(a) + (1−lam)·onehot(b) plus a little smoothing, no ties."""
    g = torch.Generator().manual_seed(1000 + seed)
    a = torch.randint(0, K, (B,), generator=g)
    b = torch.randint(0, K, (B,), generator=g)
    lam = 0.55 + 0.4 * torch.rand(B, 1, generator=g)
    eye = torch.eye(K)
    t = lam * eye[a] + (1 - lam) * eye[b]
    return 0.9 * t + 0.1 * torch.rand(B, K, generator=g) / K


def f32_atol(T, weight=1.0):
    """Absolute float32 rounding of a KL-type loss: log-softmax rounds each log-probability (|log p| ~ log K)
    to half an ulp (~2.4e-7 for log K ~ 4.6) and that error enters the KL sum undamped, then is scaled by
    T² and the loss weights. Needed only where the loss itself is tiny (near-uniform distributions)."""
    return 1e-6 * T ** 2 * weight


def close(actual, expected, rtol=RTOL, atol=ATOL):
    torch.testing.assert_close(actual.to(F64), expected.to(F64), rtol=rtol, atol=atol)


def check_scalar(v, dtype=None):
    assert isinstance(v, torch.Tensor)
    assert v.ndim == 0, f"loss must be 0-dim, got shape {tuple(v.shape)}"
    assert torch.isfinite(v), f"loss not finite: {v}"
    if dtype is not None:
        assert v.dtype == dtype


SEEDS = [0, 1, 2]
SHAPES = [(2, 5), (2, 1000), (8, 100), (16, 5), (32, 1000), (7, 100)]
TEMPS = [1.0, 4.0]


# ----------------------------------------------------------------------------------------------------------
# KLDiv
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("B,K", SHAPES)
@pytest.mark.parametrize("T", TEMPS)
def test_kd_matches_reference(seed, B, K, T):
    z_s, z_t, target = make_logits(seed, B, K)
    got = KLDiv(temperature=T)(z_s=z_s, z_t=z_t, target=target, **UNRELATED)
    check_scalar(got, torch.float32)
    close(got, ref_kd(z_s, z_t, T))


@pytest.mark.parametrize("scale", [0.1, 20.0])
@pytest.mark.parametrize("T", TEMPS)
def test_kd_matches_reference_small_and_large_logits(scale, T):
    z_s, z_t, target = make_logits(5, 4, 100, scale=scale)
    got = KLDiv(temperature=T)(z_s=z_s, z_t=z_t, target=target)
    close(got, ref_kd(z_s, z_t, T), atol=f32_atol(T))


def test_kd_default_temperature_is_one():
    z_s, z_t, target = make_logits(3, 4, 10)
    close(KLDiv()(z_s=z_s, z_t=z_t, target=target), ref_kd(z_s, z_t, 1.0))


@pytest.mark.parametrize("T", TEMPS)
def test_kd_identical_logits_is_zero(T):
    z, _, target = make_logits(0, 8, 100)
    got = KLDiv(temperature=T)(z_s=z, z_t=z.clone(), target=target)
    assert abs(got.item()) < 1e-6


def test_kd_is_nonnegative_shift_invariant_and_target_independent():
    z_s, z_t, target = make_logits(4, 8, 50)
    loss = KLDiv(temperature=4.0)
    base = loss(z_s=z_s, z_t=z_t, target=target)
    assert base.item() > 0
    shift = torch.randn(8, 1) * 5  # per-row constant: softmax is unchanged
    close(loss(z_s=z_s + shift, z_t=z_t - shift, target=target), base, rtol=1e-5, atol=1e-6)
    close(loss(z_s=z_s, z_t=z_t, target=soft_targets(0, 8, 50)), base, rtol=0, atol=0)
    # not symmetric: KL(p_t || p_s) != KL(p_s || p_t) in general, and the direction is the spec's
    swapped = loss(z_s=z_t, z_t=z_s, target=target)
    close(swapped, ref_kd(z_t, z_s, 4.0))
    assert not torch.isclose(swapped, base, rtol=1e-3)


# ----------------------------------------------------------------------------------------------------------
# BinaryKLDiv
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("B,K", SHAPES)
def test_bkd_matches_reference(seed, B, K):
    z_s, z_t, target = make_logits(seed, B, K)
    got = BinaryKLDiv()(z_s=z_s, z_t=z_t, target=target, **UNRELATED)
    check_scalar(got, torch.float32)
    close(got, ref_bkd(z_s, z_t))


def test_bkd_large_logits_and_target_independent():
    z_s, z_t, target = make_logits(6, 4, 100, scale=30.0)
    loss = BinaryKLDiv()
    got = loss(z_s=z_s, z_t=z_t, target=target)
    close(got, ref_bkd(z_s, z_t))
    close(loss(z_s=z_s, z_t=z_t, target=soft_targets(1, 4, 100)), got, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------
# DKD
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("B,K", SHAPES)
@pytest.mark.parametrize("T", TEMPS)
def test_dkd_matches_reference_defaults(seed, B, K, T):
    z_s, z_t, target = make_logits(seed, B, K)
    got = DKD(temperature=T)(z_s=z_s, z_t=z_t, target=target, **UNRELATED)
    check_scalar(got, torch.float32)
    close(got, ref_dkd(z_s, z_t, target, 1.0, 2.0, T))


@pytest.mark.parametrize("alpha,beta", [(1.0, 8.0), (0.5, 0.25), (2.0, 1.0)])
@pytest.mark.parametrize("B,K", [(2, 5), (8, 100), (4, 1000)])
@pytest.mark.parametrize("T", TEMPS)
def test_dkd_matches_reference_nondefault(alpha, beta, B, K, T):
    z_s, z_t, target = make_logits(11, B, K)
    got = DKD(alpha=alpha, beta=beta, temperature=T)(z_s=z_s, z_t=z_t, target=target, epoch=7)
    close(got, ref_dkd(z_s, z_t, target, alpha, beta, T))


def test_dkd_default_args():
    z_s, z_t, target = make_logits(2, 6, 20)
    close(DKD()(z_s=z_s, z_t=z_t, target=target), ref_dkd(z_s, z_t, target, 1.0, 2.0, 1.0))


@pytest.mark.parametrize("scale", [0.1, 20.0, 60.0])
@pytest.mark.parametrize("T", TEMPS)
def test_dkd_small_and_large_logits(scale, T):
    # with scale 60 and T=1 the student's target probability underflows float32 (plain log would give -inf)
    z_s, z_t, target = make_logits(8, 6, 100, scale=scale)
    got = DKD(alpha=1.0, beta=8.0, temperature=T)(z_s=z_s, z_t=z_t, target=target)
    check_scalar(got)
    close(got, ref_dkd(z_s, z_t, target, 1.0, 8.0, T), atol=f32_atol(T, 1.0 + 8.0))


@pytest.mark.parametrize("T", TEMPS)
def test_dkd_alpha_zero_is_beta_nckd_and_beta_zero_is_alpha_tckd(T):
    z_s, z_t, target = make_logits(12, 8, 100)
    tckd, nckd = ref_dkd_parts(z_s, z_t, target, T)
    assert tckd.item() > 0 and nckd.item() > 0
    close(DKD(alpha=0.0, beta=3.0, temperature=T)(z_s=z_s, z_t=z_t, target=target), 3.0 * nckd)
    # TCKD alone is small here (K=100: the target class carries little mass), hence the float32 atol
    close(DKD(alpha=2.5, beta=0.0, temperature=T)(z_s=z_s, z_t=z_t, target=target), 2.5 * tckd,
          atol=f32_atol(T, 2.5))


def test_dkd_is_linear_in_alpha_and_beta():
    z_s, z_t, target = make_logits(13, 8, 100)
    t = DKD(alpha=1.0, beta=0.0, temperature=4.0)(z_s=z_s, z_t=z_t, target=target)
    n = DKD(alpha=0.0, beta=1.0, temperature=4.0)(z_s=z_s, z_t=z_t, target=target)
    both = DKD(alpha=0.7, beta=5.0, temperature=4.0)(z_s=z_s, z_t=z_t, target=target)
    close(both, 0.7 * t + 5.0 * n)


@pytest.mark.parametrize("T", TEMPS)
def test_dkd_identical_logits_is_zero(T):
    z, _, target = make_logits(14, 8, 100)
    got = DKD(alpha=1.0, beta=8.0, temperature=T)(z_s=z, z_t=z.clone(), target=target)
    assert abs(got.item()) < 1e-6


@pytest.mark.parametrize("K", [5, 100])
def test_dkd_depends_on_target(K):
    z_s, z_t, target = make_logits(15, 8, K)
    other = (target + 1) % K
    loss = DKD(alpha=1.0, beta=8.0, temperature=4.0)
    b = loss(z_s=z_s, z_t=z_t, target=other)
    close(b, ref_dkd(z_s, z_t, other, 1.0, 8.0, 4.0))
    # the target-class part is strongly target dependent
    tckd = DKD(alpha=1.0, beta=0.0, temperature=4.0)
    assert not torch.isclose(tckd(z_s=z_s, z_t=z_t, target=target), tckd(z_s=z_s, z_t=z_t, target=other),
                             rtol=1e-2)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("B,K", [(2, 5), (8, 100), (4, 1000)])
@pytest.mark.parametrize("T", TEMPS)
def test_dkd_2d_target_uses_argmax(seed, B, K, T):
    z_s, z_t, _ = make_logits(seed, B, K)
    soft = soft_targets(seed, B, K)
    ids = soft.argmax(dim=1)
    loss = DKD(alpha=0.5, beta=4.0, temperature=T)
    got = loss(z_s=z_s, z_t=z_t, target=soft, feature_student=None, epoch=3)
    close(got, loss(z_s=z_s, z_t=z_t, target=ids), rtol=0, atol=0)
    close(got, ref_dkd(z_s, z_t, ids, 0.5, 4.0, T))
    # the argmax, not e.g. the second class of the mix, is what counts (visible in the target-class part)
    second = soft.scatter(1, ids[:, None], -1.0).argmax(dim=1)
    tckd = DKD(alpha=1.0, beta=0.0, temperature=T)
    t_soft = tckd(z_s=z_s, z_t=z_t, target=soft)
    close(t_soft, tckd(z_s=z_s, z_t=z_t, target=ids), rtol=0, atol=0)
    assert not torch.isclose(t_soft, tckd(z_s=z_s, z_t=z_t, target=second), rtol=1e-2)


# ----------------------------------------------------------------------------------------------------------
# DIST
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("B,K", SHAPES)
@pytest.mark.parametrize("tau", TEMPS)
def test_dist_matches_reference_defaults(seed, B, K, tau):
    z_s, z_t, target = make_logits(seed, B, K)
    got = DIST(tau=tau)(z_s=z_s, z_t=z_t, target=target, **UNRELATED)
    check_scalar(got, torch.float32)
    close(got, ref_dist(z_s, z_t, 1.0, 1.0, tau))


@pytest.mark.parametrize("beta,gamma", [(2.0, 2.0), (1.0, 0.5), (0.0, 1.0), (1.0, 0.0)])
@pytest.mark.parametrize("B,K", [(2, 5), (8, 100), (4, 1000)])
@pytest.mark.parametrize("tau", TEMPS)
def test_dist_matches_reference_nondefault(beta, gamma, B, K, tau):
    z_s, z_t, target = make_logits(21, B, K)
    got = DIST(beta=beta, gamma=gamma, tau=tau)(z_s=z_s, z_t=z_t, target=target, epoch=3)
    close(got, ref_dist(z_s, z_t, beta, gamma, tau))


def test_dist_default_args():
    z_s, z_t, target = make_logits(22, 6, 20)
    close(DIST()(z_s=z_s, z_t=z_t, target=target), ref_dist(z_s, z_t, 1.0, 1.0, 1.0))


@pytest.mark.parametrize("scale", [0.1, 20.0])
@pytest.mark.parametrize("tau", TEMPS)
def test_dist_small_and_large_logits(scale, tau):
    z_s, z_t, target = make_logits(23, 6, 100, scale=scale)
    got = DIST(beta=1.0, gamma=2.0, tau=tau)(z_s=z_s, z_t=z_t, target=target)
    close(got, ref_dist(z_s, z_t, 1.0, 2.0, tau), atol=f32_atol(tau, 3.0))


def test_dist_parts_inter_intra_and_tau_squared():
    z_s, z_t, target = make_logits(24, 8, 100)
    inter, intra = ref_dist_parts(z_s, z_t, 4.0)
    assert inter.item() > 0.01 and intra.item() > 0.01
    close(DIST(beta=1.0, gamma=0.0, tau=4.0)(z_s=z_s, z_t=z_t, target=target), 16.0 * inter)
    close(DIST(beta=0.0, gamma=1.0, tau=4.0)(z_s=z_s, z_t=z_t, target=target), 16.0 * intra)
    # inter (rows) and intra (columns) really differ: the loss is not symmetric in beta / gamma
    a = DIST(beta=3.0, gamma=1.0, tau=4.0)(z_s=z_s, z_t=z_t, target=target)
    b = DIST(beta=1.0, gamma=3.0, tau=4.0)(z_s=z_s, z_t=z_t, target=target)
    assert not torch.isclose(a, b, rtol=1e-3)


def test_dist_identical_logits_is_about_zero():
    # well-conditioned case: with 1e-8 in the cosine denominator, 1 − pearson(y, y) = 1e-8 / (‖y−ȳ‖² + 1e-8)
    z, _, target = make_logits(25, 16, 5, scale=3.0)
    loss = DIST(beta=1.0, gamma=1.0, tau=1.0)
    same = loss(z_s=z, z_t=z.clone(), target=target)
    close(same, ref_dist(z, z, 1.0, 1.0, 1.0), rtol=1e-5, atol=1e-6)
    assert abs(same.item()) < 1e-4
    z2 = make_logits(26, 16, 5, scale=3.0)[0]
    assert loss(z_s=z2, z_t=z, target=target).item() > 100 * abs(same.item())


@pytest.mark.parametrize("tau", TEMPS)
def test_dist_epsilon_in_cosine_denominator(tau):
    # B=2 columns of flat probabilities over K=1000 classes: ‖a−ā‖·‖b−b̄‖ is of the order of 1e-8, so the
    # spec's 1e-8 in the cosine's denominator visibly changes intra (and DIST(z, z) is then not ~0)
    z_s, z_t, target = make_logits(28, 2, 1000, scale=1.0)
    loss = DIST(beta=0.0, gamma=1.0, tau=tau)
    got = loss(z_s=z_s, z_t=z_t, target=target)
    close(got, ref_dist(z_s, z_t, 0.0, 1.0, tau))
    for wrong_eps in (0.0, 1e-6):
        wrong = tau ** 2 * ref_dist_parts(z_s, z_t, tau, eps=wrong_eps)[1]
        assert abs(got.item() - wrong.item()) > 1e-3 * abs(wrong.item())
    same = loss(z_s=z_s, z_t=z_s.clone(), target=target)
    close(same, ref_dist(z_s, z_s, 0.0, 1.0, tau))
    assert same.item() > 1e-2


def test_dist_target_independent():
    z_s, z_t, target = make_logits(27, 8, 100)
    loss = DIST(beta=2.0, gamma=0.5, tau=4.0)
    a = loss(z_s=z_s, z_t=z_t, target=target)
    close(loss(z_s=z_s, z_t=z_t, target=soft_targets(2, 8, 100)), a, rtol=0, atol=0)
    close(loss(z_s=z_s, z_t=z_t, target=(target + 3) % 100), a, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------
# all logit losses: soft targets, half precision, gradients
# ----------------------------------------------------------------------------------------------------------

LOSSES = {
    "kd": (lambda: KLDiv(temperature=4.0), lambda s, t, y: ref_kd(s, t, 4.0)),
    "kd_T1": (lambda: KLDiv(temperature=1.0), lambda s, t, y: ref_kd(s, t, 1.0)),
    "bkd": (lambda: BinaryKLDiv(), lambda s, t, y: ref_bkd(s, t)),
    "dkd": (lambda: DKD(alpha=1.0, beta=8.0, temperature=4.0), lambda s, t, y: ref_dkd(s, t, y, 1.0, 8.0, 4.0)),
    "dkd_T1": (lambda: DKD(alpha=0.5, beta=2.0, temperature=1.0),
               lambda s, t, y: ref_dkd(s, t, y, 0.5, 2.0, 1.0)),
    "dist": (lambda: DIST(beta=2.0, gamma=2.0, tau=4.0), lambda s, t, y: ref_dist(s, t, 2.0, 2.0, 4.0)),
    "dist_T1": (lambda: DIST(beta=1.0, gamma=1.0, tau=1.0), lambda s, t, y: ref_dist(s, t, 1.0, 1.0, 1.0)),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("B,K", [(2, 5), (8, 1000)])
def test_soft_2d_target_matches_reference(name, B, K):
    make, ref = LOSSES[name]
    z_s, z_t, _ = make_logits(31, B, K)
    soft = soft_targets(31, B, K)
    got = make()(z_s=z_s, z_t=z_t, target=soft, feature_student=None, epoch=3)
    check_scalar(got, torch.float32)
    close(got, ref(z_s, z_t, soft))


# (dtype, logit scale, rtol vs the float32 loss of the unrounded inputs): about 4-5x the unit roundoff of the
# input format (float16 2^-11, bfloat16 2^-8), which bounds the relative change of each rounded logit
HALF_CASES = [
    (torch.float16, 2.0, 2e-3),
    (torch.bfloat16, 2.0, 2e-2),
    (torch.float16, 30.0, 2e-3),  # logits up to about ±60 or beyond (4-5 sigma of N(0, 30²))
    (torch.bfloat16, 30.0, 2e-2),
]


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("dtype,scale,rtol", HALF_CASES,
                         ids=[f"{str(d).split('.')[-1]}-x{s:g}" for d, s, _ in HALF_CASES])
@pytest.mark.parametrize("B,K", [(2, 100), (8, 1000)])
def test_half_precision_inputs(name, dtype, scale, rtol, B, K):
    make, ref = LOSSES[name]
    z_s32, z_t32, target = make_logits(41, B, K, scale=scale)
    if scale > 10:  # make sure both extremes are really present
        z_s32[0, 0], z_s32[0, 1], z_t32[1, 2], z_t32[1, 3] = 60.0, -60.0, 60.0, -60.0
    z_s, z_t = z_s32.to(dtype), z_t32.to(dtype)
    loss = make()
    got = loss(z_s=z_s, z_t=z_t, target=target, **UNRELATED)
    check_scalar(got)
    assert got.dtype in (torch.float32, dtype)
    # the arithmetic is float32 inside: equal to the float32 loss (and the float64 reference) of the rounded
    # inputs, so the only difference from the float32 loss is the rounding of the inputs
    close(got, loss(z_s=z_s.float(), z_t=z_t.float(), target=target), rtol=1e-6, atol=1e-7)
    close(got, ref(z_s, z_t, target), rtol=1e-5, atol=1e-6)
    close(got, loss(z_s=z_s32, z_t=z_t32, target=target), rtol=rtol, atol=1e-4)


def test_half_precision_extreme_logits_all_finite():
    # one-hot-like teacher and student whose target-class probability is exp(-120): float16/bfloat16 (and
    # even float32) softmax underflows to exactly 0
    B, K = 4, 1000
    z_s = torch.full((B, K), -60.0)
    z_t = torch.full((B, K), -60.0)
    target = torch.arange(B)
    z_s[torch.arange(B), (target + 1) % K] = 60.0
    z_t[torch.arange(B), target] = 60.0
    for dtype in (torch.float16, torch.bfloat16):
        for make, ref in LOSSES.values():
            got = make()(z_s=z_s.to(dtype), z_t=z_t.to(dtype), target=target)
            check_scalar(got)
            close(got, ref(z_s, z_t, target), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("B,K", [(2, 5), (8, 100)])
def test_gradient_flows_to_student_only(name, B, K):
    make, ref = LOSSES[name]
    z_s0, z_t, target = make_logits(51, B, K)
    z_s = z_s0.clone().requires_grad_(True)
    assert not z_t.requires_grad
    value = make()(z_s=z_s, z_t=z_t, target=target, **UNRELATED)
    assert value.requires_grad
    value.backward()
    assert z_s.grad is not None and z_s.grad.shape == z_s.shape
    assert torch.isfinite(z_s.grad).all()
    assert z_s.grad.abs().sum() > 0
    assert z_t.grad is None
    # and it is the gradient of the spec's formula (float64 autograd through the reference)
    z_ref = z_s0.to(F64).requires_grad_(True)
    ref(z_ref, z_t, target).backward()
    torch.testing.assert_close(z_s.grad.to(F64), z_ref.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gradient_finite_with_half_inputs(name, dtype):
    make, _ = LOSSES[name]
    z_s32, z_t32, target = make_logits(52, 4, 1000, scale=30.0)
    z_s = z_s32.to(dtype).requires_grad_(True)
    make()(z_s=z_s, z_t=z_t32.to(dtype), target=target).backward()
    assert z_s.grad.dtype == dtype
    assert torch.isfinite(z_s.grad).all()


# ----------------------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------------------

def test_list_kd_losses_contains_logit_losses():
    names = list_kd_losses()
    assert {"kd", "bkd", "dkd", "dist"} <= set(names)
    assert names == sorted(names)
    assert {"kd", "bkd", "dkd", "dist"} <= set(list_kd_losses(needs="logits"))
    for n in ("kd", "bkd", "dkd", "dist"):
        e = get_kd_loss_entry(n)
        assert e.needs == {"logits"} and e.kind == "logits" and not e.uses_features and not e.uses_contrast


@pytest.mark.parametrize("name,cls,kwargs", [
    ("kd", KLDiv, dict(temperature=3.0)),
    ("bkd", BinaryKLDiv, dict()),
    ("dkd", DKD, dict(alpha=0.25, beta=6.0, temperature=2.0)),
    ("dist", DIST, dict(beta=1.5, gamma=0.5, tau=3.0)),
])
def test_create_kd_loss_applies_kwargs(name, cls, kwargs):
    loss = create_kd_loss(name, **kwargs)
    assert type(loss) is cls
    for k, v in kwargs.items():
        assert getattr(loss, k) == v
    # same numbers as the directly constructed loss
    z_s, z_t, target = make_logits(61, 4, 20)
    close(loss(z_s=z_s, z_t=z_t, target=target), cls(**kwargs)(z_s=z_s, z_t=z_t, target=target), rtol=0, atol=0)


def test_create_kd_loss_values_match_reference():
    z_s, z_t, target = make_logits(62, 4, 20)
    close(create_kd_loss("kd", temperature=3.0)(z_s=z_s, z_t=z_t, target=target), ref_kd(z_s, z_t, 3.0))
    close(create_kd_loss("dkd", alpha=0.25, beta=6.0, temperature=2.0)(z_s=z_s, z_t=z_t, target=target),
          ref_dkd(z_s, z_t, target, 0.25, 6.0, 2.0))
    close(create_kd_loss("dist", beta=1.5, gamma=0.5, tau=3.0)(z_s=z_s, z_t=z_t, target=target),
          ref_dist(z_s, z_t, 1.5, 0.5, 3.0))


def test_create_kd_loss_unknown_name():
    with pytest.raises(UserError) as exc:
        create_kd_loss("nope")
    msg = str(exc.value)
    assert "nope" in msg
    assert "dkd" in msg  # names the choices


def test_create_kd_loss_for_unknown_name():
    with pytest.raises(UserError, match="nope"):
        create_kd_loss_for("nope", {"temperature": 1.0})


def _args(**overrides):
    a = dict(temperature=3.0, dkd_alpha=0.5, dkd_beta=7.0, dist_beta=1.5, dist_gamma=2.5)
    a.update(overrides)
    return a


def test_create_kd_loss_for_maps_flags():
    args = _args()
    kd = create_kd_loss_for("kd", args)
    assert type(kd) is KLDiv and kd.temperature == 3.0
    dkd = create_kd_loss_for("dkd", args)
    assert type(dkd) is DKD
    assert (dkd.alpha, dkd.beta, dkd.temperature) == (0.5, 7.0, 3.0)
    dist = create_kd_loss_for("dist", args)
    assert type(dist) is DIST
    assert (dist.beta, dist.gamma, dist.tau) == (1.5, 2.5, 3.0)
    assert type(create_kd_loss_for("bkd", args)) is BinaryKLDiv

    z_s, z_t, target = make_logits(63, 4, 20)
    close(kd(z_s=z_s, z_t=z_t, target=target), ref_kd(z_s, z_t, 3.0))
    close(dkd(z_s=z_s, z_t=z_t, target=target), ref_dkd(z_s, z_t, target, 0.5, 7.0, 3.0))
    close(dist(z_s=z_s, z_t=z_t, target=target), ref_dist(z_s, z_t, 1.5, 2.5, 3.0))


def test_create_kd_loss_for_none_and_missing_flags_keep_defaults():
    dkd = create_kd_loss_for("dkd", dict(temperature=None, dkd_alpha=None, dkd_beta=None))
    assert (dkd.alpha, dkd.beta, dkd.temperature) == (1.0, 2.0, 1.0)
    dist = create_kd_loss_for("dist", dict(temperature=2.0))
    assert (dist.beta, dist.gamma, dist.tau) == (1.0, 1.0, 2.0)


def test_create_kd_loss_for_overrides_win():
    dkd = create_kd_loss_for("dkd", _args(), alpha=4.0)
    assert (dkd.alpha, dkd.beta, dkd.temperature) == (4.0, 7.0, 3.0)
