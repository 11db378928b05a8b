"""Tables and plots from finished training runs: one row per run; mean +- std over seeds per (model, teacher, data,
recipe, method) and training fraction; top-1 against data fraction per method (the VanillaKD paper's figure), the
vanilla-KD gap to DKD / DIST per fraction (the paper's bars), and training curves.

Runs are pooled only when everything but the seed agrees: the student model, the teacher (and its weights file),
the data (folder, dataset and splits), the fraction, the method and the recipe (every other flag in args.yaml that
can change a result, shown as a short id). Plots need matplotlib; without it the tables are still written and one
log line says how to get the plots.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import fields
from pathlib import Path

import yaml

from ..checkpoint import atomic_write, atomic_write_text, writable_folder
from ..config import StudentSetting
from ..outputs import read_summary

log = logging.getLogger("vanillakd")

RESULT_FIELDS = ["method", "model", "teacher", "teacher_weights", "data_dir", "dataset", "train_split", "val_split",
                 "fraction", "seed", "recipe_id", "top1", "top5", "agreement", "teacher_top1", "epochs",
                 "train_images", "wall_time_s", "run_dir"]
# the flags that say which data a run trained and was evaluated on (report can keep only some of them)
DATASET_FLAGS = ("dataset", "train_split", "val_split")
# args.yaml keys that are a result's other columns (or its seed), not its recipe
_OWN_COLUMNS = {"data_dir", "dataset", "train_split", "val_split", "train_fraction", "train_subset_seed", "seed",
                "model", "kd_loss", "teacher", "teacher_pretrained"}
# args.yaml keys that do not change what a run learns (where it writes, how it logs, how it resumes)
_NO_EFFECT = {"config", "output", "experiment", "resume", "no_resume_opt", "log_interval", "progress",
              "log_tensorboard", "log_wandb", "checkpoint_hist", "local_rank", "dist_timeout", "save_safetensors",
              "recovery_interval", "trust_checkpoint", "train_images", "pin_mem", "dataset_download"}
# the flags that take one value per student in a multi-student run
_PER_STUDENT = {f.name for f in fields(StudentSetting)} - {"ema_decays"} | {"model_ema_decay"}
PLOTS_HINT = "plots skipped: matplotlib is not installed (pip install matplotlib to get them)"
# one colour per method in every figure (never by position or alphabet); others get a stable colour from their name
METHOD_COLORS = {"none": "#7f7f7f", "kd": "#1f77b4", "dkd": "#ff7f0e", "dist": "#2ca02c", "bkd": "#9467bd",
                 "crd": "#8c564b", "review": "#e377c2", "rkd": "#bcbd22", "correlation": "#17becf"}
_SPARE_COLORS = ["#d62728", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173"]
METHOD_ORDER = ("none", "kd", "dkd", "dist")


def method_color(method: str) -> str:
    if method in METHOD_COLORS:
        return METHOD_COLORS[method]
    return _SPARE_COLORS[int(hashlib.sha256(method.encode()).hexdigest(), 16) % len(_SPARE_COLORS)]


def pct(fraction: float) -> str:
    """A training fraction as a percentage: 0.005 -> '0.5%', 1 -> '100%'."""
    return f"{float(fraction) * 100:.4g}%"


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


def canonical_hash(value) -> str:
    """sha256 of ``value`` as canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def recipe_of(args: dict, index: int = 0) -> dict:
    """The flags of student ``index`` that can change its result and are none of its row's other columns."""
    out = {}
    for k, v in sorted(args.items()):
        if k in _OWN_COLUMNS or k in _NO_EFFECT:
            continue
        if k in _PER_STUDENT and isinstance(v, list) and v:
            v = v[index] if index < len(v) else v[0]
        out[k] = v
    return out


def teacher_top1_logged(run_dir: Path) -> float | None:
    """The teacher's val top-1 that training logged (in the run's log.txt, or its multi-student parent's)."""
    for log_file in (run_dir / "log.txt", run_dir.parent / "log.txt"):
        try:
            found = re.search(r"teacher: top1 ([0-9.]+)", log_file.read_text(errors="replace"))
        except OSError:
            continue
        if found:
            return float(found.group(1))
    return None


def _student_of(run_dir: Path, args: dict) -> tuple[int, str, str]:
    """(index, model, method): a student of a multi-student run lives in student<i>-<model>-<kd loss>/."""
    found = re.fullmatch(r"student(\d+)-(.+)-([^-]+)", run_dir.name)
    if found:
        return int(found.group(1)), found.group(2), found.group(3)
    return 0, (args.get("model") or ["?"])[0], (args.get("kd_loss") or ["?"])[0]


