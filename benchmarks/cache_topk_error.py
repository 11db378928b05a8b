#!/usr/bin/env python3
"""Measured top-k error of the teacher cache: ``vanillakd cache-teacher`` with several k over one epoch of a
real training stream, reading the L1 error of the teacher's probabilities that the cache records.

    python benchmarks/cache_topk_error.py --teacher-pretrained docs/compare-fmnist/teacher/model_best.pth.tar
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RECIPE = ["--model", "test_resnet", "--teacher", "test_resnet", "--epochs", "1", "-b", "64", "--temperature", "4",
          "--input-size", "3", "32", "32", "--mean", "0.5", "0.5", "0.5", "--std", "0.5", "0.5", "0.5",
          "--scale", "0.5", "1.0", "--color-jitter", "0", "--interpolation", "bilinear",
          "--train-interpolation", "bilinear", "--mixup", "0.1", "--cutmix", "1.0", "--no-progress", "--workers", "1"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/fmnist-compare")
    p.add_argument("--teacher-pretrained", required=True)
    p.add_argument("--train-fraction", default="0.05")
    p.add_argument("--k", type=int, nargs="+", default=[1, 2, 3, 5])
    p.add_argument("--json", default="benchmarks/results/cache_topk_error_fmnist.json")
    a = p.parse_args()
    import torch

    from vanillakd.cli.cache_teacher import main as cache_main
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in a.k:
            d = Path(tmp) / f"k{k}"
            cache_main([a.data, *RECIPE, "--teacher-pretrained", a.teacher_pretrained, "--train-fraction",
                        a.train_fraction, "--cache-dir", str(d), "--cache-topk", str(k)])
            manifest = json.loads((d / "manifest.json").read_text())
            err = manifest["error"]["0"]
            rows.append({"k": k, "bytes_per_sample": manifest["storage"]["bytes_per_sample"],
                         **{f"{name}_{stat}": err[name][stat] for name in err for stat in ("mean", "max")}})
    out = {"data": a.data, "train_fraction": a.train_fraction, "recipe": RECIPE, "rows": rows,
           "command": "python " + " ".join(sys.argv)}
    Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    print("| k | bytes/sample | L1 T=1 mean | L1 T=1 max | L1 T=4 mean | L1 T=4 max |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['k']} | {r['bytes_per_sample']} | {r['l1_T1_mean']:.2e} | {r['l1_T1_max']:.2e} | "
              f"{r['l1_T4_mean']:.2e} | {r['l1_T4_max']:.2e} |")


if __name__ == "__main__":
    main()
