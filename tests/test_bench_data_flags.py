"""``vanillakd bench --data``: --img-size and --num-images apply with --data-dir, and the rows say what they time."""
from __future__ import annotations

import json

import pytest

from conftest import make_image_folder
from vanillakd.cli import bench
from vanillakd.tools import bench_data


def _sizes(argv: list[str]):
    parser = bench.build_parser()
    a = parser.parse_args(argv)
    bench.resolve_sizes(parser, a)
    return a


def test_size_flags_apply_in_both_modes():
    a = _sizes([])
    assert (a.img_size, a.batch_size) == (32, 64)  # the step bench's defaults
    a = _sizes(["--data"])
    assert (a.data_img_size, a.data_batch_size) == (224, 64)  # the data bench's
    a = _sizes(["--data", "--img-size", "96", "--batch-size", "8"])
    assert (a.data_img_size, a.data_batch_size) == (96, 8)
    a = _sizes(["--data", "--data-img-size", "64", "--img-size", "64"])
    assert a.data_img_size == 64
    with pytest.raises(SystemExit):
        _sizes(["--data", "--img-size", "32", "--data-img-size", "64"])


def test_spread_keeps_every_class():
    samples = [(f"{c}{i}", c) for c in range(4) for i in range(10)]
    picked = bench_data.spread(samples, 8)
    assert len(picked) == 8 and {t for _, t in picked} == {0, 1, 2, 3}
    assert bench_data.spread(samples, 100) == samples


def test_data_dir_takes_num_images_and_img_size(tmp_path, monkeypatch, capsys):
    data = make_image_folder(tmp_path / "d", classes=("a", "b", "c"), per_class=(6, 1), size=48) / "train"
    seen = []
    per_worker, loader = bench_data.per_worker_rate, bench_data.end_to_end_rate

    def record_worker(dataset, cfg, data_config, pipeline, n):
        seen.append(("per worker", len(dataset), tuple(data_config["input_size"])))
        rate = per_worker(dataset, cfg, data_config, pipeline, n)
        x = dataset[0][0]  # through the training transform it set
        assert tuple(x.shape[-2:]) == (40, 40)  # cropped to the image size asked for
        return rate

    def record_loader(dataset, cfg, data_config, num_classes, device, **kw):
        seen.append(("loader", len(dataset), tuple(data_config["input_size"])))
        return loader(dataset, cfg, data_config, num_classes, device, **kw)

    monkeypatch.setattr(bench_data, "per_worker_rate", record_worker)
    monkeypatch.setattr(bench_data, "end_to_end_rate", record_loader)
    out = tmp_path / "data.json"
    argv = ["--data", "--data-dir", str(data), "--num-images", "10", "--img-size", "40", "--batch-size", "4",
            "--data-workers", "0", "--pipelines", "cpu", "--device", "cpu", "--json", str(out)]
    assert bench.main(argv) == 0
    res = json.loads(out.read_text())
    assert res["images"] == 10 and res["img_size"] == 40 and res["batch_size"] == 4
    assert seen == [("per worker", 10, (3, 40, 40)), ("loader", 10, (3, 40, 40))]
    assert [(r["stage"], r["workers"]) for r in res["rows"]] == [("per worker", 1), ("loader", 0)]
    printed = capsys.readouterr().out
    assert "end to end" not in printed and "loader" in printed
