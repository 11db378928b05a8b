#!/usr/bin/env python3
"""Accuracy check of ``--data-pipeline gpu`` against timm's CPU pipeline on Fashion-MNIST: the same short
schedule, 3 seeds each, A2-style augmentation (RandAugment, mixup, cutmix). Writes a table and JSON.

    python benchmarks/pipeline_fmnist.py --device cpu --out benchmarks/results/pipeline_fmnist_cpu
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RECIPE = ["--model", "test_resnet", "--kd-loss", "none", "--epochs", "8", "-b", "64", "--lr", "3e-3",
          "--opt", "adamw", "--weight-decay", "0.05", "--sched", "cosine", "--warmup-epochs", "1",
          "--input-size", "3", "32", "32", "--mean", "0.5", "0.5", "0.5", "--std", "0.5", "0.5", "0.5",
          "--crop-pct", "1.0", "--interpolation", "bilinear", "--scale", "0.35", "1.0",
          "--aa", "rand-m7-mstd0.5-inc1", "--mixup", "0.1", "--cutmix", "1.0", "--smoothing", "0.0",
          "--eval-interval", "100", "--no-progress", "--log-interval", "1000", "--checkpoint-hist", "0"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/fmnist-compare")
    p.add_argument("--train-fraction", default="0.05")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", default="1")
    p.add_argument("--out", default="benchmarks/results/pipeline_fmnist_cpu")
    a = p.parse_args()
    import torch

    from vanillakd.cli.run_config import run_train_argv as run_argv
    if a.device == "cpu":
        torch.set_num_threads(1)
    out = Path(a.out)
    rows = []
    for seed in a.seeds:
        for pipeline in ("cpu", "gpu"):
            t0 = time.perf_counter()
            res = run_argv([a.data, *RECIPE, "--train-fraction", a.train_fraction, "--seed", str(seed),
                            "--data-pipeline", pipeline, "--device", a.device, "--workers", a.workers,
                            "--output", str(out / "runs"), "--experiment", f"{pipeline}-seed{seed}"])
            rows.append({"pipeline": pipeline, "seed": seed, "top1": res[0]["last"]["eval_top1"],
                         "seconds": round(time.perf_counter() - t0, 1)})
            print(rows[-1], flush=True)
    mean = {pl: statistics.mean(r["top1"] for r in rows if r["pipeline"] == pl) for pl in ("cpu", "gpu")}
    summary = {"rows": rows, "mean_top1": mean, "gap": mean["gpu"] - mean["cpu"], "recipe": RECIPE,
               "data": a.data, "train_fraction": a.train_fraction, "device": a.device,
               "command": "python " + " ".join(sys.argv)}
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = ["| seed | cpu pipeline top-1 | gpu pipeline top-1 |", "|---|---|---|"]
    for seed in a.seeds:
        t = {r["pipeline"]: r["top1"] for r in rows if r["seed"] == seed}
        lines.append(f"| {seed} | {t['cpu']:.2f} | {t['gpu']:.2f} |")
    lines.append(f"| mean | {mean['cpu']:.2f} | {mean['gpu']:.2f} |")
    (out / "results.md").write_text("\n".join(lines) + f"\n\ngap (gpu - cpu): {summary['gap']:+.2f} points\n")
    print("\n".join(lines))
    print(f"gap (gpu - cpu): {summary['gap']:+.2f} points")


if __name__ == "__main__":
    main()
