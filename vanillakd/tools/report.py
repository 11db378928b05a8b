"""Tables and plots from finished training runs: one row per run, mean +- std per (method, fraction), top-1
against data fraction per method (the VanillaKD paper's figure), and training curves."""
from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import yaml

from ..checkpoint import atomic_write_text
from ..outputs import read_summary

RESULT_FIELDS = ["method", "model", "dataset", "fraction", "seed", "top1", "top5", "agreement", "epochs",
                 "train_images", "wall_time_s", "run_dir"]
# the flags that say which data a run trained and was evaluated on (report can keep only some of them)
DATASET_FLAGS = ("dataset", "train_split", "val_split")


def dataset_of(args: dict) -> dict:
    """A run's dataset flags from its args.yaml; the folder default is named 'folder'."""
    out = {k: args.get(k) for k in DATASET_FLAGS}
    out["dataset"] = out["dataset"] or "folder"
    return out


def _float(v) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def run_result(run_dir: Path) -> dict:
    """One training output folder (args.yaml + summary.csv) as a result row: its last evaluated epoch."""
    args = yaml.safe_load((run_dir / "args.yaml").read_text()) or {}
    rows = read_summary(run_dir / "summary.csv")
    evaluated = [r for r in rows if r.get("eval_top1")]
    last = evaluated[-1] if evaluated else (rows[-1] if rows else {})
    # a student of a multi-student run lives in student<i>-<model>-<kd loss>/
    tag = run_dir.name.split("-", 1)[1] if run_dir.name.startswith("student") and "-" in run_dir.name else None
    method = tag.rsplit("-", 1)[1] if tag else (args.get("kd_loss") or ["?"])[0]
    model = tag.rsplit("-", 1)[0] if tag else (args.get("model") or ["?"])[0]
    return {"method": method, "model": model, **dataset_of(args), "fraction": args.get("train_fraction", 1.0),
            "seed": args.get("seed"), "top1": _float(last.get("eval_top1")), "top5": _float(last.get("eval_top5")),
            "agreement": _float(last.get("eval_agreement")), "epochs": len(rows),
            "train_images": args.get("train_images"),
            "wall_time_s": round(sum(_float(r.get("train_time")) or 0 for r in rows), 1),
            "run_dir": str(run_dir)}


def find_runs(paths: Iterable[Path]) -> list[Path]:
    """Every folder below ``paths`` that holds a finished run (summary.csv and args.yaml)."""
    found = []
    for p in paths:
        p = Path(p)
        for summary in sorted(p.rglob("summary.csv")) if p.is_dir() else []:
            if (summary.parent / "args.yaml").is_file():
                found.append(summary.parent)
    return found


def write_results_csv(results: Sequence[dict], path: Path) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=RESULT_FIELDS, extrasaction="ignore")
    w.writeheader()
    w.writerows(results)
    atomic_write_text(buf.getvalue(), path)


def _mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def markdown_table(results: Sequence[dict], key: str = "top1", method_order: Sequence[str] | None = None) -> str:
    """Mean +- std (over seeds) of ``key`` per method (rows) and training fraction (columns)."""
    cells: dict[tuple[str, float], list[float]] = defaultdict(list)
    for r in results:
        if r.get(key) is not None:
            cells[(r["method"], float(r["fraction"]))].append(float(r[key]))
    fractions = sorted({f for _, f in cells})
    methods = list(method_order or []) + sorted({m for m, _ in cells} - set(method_order or []))
    head = "| method | " + " | ".join(f"{f:g} of train" for f in fractions) + " |"
    lines = [head, "|---|" + "---|" * len(fractions)]
    for m in methods:
        if not any((m, f) in cells for f in fractions):
            continue
        out = []
        for f in fractions:
            v = cells.get((m, f))
            if v:
                mean, sd = _mean_std(v)
                out.append(f"{mean:.2f} ± {sd:.2f} (n={len(v)})")
            else:
                out.append("")
        lines.append(f"| {m} | " + " | ".join(out) + " |")
    return "\n".join(lines) + "\n"


def plot_fraction(results: Sequence[dict], path: Path, title: str = "") -> None:
    """Top-1 against training-set fraction, one line per method, mean +- std over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    by_method: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        if r.get("top1") is not None:
            by_method[r["method"]][float(r["fraction"])].append(float(r["top1"]))
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for method, points in sorted(by_method.items()):
        fr = sorted(points)
        stats = [_mean_std(points[f]) for f in fr]
        ax.errorbar(fr, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3, label=method)
    ax.set_xscale("log")
    ax.set_xlabel("fraction of the training set")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title or "top-1 against training data")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_curves(run_dirs: Sequence[Path], path: Path, title: str = "") -> None:
    """Train loss and eval top-1 per epoch for each run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    for d in run_dirs:
        rows = read_summary(d / "summary.csv")
        label = d.name.split("-", 1)[-1] if d.name.startswith("student") else d.name
        a.plot([int(r["epoch"]) for r in rows], [float(r["train_loss"]) for r in rows], label=label)
        ev = [r for r in rows if r.get("eval_top1")]
        b.plot([int(r["epoch"]) for r in ev], [float(r["eval_top1"]) for r in ev], marker=".", label=label)
    a.set_xlabel("epoch"), a.set_ylabel("train loss (base + kd)"), a.grid(alpha=0.3)
    b.set_xlabel("epoch"), b.set_ylabel("val top-1 (%)"), b.grid(alpha=0.3), b.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report(paths: Sequence[Path], out_dir: Path, only: dict | None = None) -> list[dict]:
    """results.csv, results.md and curve plots for every run below ``paths``; ``only`` (dataset flags, e.g.
    ``{'dataset': 'torch/cifar100'}``) keeps the runs trained with those values."""
    from ..errors import UserError
    runs = find_runs(paths)
    if not runs:
        raise UserError(f"no finished training runs (summary.csv + args.yaml) under {', '.join(map(str, paths))}")
    wanted = {k: ("folder" if k == "dataset" and v in ("", "folder") else v) for k, v in (only or {}).items()
              if v is not None}
    results = [run_result(d) for d in runs]
    kept = [i for i, r in enumerate(results) if all(r.get(k) == v for k, v in wanted.items())]
    if not kept:
        raise UserError(f"none of the {len(runs)} runs was trained with {wanted}")
    runs, results = [runs[i] for i in kept], [results[i] for i in kept]
    out_dir.mkdir(parents=True, exist_ok=True)
    write_results_csv(results, out_dir / "results.csv")
    atomic_write_text(markdown_table(results), out_dir / "results.md")
    by_parent: dict[Path, list[Path]] = defaultdict(list)
    for d in runs:
        by_parent[d.parent if d.name.startswith("student") else d].append(d)
    for parent, dirs in sorted(by_parent.items()):
        plot_curves(dirs, out_dir / f"curves-{parent.name}.png", parent.name)
    if len({float(r["fraction"]) for r in results}) > 1:
        plot_fraction(results, out_dir / "top1_vs_fraction.png")
    return results
