"""The prefetch loader: it owns every attribute it reads (timm's PrefetchLoader sets different ones per release),
and its batches: normalised as timm's, random erasing seeded from the stream, extras carried."""
from __future__ import annotations

import ast
import inspect
import textwrap

import pytest
import timm.data.loader as timm_loader
import torch
from timm.data.random_erasing import RandomErasing

from vanillakd.cli.run_config import run_config
from vanillakd.cli.train_args import build_train_parser
from vanillakd.data.folder import build_train_val
from vanillakd.data.loader import build_train_loader
from vanillakd.data.prefetch import ExtrasPrefetchLoader
from vanillakd.data.stream import BATCH_KEY, mix_seed, seeded

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.3, 0.4)
CPU = torch.device("cpu")


def _self_reads(cls) -> set[str]:
    """Names of the ``self.<name>`` attributes read in the methods of ``cls`` and of its bases."""
    names = set()
    for klass in cls.__mro__[:-1]:  # not object
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Load)
                  and isinstance(n.value, ast.Name) and n.value.id == "self"}
    return names


@pytest.fixture
def timm_1_0_29(monkeypatch):
    """timm's PrefetchLoader as in timm 1.0.29, which keeps its CUDA stream local to ``__iter__``."""
    original = timm_loader.PrefetchLoader.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.__dict__.pop("stream", None)

    monkeypatch.setattr(timm_loader.PrefetchLoader, "__init__", init)


@pytest.mark.parametrize("pipeline", ["cpu", "gpu"])
def test_sets_every_attribute_it_reads(tiny_data, timm_1_0_29, pipeline):
    train, _, n = build_train_val(tiny_data)
    args = build_train_parser("t", "").parse_args(["x", "-b", "4", "--workers", "0", "--reprob", "0.5",
                                                   "--data-pipeline", pipeline])
    cfg = {"input_size": (3, 32, 32), "mean": MEAN, "std": STD}
    loader = build_train_loader(train.dataset, cfg, run_config(args), n, CPU)
    missing = sorted(name for name in _self_reads(type(loader)) if not hasattr(loader, name))
    assert not missing, f"{type(loader).__name__} reads attributes it does not set: {missing}"


def _batches(n=3, keyed=True, extras=True):
    g = torch.Generator().manual_seed(0)
    out = []
    for position in range(n):
        x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=g)
        y = torch.arange(4) + position
        more = {"index": torch.arange(4) * 10 + position} if extras else {}
        if keyed:
            more[BATCH_KEY] = torch.tensor([1, 4 * position])
        out.append((x, y, more) if more else (x, y))
    return out


def _normalised(x, device=CPU):
    mean = torch.tensor([255 * m for m in MEAN], device=device).view(1, 3, 1, 1)
    std = torch.tensor([255 * s for s in STD], device=device).view(1, 3, 1, 1)
    return (x.to(device).float() - mean) / std


def test_batches_are_normalised_as_timms_and_carry_extras():
    plain = _batches(keyed=False, extras=False)
    ours = list(ExtrasPrefetchLoader(plain, MEAN, STD, device=CPU))
    timms = list(timm_loader.PrefetchLoader(plain, MEAN, STD, device=CPU))
    assert len(ours) == len(timms) == 3
    for (x, y), (tx, ty), (raw, target) in zip(ours, timms, plain):
        assert torch.equal(x, tx) and torch.equal(y, ty) and torch.equal(y, target)
        assert torch.allclose(x, _normalised(raw))
    keyed = list(ExtrasPrefetchLoader(_batches(), MEAN, STD, device=CPU))
    for (x, y, extras), (raw, target, sent) in zip(keyed, _batches()):
        assert set(extras) == {"index"} and torch.equal(extras["index"], sent["index"])
        assert torch.allclose(x, _normalised(raw)) and torch.equal(y, target)


def test_random_erasing_is_seeded_from_the_stream():
    loader = ExtrasPrefetchLoader(_batches(), MEAN, STD, device=CPU, re_prob=1.0, re_count=2, seed=5, rank=1)
    torch.manual_seed(0)
    first = list(loader)
    torch.manual_seed(1)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, loader))  # not the global RNG's
    erase = RandomErasing(probability=1.0, max_count=2, device=CPU)
    for (x, _, _), (raw, _, sent) in zip(first, _batches()):
        epoch, position = sent[BATCH_KEY].tolist()
        with seeded(mix_seed(5, 1, epoch, position, 2)):
            expected = erase(_normalised(raw))
        assert torch.equal(x, expected) and (x == 0).any()


def test_channel_stats_follow_timms_rule():
    from vanillakd.data.prefetch import channel_stats
    assert channel_stats(0.5, 3) == (0.5,) * 3
    assert channel_stats((0.2, 0.4, 0.6), 1) == pytest.approx((0.4,))
    assert channel_stats([0.1, 0.2, 0.3], 3) == (0.1, 0.2, 0.3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_side_stream_matches_cpu():
    cuda = torch.device("cuda")
    cpu = list(ExtrasPrefetchLoader(_batches(), MEAN, STD, device=CPU, re_prob=0.5, seed=3))
    loader = ExtrasPrefetchLoader(_batches(), MEAN, STD, device=cuda, re_prob=0.5, seed=3)
    streams = []
    for _ in range(2):  # one side stream for the loader's life
        got = list(loader)
        streams.append(loader.stream)
        assert isinstance(loader.stream, torch.cuda.Stream) and loader.stream is streams[0]
        for (x, y, extras), (cx, cy, cextras) in zip(got, cpu):
            assert x.is_cuda and y.is_cuda and extras["index"].is_cuda
            assert torch.allclose(x.cpu(), cx, atol=1e-6) and torch.equal(y.cpu(), cy)
            assert torch.equal(extras["index"].cpu(), cextras["index"])