def run_result(run_dir: Path) -> dict:
    """One training output folder (args.yaml + summary.csv) as a result row: its last evaluated epoch."""
    args = yaml.safe_load((run_dir / "args.yaml").read_text()) or {}
    rows = read_summary(run_dir / "summary.csv")
    evaluated = [r for r in rows if r.get("eval_top1")]
    last = evaluated[-1] if evaluated else (rows[-1] if rows else {})
    index, model, method = _student_of(run_dir, args)
    recipe = recipe_of(args, index)
    teacher = str(args.get("teacher") or "")
    return {"method": method, "model": model, "teacher": teacher,
            "teacher_weights": str(args.get("teacher_pretrained") or "") if teacher else "",
            "data_dir": str(args.get("data_dir") or ""), **dataset_of(args),
            "fraction": args.get("train_fraction", 1.0), "seed": args.get("seed"),
            "recipe_id": canonical_hash(recipe)[:8], "_recipe": recipe,
            "top1": _float(last.get("eval_top1")), "top5": _float(last.get("eval_top5")),
            "agreement": _float(last.get("eval_agreement")), "teacher_top1": teacher_top1_logged(run_dir),
            "epochs": len(rows), "train_images": args.get("train_images"),
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


def write_results_csv(results: Sequence[dict], path: Path, fieldnames: Sequence[str] = RESULT_FIELDS) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fieldnames), extrasaction="ignore")
    w.writeheader()
    w.writerows(results)
    atomic_write_text(buf.getvalue(), path)


def _mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def _mean_text(values: list[float]) -> str:
    mean, sd = _mean_std(values)
    return f"{mean:.2f} ± {sd:.2f} (n={len(values)})" if len(values) > 1 else f"{mean:.2f} (n=1)"


# ---- grouping: the columns a result is pooled by (the fraction is the table's columns, the seed is pooled)

CONTEXT_COLUMNS = ("model", "teacher", "data", "recipe")


def _data_key(r: dict) -> tuple:
    return (r.get("data_dir") or "", r.get("dataset") or "folder", r.get("train_split") or "",
            r.get("val_split") or "")


def _data_label(r: dict) -> str:
    data_dir, dataset, train_split, val_split = _data_key(r)
    label = data_dir if dataset == "folder" else f"{dataset} ({data_dir})"
    splits = (train_split or "train", val_split or "validation")
    return label if splits == ("train", "validation") else f"{label} {splits[0]}/{splits[1]}"


def context_of(r: dict) -> tuple:
    """What a result is pooled by, besides its method and fraction."""
    return (r.get("model"), r.get("teacher") or "", r.get("teacher_weights") or "", _data_key(r),
            r.get("recipe_id") or "")


def context_labels(results: Sequence[dict]) -> dict[tuple, dict[str, str]]:
    """Each context's column texts (model, teacher, data, recipe); a teacher name used with several weights files
    names its file."""
    weights_per_name: dict[str, set] = defaultdict(set)
    for r in results:
        weights_per_name[r.get("teacher") or ""].add(r.get("teacher_weights") or "")
    out = {}
    for r in results:
        name, weights = r.get("teacher") or "", r.get("teacher_weights") or ""
        teacher = name or "-"
        if name and len(weights_per_name[name]) > 1:
            teacher = f"{name} ({weights or 'no weights'})"
        out[context_of(r)] = {"model": str(r.get("model")), "teacher": teacher, "data": _data_label(r),
                              "recipe": r.get("recipe_id") or "-"}
    return out


def _method_list(results: Sequence[dict], method_order: Sequence[str] | None) -> list[str]:
    order = list(method_order or METHOD_ORDER)
    present = {r["method"] for r in results}
    return [m for m in order if m in present] + sorted(present - set(order))


def recipe_legend(results: Sequence[dict]) -> str:
    """For several recipes: the flags in which they differ, per recipe id ('' for one recipe)."""
    recipes = {r["recipe_id"]: r["_recipe"] for r in results if r.get("recipe_id") and r.get("_recipe") is not None}
    if len(recipes) < 2:
        return ""
    keys = sorted({k for rec in recipes.values() for k in rec})
    differ = [k for k in keys if len({json.dumps(rec.get(k), default=str) for rec in recipes.values()}) > 1]
    lines = [f"- recipe `{rid}`: " + ", ".join(f"{k}={rec.get(k)}" for k in differ) for rid, rec in recipes.items()]
    return "\nThe recipes differ in:\n\n" + "\n".join(lines) + "\n"


