"""report's grouping, table text and figures, on hand-made run folders (args.yaml + summary.csv, no training)."""
from __future__ import annotations

import csv
import sys

import pytest
import yaml
from PIL import Image

from vanillakd.cli import report as report_cli
from vanillakd.tools.report import kd_gaps, method_color, pct, run_result


def fake_run(folder, *, model="test_resnet", method="kd", fraction=1.0, seed=0, top1=50.0, epochs=3,
             teacher="resnet18", data_dir="/data/a", lr=1e-3, train_images=400, teacher_top1=80.0):
    """A finished run's folder as train-kd leaves it (only what report reads)."""
    folder.mkdir(parents=True)
    args = {"data_dir": data_dir, "dataset": "", "train_split": "train", "val_split": "validation",
            "train_fraction": fraction, "train_subset_seed": seed, "seed": seed, "model": [model],
            "kd_loss": [method], "teacher": teacher, "teacher_pretrained": "/w/t.pth", "lr": [lr], "epochs": epochs,
            "output": str(folder.parent), "experiment": folder.name, "log_interval": 50, "train_images": train_images}
    (folder / "args.yaml").write_text(yaml.safe_dump(args))
    with open(folder / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "lr", "train_loss", "eval_loss", "eval_top1", "eval_top5", "eval_agreement",
                    "train_time"])
        for e in range(epochs):
            w.writerow([e, lr, 2.0 - e * 0.3, 1.0, top1 - 2 * (epochs - 1 - e), 90, top1 + 5, 1.5])
    (folder / "log.txt").write_text(f"2026-01-01 00:00:00,000 teacher: top1 {teacher_top1:.2f} top5 99 on the val "
                                    "set\n")
    return folder


def table_rows(path):
    return [line for line in path.read_text().splitlines() if line.startswith("| ") and "method" not in line]


def test_report_keeps_unlike_runs_apart(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs / "a0", seed=0, top1=60.0)
    fake_run(runs / "a1", seed=1, top1=62.0)
    fake_run(runs / "small", seed=0, top1=20.0, fraction=0.2, train_images=80)  # 400 vs 80 images: two columns
    fake_run(runs / "other-model", model="resnet10t", seed=0, top1=30.0)
    fake_run(runs / "other-data", data_dir="/data/b", seed=0, top1=40.0)
    fake_run(runs / "other-teacher", teacher="resnet50", seed=0, top1=45.0, teacher_top1=85.0)
    fake_run(runs / "other-lr", lr=1e-2, seed=0, top1=10.0)
    assert report_cli.main([str(runs), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "results.md").read_text()
    assert "| model | teacher | data | recipe | method | 20% of train | 100% of train |" in md
    rows = table_rows(tmp_path / "rep" / "results.md")
    top1 = rows[:len(rows) // 2]  # the top-1 table, then the agreement table
    assert len(top1) == 5 and sum("(n=2)" in r for r in top1) == 1
    pooled = next(r for r in top1 if "(n=2)" in r)
    assert "| test_resnet | resnet18 | /data/a |" in pooled and "| 20.00 (n=1) | 61.00 ± 1.41 (n=2) |" in pooled
    assert any(r.startswith("| resnet10t | resnet18 | /data/a |") and r.endswith("| 30.00 (n=1) |") for r in top1)
    assert any("| /data/b |" in r for r in top1) and any("| resnet50 |" in r for r in top1)
    assert not [c for r in rows for c in r.split("|") if "(n=1)" in c and "±" in c]
    assert "The recipes differ in:" in md and "lr=0.01" in md
    assert "Teacher top-1 on the same val set: resnet18 80.00, resnet50 85.00" in md
    result = list(csv.DictReader(open(tmp_path / "rep" / "results.csv")))
    assert len(result) == 7 and {r["model"] for r in result} == {"test_resnet", "resnet10t"}
    assert len({r["recipe_id"] for r in result}) == 2
    for png in ("top1_vs_fraction.png", "curves-a0.png"):
        with Image.open(tmp_path / "rep" / png) as im:
            assert im.format == "PNG"
    assert not (tmp_path / "rep" / "kd_gap_vs_fraction.png").exists()  # kd alone: no gap


def test_students_of_one_run_take_their_own_list_values(tmp_path):
    """A multi-student run's args.yaml holds every student's values: each student's recipe is its own."""
    cell = tmp_path / "cell"
    for i, method in enumerate(("kd", "dkd")):
        d = fake_run(cell / f"student{i}-test_resnet-{method}", method=method)
        args = yaml.safe_load((d / "args.yaml").read_text())
        args.update(model=["test_resnet"] * 2, kd_loss=["kd", "dkd"], lr=[1e-3, 1e-3], kd_loss_weight=[1.0, 2.0])
        (d / "args.yaml").write_text(yaml.safe_dump(args))
    a, b = run_result(cell / "student0-test_resnet-kd"), run_result(cell / "student1-test_resnet-dkd")
    assert (a["method"], b["method"]) == ("kd", "dkd") and a["_recipe"]["kd_loss_weight"] == 1.0
    assert b["_recipe"]["kd_loss_weight"] == 2.0 and a["recipe_id"] != b["recipe_id"]
    assert a["teacher_top1"] == 80.0


def test_gap_figure_and_fixed_colours(tmp_path):
    runs = tmp_path / "runs"
    for f, images in ((0.05, 300), (0.5, 3000)):
        for seed in (0, 1, 2):
            for method, top1 in (("none", 50), ("kd", 60), ("dkd", 58), ("dist", 63)):
                fake_run(runs / f"f{f}-s{seed}-{method}", method=method, fraction=f, seed=seed, train_images=images,
                         top1=top1 + seed + (f == 0.5) * 10 + (method == "dkd") * seed, epochs=1 if f == 0.05 else 4)
    assert report_cli.main([str(runs), "--out", str(tmp_path / "rep")]) == 0
    results = [run_result(d) for d in sorted(runs.iterdir())]
    gaps = {(other, f): v for (_, other), per in kd_gaps(results).items() for f, v in per.items()}
    assert gaps[("dkd", 0.05)] == [2.0, 1.0, 0.0] and gaps[("dist", 0.5)] == [-3.0] * 3
    for png in ("top1_vs_fraction.png", "kd_gap_vs_fraction.png", "curves-f0.05-s0-kd.png"):
        with Image.open(tmp_path / "rep" / png) as im:
            assert im.format == "PNG"
    assert pct(0.005) == "0.5%" and pct(1) == "100%" and pct(0.3333) == "33.33%"
    assert method_color("kd") != method_color("dkd") and method_color("my_loss") == method_color("my_loss")


def test_report_without_matplotlib(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    fake_run(tmp_path / "runs" / "a")
    assert report_cli.main([str(tmp_path / "runs"), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "results.csv").is_file() and not list((tmp_path / "rep").glob("*.png"))
    assert capsys.readouterr().err.count("pip install matplotlib") == 1


@pytest.mark.parametrize("fraction, header", [(1.0, "100% of train"), (0.015, "1.5% of train")])
def test_fraction_headers(tmp_path, fraction, header):
    fake_run(tmp_path / "runs" / "a", fraction=fraction)
    assert report_cli.main([str(tmp_path / "runs"), "--out", str(tmp_path / "rep")]) == 0
    assert header in (tmp_path / "rep" / "results.md").read_text()