def markdown_table(results: Sequence[dict], key: str = "top1", method_order: Sequence[str] | None = None) -> str:
    """Mean +- std (over seeds) of ``key``: one row per (model, teacher, data, recipe, method), one column per
    training fraction."""
    cells: dict[tuple, list[float]] = defaultdict(list)
    for r in results:
        if r.get(key) is not None:
            cells[(context_of(r), r["method"], float(r["fraction"]))].append(float(r[key]))
    fractions = sorted({f for _, _, f in cells})
    labels = context_labels(results)
    methods = _method_list(results, method_order)
    head = "| " + " | ".join(CONTEXT_COLUMNS) + " | method | " + " | ".join(f"{pct(f)} of train" for f in fractions)
    lines = [head + " |", "|" + "---|" * (len(CONTEXT_COLUMNS) + 1 + len(fractions))]
    for ctx in sorted({c for c, _, _ in cells}, key=lambda c: json.dumps(labels[c])):
        for m in methods:
            if any((ctx, m, f) in cells for f in fractions):
                values = [_mean_text(cells[(ctx, m, f)]) if (ctx, m, f) in cells else "" for f in fractions]
                lines.append("| " + " | ".join(labels[ctx][c] for c in CONTEXT_COLUMNS) + f" | {m} | "
                             + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def teacher_lines(results: Sequence[dict]) -> list[tuple[str, float]]:
    """(teacher label, its logged val top-1) per teacher among ``results``."""
    labels = context_labels(results)
    found: dict[str, list[float]] = defaultdict(list)
    for r in results:
        if r.get("teacher_top1") is not None and r.get("teacher"):
            found[labels[context_of(r)]["teacher"]].append(float(r["teacher_top1"]))
    return [(name, sum(v) / len(v)) for name, v in sorted(found.items())]


def report_tables(results: Sequence[dict], method_order: Sequence[str] | None = None) -> str:
    """results.md: top-1 and (where measured) teacher-student agreement tables, and the teachers' top-1."""
    text = "### top-1 (%), mean ± std over seeds\n\n" + markdown_table(results, "top1", method_order)
    if any(r.get("agreement") is not None for r in results):
        text += "\n### teacher-student top-1 agreement (%)\n\n" + markdown_table(results, "agreement", method_order)
    text += recipe_legend(results)
    teachers = teacher_lines(results)
    if teachers:
        text += "\nTeacher top-1 on the same val set: " + ", ".join(f"{n} {v:.2f}" for n, v in teachers) + "\n"
    return text


# ---- plots (matplotlib is optional)

def plots_available(say: bool = True) -> bool:
    """Whether matplotlib imports; if not (and ``say``), one log line says how to get the plots."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        if say:
            log.info(PLOTS_HINT)
        return False
    return True


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _contexts(results: Sequence[dict]) -> tuple[list[tuple], dict[tuple, str]]:
    """The contexts in a stable order and a legend suffix for each: the columns in which they differ."""
    labels = context_labels(results)
    ctxs = sorted(labels, key=lambda c: json.dumps(labels[c]))
    varying = [c for c in CONTEXT_COLUMNS if len({labels[x][c] for x in ctxs}) > 1]
    return ctxs, {x: ", ".join(f"{c} {labels[x][c]}" for c in varying) for x in ctxs}


def _fraction_labels(results: Sequence[dict], fractions: Sequence[float]) -> list[str]:
    """Each fraction as a percentage, with its number of training images where the runs agree on one."""
    images: dict[float, set] = defaultdict(set)
    for r in results:
        if r.get("train_images") not in (None, ""):
            images[float(r["fraction"])].add(int(r["train_images"]))
    return [pct(f) + (f"\n{next(iter(images[f])):,} images" if len(images[f]) == 1 else "") for f in fractions]


def _fraction_ticks(ax, results: Sequence[dict], fractions: Sequence[float], log_axis: bool) -> None:
    """Ticks at the grid's fractions only (no minor ticks, no powers of ten), as percentages."""
    from matplotlib.ticker import NullLocator
    if log_axis:
        ax.set_xscale("log")
    ax.set_xticks(list(fractions))
    ax.set_xticklabels(_fraction_labels(results, fractions))
    ax.xaxis.set_minor_locator(NullLocator())


def plot_fraction(results: Sequence[dict], path: Path, title: str = "",
                  method_order: Sequence[str] | None = None) -> None:
    """Top-1 against training-set fraction, one line per method (and context), mean +- std over seeds, with the
    teacher's top-1 as a reference line."""
    plt = _pyplot()
    points: dict[tuple, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        if r.get("top1") is not None:
            points[(context_of(r), r["method"])][float(r["fraction"])].append(float(r["top1"]))
    ctxs, suffix = _contexts(results)
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for i, ctx in enumerate(ctxs):
        for m in _method_list(results, method_order):
            if (ctx, m) not in points:
                continue
            fr = sorted(points[(ctx, m)])
            stats = [_mean_std(points[(ctx, m)][f]) for f in fr]
            ax.errorbar(fr, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="osD^"[i % 4], capsize=3,
                        color=method_color(m), linestyle=["-", "--", ":", "-."][i % 4],
                        label=m + (f" ({suffix[ctx]})" if suffix[ctx] else ""))
    teachers = teacher_lines(results)
    for j, (name, top1) in enumerate(teachers):
        ax.axhline(top1, color="black", linestyle=["--", ":", "-."][j % 3], linewidth=1,
                   label=f"teacher {name}: {top1:.2f}")
    if teachers:  # the reference line inside the frame, not on its edge
        lo, hi = ax.get_ylim()
        ax.set_ylim(lo, max(hi, max(t for _, t in teachers) + 0.05 * (hi - lo)))
    fractions = sorted({f for p in points.values() for f in p})
    _fraction_ticks(ax, results, fractions, len(fractions) > 1)
    ax.set_xlabel("training data (share of the training set" + (", log scale)" if len(fractions) > 1 else ")"))
    ax.set_ylabel("val top-1 (%)")
    ax.set_title(title or "top-1 against training data (mean ± std over seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    _save(fig, ax, path, plt)


GAP_METHODS = ("dkd", "dist")


def has_gap(results: Sequence[dict]) -> bool:
    """Whether the results hold vanilla KD and DKD or DIST (the paper's gap figure can be drawn)."""
    methods = {r["method"] for r in results if r.get("top1") is not None}
    return "kd" in methods and bool(methods & set(GAP_METHODS))


def kd_gaps(results: Sequence[dict]) -> dict[tuple, dict[float, list[float]]]:
    """(context, other method) -> fraction -> vanilla KD's top-1 minus the other's, one value per seed both ran."""
    top1 = {(context_of(r), r["method"], float(r["fraction"]), r.get("seed")): float(r["top1"])
            for r in results if r.get("top1") is not None}
    gaps: dict[tuple, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for (ctx, method, fraction, seed), kd in sorted(top1.items(), key=lambda kv: json.dumps(kv[0], default=str)):
        if method != "kd":
            continue
        for other in GAP_METHODS:
            if (ctx, other, fraction, seed) in top1:
                gaps[(ctx, other)][fraction].append(kd - top1[(ctx, other, fraction, seed)])
    return gaps


def _gap_bars(gaps: dict, series: list[tuple], fractions: list[float]) -> dict[tuple, list[tuple]]:
    """Per series, its bars (x, mean, sd, n): the series present at a fraction sit side by side around it."""
    present = {f: [s for s in series if gaps[s].get(f)] for f in fractions}
    width = 0.8 / max([len(p) for p in present.values()] + [1])
    bars: dict[tuple, list[tuple]] = defaultdict(list)
    for i, f in enumerate(fractions):
        for j, s in enumerate(present[f]):
            mean, sd = _mean_std(gaps[s][f])
            bars[s].append((i + width * (j + 0.5 - len(present[f]) / 2), mean, sd, len(gaps[s][f]), width))
    return bars


def plot_gap(results: Sequence[dict], path: Path, title: str = "") -> None:
    """The paper's form: bars of vanilla KD minus DKD and minus DIST per fraction, mean +- std over seeds."""
    plt = _pyplot()
    gaps = kd_gaps(results)
    ctxs, suffix = _contexts(results)
    series = [(c, o) for c in ctxs for o in GAP_METHODS if (c, o) in gaps]
    fractions = sorted({f for g in gaps.values() for f in g})
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for (ctx, other), bars in _gap_bars(gaps, series, fractions).items():
        xs, means, sds, ns, widths = zip(*bars)
        ax.bar(xs, means, [w * 0.9 for w in widths], yerr=sds, capsize=4, color=method_color(other),
               edgecolor="black", linewidth=0.5, hatch=["", "//", "..", "xx"][ctxs.index(ctx) % 4],
               error_kw={"ecolor": "#333333", "elinewidth": 1},
               label=f"KD − {other.upper()}" + (f" ({suffix[ctx]})" if suffix[ctx] else ""))
        for x, mean, sd, n in zip(xs, means, sds, ns):
            ax.annotate(f"n={n}", (x, mean + (sd if mean >= 0 else -sd)), ha="center", fontsize=7,
                        xytext=(0, 3 if mean >= 0 else -10), textcoords="offset points")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.margins(y=0.15)
    ax.set_xticks(range(len(fractions)))
    ax.set_xticklabels(_fraction_labels(results, fractions))
    ax.set_xlabel("training data (share of the training set)")
    ax.set_ylabel("top-1 gap (points); > 0: vanilla KD better")
    ax.set_title(title or "vanilla KD minus DKD / DIST (mean ± std over seeds, paired by seed)", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    _save(fig, ax, path, plt)


def _save(fig, ax, path: Path, plt) -> None:
    """The legend outside the axes, on the right, so that it never hides a point."""
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    save_figure(fig, path, plt, bbox_inches="tight")


def save_figure(fig, path: Path, plt, **savefig_args) -> None:
    """``fig`` written atomically (a failed write is one line and leaves the old plot), then closed."""
    try:
        atomic_write(path, lambda f: fig.savefig(f, format=Path(path).suffix.lstrip(".") or "png", **savefig_args))
    finally:
        plt.close(fig)


def plot_curves(run_dirs: Sequence[Path], path: Path, title: str = "") -> None:
    """Train loss and eval top-1 per epoch (1 = the first) for each run, coloured by method."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    students = [_student_of(d, yaml.safe_load((d / "args.yaml").read_text()) or {}) for d in run_dirs]
    one_model = len({model for _, model, _ in students}) == 1
    epochs = []
    for d, (_, model, method) in zip(run_dirs, students):
        rows = read_summary(d / "summary.csv")
        label, color = method if one_model else f"{model} {method}", method_color(method)
        x = [int(r["epoch"]) + 1 for r in rows]
        epochs += x
        a.plot(x, [float(r["train_loss"]) for r in rows], marker="o" if len(rows) <= 2 else None, color=color,
               label=label)
        ev = [r for r in rows if r.get("eval_top1")]
        b.plot([int(r["epoch"]) + 1 for r in ev], [float(r["eval_top1"]) for r in ev], marker="o", markersize=4,
               color=color, label=label)
    for ax, ylabel in ((a, "train loss (base + kd)"), (b, "val top-1 (%)")):
        ax.set_xlabel("epoch"), ax.set_ylabel(ylabel), ax.grid(alpha=0.3)
        if epochs and max(epochs) - min(epochs) < 12:  # every epoch a tick: whole numbers only
            ax.set_xticks(range(min(epochs), max(epochs) + 1))
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if epochs:
            ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    b.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, plt)


def report(paths: Sequence[Path], out_dir: Path, only: dict | None = None) -> list[dict]:
    """results.csv, results.md and the plots for every run below ``paths``; ``only`` (dataset flags, e.g.
    ``{'dataset': 'torch/cifar100'}``) keeps the runs trained with those values."""
    from ..errors import UserError
    runs = find_runs(paths)
    if not runs:
        raise UserError(f"no finished training runs (summary.csv + args.yaml) under {', '.join(map(str, paths))}")
    writable_folder(out_dir, "report folder")  # before the runs are read: a folder it cannot write fails at once
    wanted = {k: ("folder" if k == "dataset" and v in ("", "folder") else v) for k, v in (only or {}).items()
              if v is not None}
    results = [run_result(d) for d in runs]
    kept = [i for i, r in enumerate(results) if all(r.get(k) == v for k, v in wanted.items())]
    if not kept:
        raise UserError(f"none of the {len(runs)} runs was trained with {wanted}")
    runs, results = [runs[i] for i in kept], [results[i] for i in kept]
    write_results_csv(results, out_dir / "results.csv")
    atomic_write_text(report_tables(results), out_dir / "results.md")
    if not plots_available():
        return results
    by_parent: dict[Path, list[Path]] = defaultdict(list)
    for d in runs:
        by_parent[d.parent if d.name.startswith("student") else d].append(d)
    for parent, dirs in sorted(by_parent.items()):
        plot_curves(dirs, out_dir / f"curves-{parent.name}.png", parent.name)
    plot_fraction(results, out_dir / "top1_vs_fraction.png")
    if has_gap(results):
        plot_gap(results, out_dir / "kd_gap_vs_fraction.png")
    return results
